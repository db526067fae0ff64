"""Incident levels and early warnings as departments see them: webhooks at a real receiver,
sent by a real gateway whose upstreams really fail (SIGKILL, fault modes)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import ServerProcess, Spawner, wait_until_async
from tests.failover_stack import FAST_HEALTH, set_fault, start_stack, traffic
from tests.gateway import VIEWER_TOKEN, start_gateway
from tests.insurance_calls import FIXMEDINS, envelope, settle_input
from tests.webhook_receiver import WebhookReceiver

SECRET = "scenario-webhook-secret"
Request = Callable[[aiohttp.ClientSession], Awaitable[aiohttp.ClientResponse]]


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


class Load:
    """Requests at steady rates until stopped (open loop); statuses by request kind."""

    def __init__(self, **kinds: tuple[Request, float]) -> None:
        self.kinds = kinds
        self.statuses: dict[str, list[int]] = {name: [] for name in kinds}
        self._stop = asyncio.Event()
        self._task: asyncio.Future[list[None]] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.gather(*(self._send(n, *k) for n, k in self.kinds.items()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _send(self, name: str, request: Request, rate_per_s: float) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        async def one(http: aiohttp.ClientSession) -> None:
            status = 0
            try:
                async with await request(http) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.statuses[name].append(status)

        timeout = aiohttp.ClientTimeout(total=10)
        # A connection per request, as from many kiosks: the kernel spreads them over the
        # workers. (One kept-alive connection pinned to a worker without the trial lease
        # keeps the breakers half-open after recovery: reported to the fleet's owner.)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            start = loop.time()
            for index in itertools.count():
                if self._stop.is_set():
                    break
                delay = start + index / rate_per_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(http))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending)


def insurance_trials(gateway: ServerProcess) -> Request:
    url = gateway.url() + "/fsi/api/callService"
    seq = itertools.count(1)

    def call(http: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        msgid = f"{FIXMEDINS}{time.strftime('%Y%m%d%H%M%S')}{next(seq) % 10000:04d}"
        body = envelope("2206", msgid, settle_input(236.50, "CB0001"))
        return http.post(url, json=body)

    return call


def patient_reads(gateway: ServerProcess) -> Request:
    url = gateway.url() + "/fhir/Patient/test-0001"
    return lambda http: http.get(url)


async def incident_at(gateway: ServerProcess) -> dict[str, Any]:
    """The incident as the gateway's ``/status`` shows it."""
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url("admin") + "/status", headers=headers) as response,
    ):
        assert response.status == 200
        status: dict[str, Any] = await response.json()
    return dict(status["incident"])


