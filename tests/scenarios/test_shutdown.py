"""SIGTERM: stop accepting, let in-flight requests finish, exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket

import aiohttp
import pytest

from tests.conftest import ServerProcess, Spawner, wait_until, wait_until_async
from tests.gateway import primary, start_gateway

IN_FLIGHT = 50


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def in_flight_at(echo: ServerProcess, session: aiohttp.ClientSession) -> int:
    async with session.get(echo.url() + "/_sim/stats") as resp:
        count: int = (await resp.json())["in_flight"]
        return count


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_in_flight_requests(spawn: Spawner, workers: int) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(
        spawn,
        {"echo": primary(echo.url())},
        [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}],
        workers=workers,
        drain_deadline_s=20,
    )
    async with aiohttp.ClientSession() as client, aiohttp.ClientSession() as control:
        slow = [
            asyncio.create_task(client.get(gateway.url() + "/slow/2500")) for _ in range(IN_FLIGHT)
        ]
        deadline = asyncio.get_running_loop().time() + 10
        while await in_flight_at(echo, control) < IN_FLIGHT:
            assert asyncio.get_running_loop().time() < deadline, "requests never reached upstream"
            await asyncio.sleep(0.02)

        gateway.signal(signal.SIGTERM)
        await asyncio.to_thread(
            wait_until, lambda: refuses_connections(gateway.port()), 5, "listener to close"
        )
        responses = await asyncio.gather(*slow)
        statuses = [resp.status for resp in responses]
        for resp in responses:
            resp.release()
    assert statuses == [200] * IN_FLIGHT
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0


async def test_sigterm_says_not_ready_first_while_still_serving(spawn: Spawner) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(
        spawn,
        {"echo": primary(echo.url())},
        [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}],
        drain_notice_s=3,
    )
    ready = gateway.url("admin") + "/readyz"
    async with aiohttp.ClientSession() as session:
        async with session.get(ready) as response:
            assert (response.status, (await response.json())["ready"]) == (200, True)
        gateway.signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with aiohttp.ClientSession() as fresh, fresh.get(ready) as response:
                return response.status == 503

        await wait_until_async(not_ready, 2, "readyz to say not ready")
        async with session.get(ready) as response:
            assert (await response.json())["reason"] == "draining: shutting down"
        async with aiohttp.ClientSession() as fresh, fresh.get(gateway.url() + "/x") as response:
            assert response.headers["X-Resilgate-Upstream"] == "echo/primary"  # still serving
            # and tells the client to reconnect (through the balancer, to another replica)
            assert response.headers["Connection"] == "close"
        async with aiohttp.ClientSession() as fresh:
            streamed = fresh.get(gateway.url() + "/bytes/2000000")  # relayed in chunks
            gateway_error = fresh.get(gateway.url() + "/_resilgate/tickets/T-none")
            for call, status in ((streamed, 200), (gateway_error, 404)):
                async with call as response:
                    await response.read()
                    assert (response.status, response.headers["Connection"]) == (status, "close")
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0
