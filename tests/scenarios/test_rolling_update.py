"""A rolling update behind a load balancer drops no request: two gateways behind a round-robin
balancer that follows their readiness, and one of them gets SIGTERM while load flows."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.balancer import Backend, RoundRobinBalancer
from tests.conftest import ServerProcess, Spawner
from tests.gateway import primary, start_gateway
from tests.load import steady

RATE_PER_S = 200
DURATION_S = 6.0
SIGTERM_AT_S = 2.0
SLOW_MS = 300  # every request is in flight this long, so the drain has work to finish


def backend(name: str, gateway: ServerProcess) -> Backend:
    return Backend(name, gateway.port("public"), gateway.url("admin") + "/readyz")


async def test_sigterm_to_one_of_two_gateways_behind_a_balancer_fails_no_request(
    spawn: Spawner,
) -> None:
    echo = spawn.simulator("echo")
    gateways = [
        start_gateway(
            spawn,
            {"echo": primary(echo.url())},
            [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}],
            workers=2,
            name=name,
            drain_notice_s=2,  # as the chart's preStop pause: the balancer stops sending
            drain_deadline_s=10,
        )
        for name in ("gw-a", "gw-b")
    ]
    leaving, staying = backend("gw-a", gateways[0]), backend("gw-b", gateways[1])
    sigterm_at = 0.0

    def sigterm() -> None:
        nonlocal sigterm_at
        sigterm_at = time.monotonic()
        gateways[0].signal(signal.SIGTERM)

    async with RoundRobinBalancer([leaving, staying]) as balancer:
        deadline = time.monotonic() + 10
        while not (leaving.ready and staying.ready):
            assert time.monotonic() < deadline, "the balancer never saw both gateways ready"
            await asyncio.sleep(0.02)

        def request(http: aiohttp.ClientSession) -> asyncio.Future[aiohttp.ClientResponse]:
            # A POST: no client resends it on its own after a dropped connection (aiohttp
            # would quietly retry a GET and hide the drop).
            return asyncio.ensure_future(http.post(f"{balancer.url}/slow/{SLOW_MS}", data=b"{}"))

        stream = await steady(request, RATE_PER_S, DURATION_S, events={SIGTERM_AT_S: sigterm})
        exit_code = await asyncio.to_thread(gateways[0].proc.wait, 30)

    failures = stream.failures()
    after = [at for at in leaving.connections if at > sigterm_at + 1.0]
    print(
        f"\n{len(stream)} requests, {len(failures)} failed; connections: "
        f"{len(leaving.connections)} to the leaving gateway ({len(after)} after SIGTERM+1 s), "
        f"{len(staying.connections)} to the staying one; turned away {balancer.turned_away}; "
        f"slowest {max(s.latency_s for s in stream.samples) * 1000:.0f} ms"
    )
    assert len(stream) == RATE_PER_S * DURATION_S
    assert failures == [], failures[:5]
    assert leaving.connections and staying.connections, "the load was not spread"
    assert {s.status for s in stream.samples} == {200}
    assert exit_code == 0, "the leaving gateway did not drain cleanly"
    assert not after, "the balancer kept sending to a gateway that said it was not ready"
