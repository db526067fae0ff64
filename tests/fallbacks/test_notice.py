"""The notice: what a patient app shows when nothing can serve a route and nothing safe can
stand in for it."""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp

from tests.conftest import Spawner, wait_until
from tests.failover_stack import set_mode, start_stack

CAPABILITY = [
    {
        "name": "his-capability",
        "upstream": "his",
        "criticality": "support",
        "fallback": "notice",
        "match": {"path": "/fhir/metadata"},
        "timeouts": {"connect_s": 0.5, "total_s": 2},
    },
    {
        "name": "his-plain",  # no fallback: the gateway's own error, as before
        "upstream": "his",
        "match": {"path_prefix": "/fhir/"},
        "timeouts": {"connect_s": 0.5, "total_s": 2},
    },
]
NOTICE = {
    "retry_after_s": 120,
    "message_zh": "部分功能正在抢修",
    "message_en": "Some functions are being repaired",
}


async def get(url: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, dict(response.headers), await response.json()


def assert_notice(status: int, headers: dict[str, str], body: Any, route: str) -> None:
    assert status == 503
    assert headers["Retry-After"] == "120"
    assert headers["X-Resilgate-Degraded"] == "notice"
    assert "X-Resilgate-Upstream" not in headers
    assert body["notice"] == {
        "code": "functions_under_repair",
        "zh": "部分功能正在抢修",
        "en": "Some functions are being repaired",
    }
    assert body["route"] == route and body["retry_after_s"] == 120
    assert body["request_id"] == headers["X-Request-ID"]


async def test_a_route_with_the_notice_answers_503_with_the_notice_when_no_site_can_serve(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", CAPABILITY, fallbacks={"notice": NOTICE})
    status, headers, _ = await get(f"{stack.url}/fhir/metadata")
    assert status == 200 and headers["X-Resilgate-Upstream"] == "his/primary"

    for site in (stack.primary, stack.dr):
        os.kill(site.pid, signal.SIGKILL)
    status, headers, body = await get(f"{stack.url}/fhir/metadata")
    assert_notice(status, headers, body, "his-capability")

    status, headers, body = await get(f"{stack.url}/fhir/Patient/test-0001")
    assert status in (502, 503) and "X-Resilgate-Degraded" not in headers, (status, body)
    served = [r for r in stack.events("fallback_served") if r["route"] == "his-capability"]
    assert served and served[-1]["fallback"] == "notice"


async def test_ops_forcing_a_route_to_fallback_shows_the_notice_while_the_site_is_up(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", CAPABILITY, fallbacks={"notice": NOTICE})

    set_mode(stack, "set", "his-capability", "fallback", "--reason", "drill")
    wait_until(lambda: [r for r in stack.events("mode_seen")], 5, "the mode to be seen")
    status, headers, body = await get(f"{stack.url}/fhir/metadata")
    assert_notice(status, headers, body, "his-capability")
    status, headers, _ = await get(f"{stack.url}/fhir/Patient/test-0001")
    assert status == 200 and headers["X-Resilgate-Upstream"] == "his/primary"

    set_mode(stack, "clear", "his-capability", "--reason", "drill over")
    wait_until(lambda: [r for r in stack.events("mode_cleared_seen")], 5, "the clear to be seen")
    status, headers, _ = await get(f"{stack.url}/fhir/metadata")
    assert status == 200 and headers["X-Resilgate-Upstream"] == "his/primary"