async def shown_level(gateway: ServerProcess, level: int) -> dict[str, Any]:
    """The incident at ``/status`` once it shows ``level``: the worker answering reads the
    leader's decision within a tick of the webhook."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while (incident := await incident_at(gateway))["level"] != level:
        if loop.time() > deadline:
            raise AssertionError(f"/status still shows {incident} instead of level {level}")
        await asyncio.sleep(0.05)
    return incident


def levels(hooks: WebhookReceiver) -> list[int]:
    return [event["level"] for event in hooks.events("incident_level")]


def report(name: str, **figures: Any) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


INSURANCE_TRIAL = {
    "name": "insurance-trial",
    "upstream": "insurance",
    "criticality": "core",
    "match": {"path": "/fsi/api/callService", "methods": ["POST"]},
    "retries": "safe",
    "timeouts": {"connect_s": 0.5, "total_s": 2.0},
    "failure_body": {"format": "insurance_envelope"},
}
HIS_READ = {
    "name": "his-read",
    "upstream": "his",
    "criticality": "core",
    "match": {"path_prefix": "/fhir/", "methods": ["GET"]},
    "timeouts": {"connect_s": 0.5, "total_s": 2.0},
}


async def test_insurance_down_raises_the_incident_level_and_recovery_lowers_it(
    spawn: Spawner, hooks: WebhookReceiver
) -> None:
    insurance = [spawn.simulator("insurance", site) for site in ("primary", "dr")]
    his = spawn.simulator("his", "primary")
    endpoints = [
        {"name": site, "url": sim.url(), "priority": priority}
        for priority, (site, sim) in enumerate(zip(("primary", "dr"), insurance, strict=True))
    ]
    gateway = start_gateway(
        spawn,
        {
            "insurance": {"endpoints": endpoints, **FAST_HEALTH},
            "his": {"endpoints": [{"name": "primary", "url": his.url(), "priority": 0}]},
        },
        [INSURANCE_TRIAL, HIS_READ],
        workers=2,
        env={"RESILGATE_WEBHOOK_SECRET": SECRET},
        incident={"window_s": 3, "min_requests": 10, "calm_s": 2},
        alerts={"webhooks": [hooks.url], "backoff_s": 0.1, "max_backoff_s": 0.5},
    )
    # A third of the core traffic is insurance: losing it all is level 2 (20-50 %).
    load = Load(insurance=(insurance_trials(gateway), 10), his=(patient_reads(gateway), 20))
    async with load:
        await wait_until_async(lambda: len(load.statuses["insurance"]) >= 20, 10, "traffic to flow")
        assert levels(hooks) == [] and set(load.statuses["insurance"]) == {200}
        killed_at = time.monotonic()
        for sim in insurance:
            os.kill(sim.pid, signal.SIGKILL)
        await wait_until_async(lambda: 2 in levels(hooks), 20, "an incident_level 2 webhook")
        raised_after_s = hooks.arrivals("incident_level")[levels(hooks).index(2)] - killed_at
        shown = await shown_level(gateway, 2)

        def restart(site: str, port: int) -> ServerProcess:
            args = ["simulate", "insurance", "--port", str(port), "--site", site]
            return spawn.start(f"sim-insurance-{site}-again", args)

        restarted = await asyncio.gather(
            *(
                asyncio.to_thread(restart, site, sim.port())
                for site, sim in zip(("primary", "dr"), insurance, strict=True)
            )
        )
        restarted_at = time.monotonic()
        await wait_until_async(lambda: levels(hooks)[-1] == 0, 30, "an incident_level 0 webhook")
        lowered_after_s = hooks.arrivals("incident_level")[-1] - restarted_at
    events = hooks.events("incident_level")
    report(
        "incident",
        levels=levels(hooks),
        raised_to_2_after_s=round(raised_after_s, 2),
        lowered_to_0_after_restart_s=round(lowered_after_s, 2),
        shown_share=round(shown["share"], 3),
        breakers_opened=sorted({e["endpoint"] for e in hooks.events("breaker_opened")}),
        restarted=[s.name for s in restarted],
    )
    assert max(levels(hooks), key=lambda level: 4 - level if level else 0) == 2  # never 1
    assert shown["level"] == 2 and 0.2 <= shown["share"] <= 0.5
    assert [e["previous"] for e in events[1:]] == levels(hooks)[:-1]  # each change once
    assert all(e["window_s"] == 3 and "message_zh" in e for e in events)
    assert "insurance/primary" in {e["endpoint"] for e in hooks.events("breaker_opened")}
    for post in hooks.posts:
        expected = hmac.new(SECRET.encode(), post.body, hashlib.sha256).hexdigest()
        assert post.headers["X-Resilgate-Signature"] == f"sha256={expected}"
    assert (await shown_level(gateway, 0))["level"] == 0


async def test_a_rising_error_rate_warns_before_the_breaker_opens(
    spawn: Spawner, hooks: WebhookReceiver
) -> None:
    # Only the failure rate opens this breaker: 50 % of at least 20 calls in 5 s.
    health = {
        **FAST_HEALTH,
        "breaker": {
            **FAST_HEALTH["breaker"],
            "consecutive_failures": 1000,
            "window_s": 5,
            "min_calls": 20,
            "failure_rate": 0.5,
        },
    }
    stack = start_stack(
        spawn,
        "his",
        [HIS_READ],
        health=health,
        alerts={"webhooks": [hooks.url], "warning_fraction": 0.5, "backoff_s": 0.1},
    )
    steps: list[tuple[float, float]] = []  # (error rate, monotonic time set)

    def error_rate(rate: float) -> None:
        set_fault(stack.primary, mode="error_rate", rate=rate, status=503, path_prefix="/fhir/")
        steps.append((rate, time.monotonic()))

    load = Load(reads=(patient_reads(stack.gateway), 40))
    async with load:
        error_rate(0.1)
        at_first_step = traffic(stack.primary)
        await wait_until_async(
            lambda: traffic(stack.primary) >= at_first_step + 100, 10, "100 calls at 10 %"
        )
        error_rate(0.35)
        await wait_until_async(
            lambda: hooks.events("early_warning"), 15, "an early_warning webhook"
        )
        opened_before_warning = hooks.events("breaker_opened")
        error_rate(0.9)
        await wait_until_async(
            lambda: hooks.events("breaker_opened"), 10, "a breaker_opened webhook"
        )
    [warning] = hooks.events("early_warning")
    warned_at = hooks.arrivals("early_warning")[0]
    opened_at = hooks.arrivals("breaker_opened")[0]
    report(
        "early warning",
        rate=warning["rate"],
        threshold=warning["threshold"],
        calls=warning["calls"],
        after_step_to_35pct_s=round(warned_at - steps[1][1], 2),
        before_breaker_opened_s=round(opened_at - warned_at, 2),
        client_failures=sum(1 for s in load.statuses["reads"] if s >= 500 or s == 0),
    )
    assert not opened_before_warning
    assert warning["endpoint"] == "his/primary" and warning["kind"] == "failure_rate"
    assert warning["threshold"] <= warning["rate"] < warning["breaker_rate"] == 0.5
    assert warned_at < steps[2][1] < opened_at  # warned while still below the threshold
    assert warning["at"] < hooks.events("breaker_opened")[0]["at"]
    assert hooks.events("breaker_opened")[0]["endpoint"] == "his/primary"
