"""Webhook delivery against a real receiver on a loopback port, and what alerts say."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from resilgate.alerts import (
    AlertSender,
    backoff_s,
    cleared_event,
    incident_event,
    opened_event,
    retryable,
    warning_event,
)
from resilgate.config import Alerts
from resilgate.incidents import Change, EarlyWarning
from resilgate.state.records import Verdict
from tests.conftest import wait_until_async
from tests.webhook_receiver import WebhookReceiver

BACKOFF_S = 0.05
SECRET = "test-webhook-secret"


def alerts(*urls: str, **options: Any) -> Alerts:
    defaults = {"backoff_s": BACKOFF_S, "max_backoff_s": 0.2, "timeout_s": 2, "max_attempts": 4}
    return Alerts.model_validate({"webhooks": list(urls), **defaults, **options})


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


class Running:
    """An AlertSender with its delivery task running."""

    def __init__(self, sender: AlertSender) -> None:
        self.sender = sender
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AlertSender:
        self.task = asyncio.create_task(self.sender.run())
        return self.sender

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.sender.close()


def test_backoff_doubles_up_to_its_cap() -> None:
    config = alerts(backoff_s=1, max_backoff_s=60)
    assert [backoff_s(n, config) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(10_000, config) == 60


@pytest.mark.parametrize(
    ("status", "again"),
    [(0, True), (500, True), (503, True), (429, True), (408, True), (400, False), (404, False)],
)
def test_what_is_retried(status: int, again: bool) -> None:
    assert retryable(status) is again


async def test_a_failing_receiver_gets_the_alert_again_after_growing_waits(
    hooks: WebhookReceiver,
) -> None:
    hooks.fail_next(3)
    async with Running(AlertSender(alerts(hooks.url), env={})) as sender:
        sender.send({"event": "incident_level", "level": 2})
        await wait_until_async(hooks.events, 5, "the alert to be accepted")
    posts = hooks.posts
    assert [p.status for p in posts] == [503, 503, 503, 204]
    gaps = [later.monotonic - earlier.monotonic for earlier, later in itertools.pairwise(posts)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= backoff_s(attempt, sender.config) * 0.95, gaps
    assert {p.body for p in posts} == {b'{"event":"incident_level","level":2}'}
    assert posts[0].headers["X-Resilgate-Event"] == "incident_level"
    assert posts[0].headers["Content-Type"] == "application/json"
    assert "X-Resilgate-Signature" not in posts[0].headers
    assert "1 delivered, 0 failed, 0 dropped" in repr(sender)


async def test_alerts_arrive_in_order_while_the_first_is_retried(hooks: WebhookReceiver) -> None:
    hooks.fail_next(2)
    async with Running(AlertSender(alerts(hooks.url), env={})) as sender:
        for seq in range(5):
            sender.send({"event": "early_warning", "seq": seq})
        await wait_until_async(lambda: len(hooks.events()) == 5, 5, "five alerts")
    assert [e["seq"] for e in hooks.events()] == [0, 1, 2, 3, 4]
    assert [p.event["seq"] for p in hooks.posts[:3]] == [0, 0, 0]


async def test_after_max_attempts_the_alert_is_given_up_and_the_next_one_goes(
    hooks: WebhookReceiver,
) -> None:
    hooks.fail_next(3)
    async with Running(AlertSender(alerts(hooks.url, max_attempts=3), env={})) as sender:
        sender.send({"event": "a"})
        sender.send({"event": "b"})
        await wait_until_async(lambda: hooks.events("b"), 5, "the second alert")
    assert [(p.event["event"], p.status) for p in hooks.posts] == [
        ("a", 503),
        ("a", 503),
        ("a", 503),
        ("b", 204),
    ]
    assert "1 delivered, 1 failed" in repr(sender)


async def test_a_client_error_is_not_retried() -> None:
    with WebhookReceiver(fail_first=1, fail_status=400) as hooks:
        async with Running(AlertSender(alerts(hooks.url), env={})) as sender:
            sender.send({"event": "a"})
            sender.send({"event": "b"})
            await wait_until_async(lambda: hooks.events("b"), 5, "the second alert")
        assert [p.status for p in hooks.posts] == [400, 204]


async def test_a_full_queue_drops_the_oldest_alert(hooks: WebhookReceiver) -> None:
    sender = AlertSender(alerts(hooks.url, queue_size=2), env={})
    for seq in range(4):  # nothing is delivering yet
        sender.send({"event": "e", "seq": seq})
    assert "2 queued, 0 delivered, 0 failed, 2 dropped" in repr(sender)
    async with Running(sender):
        await wait_until_async(lambda: len(hooks.events()) == 2, 5, "the two queued alerts")
    assert [e["seq"] for e in hooks.events()] == [2, 3]


async def test_send_returns_at_once_while_a_webhook_hangs() -> None:
    # A listener that accepts and never answers: the delivery waits on it, send() does not.
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = alerts(f"http://127.0.0.1:{port}/hook", timeout_s=30)
    async with Running(AlertSender(config, env={})) as sender:
        sender.send({"event": "first"})
        await wait_until_async(lambda: held, 5, "the first POST to connect")
        started = time.perf_counter()
        for _ in range(100):
            sender.send({"event": "more"})
        took_s = time.perf_counter() - started
        assert "100 queued, 0 delivered" in repr(sender)
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()
    assert took_s < 0.05


async def test_posts_are_signed_with_the_configured_secret(hooks: WebhookReceiver) -> None:
    config = alerts(hooks.url, secret_env="TEST_HOOK_SECRET")
    async with Running(AlertSender(config, env={"TEST_HOOK_SECRET": SECRET})) as sender:
        sender.send({"event": "breaker_opened"})
        [post] = await wait_until_async(lambda: hooks.posts, 5, "the alert")
    expected = hmac.new(SECRET.encode(), post.body, hashlib.sha256).hexdigest()
    assert post.headers["X-Resilgate-Signature"] == f"sha256={expected}"
    assert "signed" in repr(sender)


async def test_every_webhook_gets_every_alert_even_when_another_is_down(
    hooks: WebhookReceiver,
) -> None:
    with WebhookReceiver(fail_first=100) as broken:
        config = alerts(broken.url, hooks.url, max_attempts=2)
        async with Running(AlertSender(config, env={})) as sender:
            for seq in range(3):
                sender.send({"event": "e", "seq": seq})
            await wait_until_async(
                lambda: len(hooks.events()) == 3, 5, "all alerts at the good one"
            )
    assert [e["seq"] for e in hooks.events()] == [0, 1, 2]


async def test_close_gives_what_is_queued_one_attempt(hooks: WebhookReceiver) -> None:
    sender = AlertSender(alerts(hooks.url), env={})
    sender.send({"event": "last words"})
    await sender.close()
    assert hooks.events() == [{"event": "last words"}]


async def test_close_stops_at_a_failing_webhook() -> None:
    with WebhookReceiver(fail_first=100) as failing:
        sender = AlertSender(alerts(failing.url), env={})
        for seq in range(3):
            sender.send({"event": "e", "seq": seq})
        with capture_logs() as logs:
            await sender.close()
        assert [p.event["seq"] for p in failing.posts] == [0]
    [left] = [e for e in logs if e["event"] == "alerts_undelivered"]
    assert left["alerts"] == 2


# -- what alerts say --------------------------------------------------------------------------

AT = 1_742_433_120.0  # 2025-03-20 01:12:00 UTC


def test_an_incident_alert_names_both_levels_in_both_languages() -> None:
    event = incident_event(Change(1, 3, 0.625, 160.0, AT), 60, "gw-a/12")
    assert event == {
        "event": "incident_level",
        "at": "2025-03-20T01:12:00.000+00:00",
        "gateway": "gw-a/12",
        "level": 1,
        "previous": 3,
        "share": 0.625,
        "requests": 160.0,
        "window_s": 60,
        "message_en": "Incident level 1 (was level 3): 62% of weighted requests failed or "
        "degraded in the last 60 s (160 requests).",
        "message_zh": "应急响应等级: 一级 (此前: 三级)。最近 60 秒内 62% 的加权请求失败或降级 "
        "(共 160 次)。",
    }


def test_warning_alerts_carry_the_rates() -> None:
    warning = EarlyWarning("his/primary", "slow_rate", 0.42, 0.4, 0.8, 120, AT)
    raised = warning_event(warning, AT, "gw")
    assert {k: raised[k] for k in ("event", "endpoint", "kind", "rate", "threshold")} == {
        "event": "early_warning",
        "endpoint": "his/primary",
        "kind": "slow_rate",
        "rate": 0.42,
        "threshold": 0.4,
    }
    assert (raised["breaker_rate"], raised["calls"]) == (0.8, 120)
    assert "慢调用率 42%" in raised["message_zh"] and "opens at 80%" in raised["message_en"]
    cleared = cleared_event(warning, "rate fell", AT, "gw")
    assert (cleared["event"], cleared["reason"]) == ("warning_cleared", "rate fell")
    assert "比率已回落" in cleared["message_zh"]


def test_a_breaker_alert_names_endpoint_and_replica() -> None:
    event = opened_event(Verdict("insurance/dr", "gw-b/7", "open", AT), "gw-a/12")
    assert (event["endpoint"], event["replica"], event["gateway"]) == (
        "insurance/dr",
        "gw-b/7",
        "gw-a/12",
    )
    assert "insurance/dr" in event["message_zh"] and "gw-b/7" in event["message_en"]
