"""How the gateway behaves when the upstream, the client or the port misbehaves."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, ServerProcess, Spawner, wait_until
from tests.gateway import primary, start_gateway, write_config


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A listener whose accept queue is full: connecting to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


@pytest.fixture
def stack(spawn: Spawner, full_backlog_port: int) -> ServerProcess:
    echo = spawn.simulator("echo")
    gateway = start_gateway(
        spawn,
        {
            "echo": primary(echo.url()),
            "stuck": primary(f"http://127.0.0.1:{full_backlog_port}"),
        },
        [
            {
                "name": "stuck",
                "upstream": "stuck",
                "match": {"path_prefix": "/stuck"},
                "timeouts": {"connect_s": 0.3, "total_s": 5},
            },
            {
                "name": "small",
                "upstream": "echo",
                "match": {"path_prefix": "/echo/small"},
                "max_body_bytes": 100,
            },
            {"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}},
        ],
    )
    gateway.extra["echo"] = echo
    return gateway


def access(gateway: ServerProcess, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for record in gateway.log_records():
            if record.get("event") == "access" and record.get("request_id") == request_id:
                return record
        return None

    found: dict[str, Any] = wait_until(find, 10, f"access line of {request_id}")
    return found


async def test_upstream_connections_are_pooled(stack: ServerProcess) -> None:
    ports = set()
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(stack.url() + "/echo/pooled") as resp:
                ports.add((await resp.json())["peer_port"])
    assert len(ports) == 1, f"upstream saw {len(ports)} connections for 5 sequential requests"


async def test_connect_timeout_is_504(stack: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(stack.url() + "/stuck", headers={"X-Request-ID": "stuck-1"}) as resp,
    ):
        assert resp.status == 504
        body = await resp.json()
    assert body["error"] == "upstream_connect_timeout"
    assert body["upstream"] == "stuck/primary"
    assert access(stack, "stuck-1")["outcome"].startswith("ConnectionTimeoutError")


async def test_upstream_breaking_mid_body_cuts_the_client_off(stack: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(stack.url() + "/truncate/100000", headers={"X-Request-ID": "cut-1"}) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    record = access(stack, "cut-1")
    assert record["outcome"] == "truncated"
    # the gateway still serves the next request
    async with aiohttp.ClientSession() as client, client.get(stack.url() + "/echo/ok") as resp:
        assert resp.status == 200


async def test_client_leaving_cancels_the_upstream_call(stack: ServerProcess) -> None:
    echo = stack.extra["echo"]
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        with pytest.raises(TimeoutError):
            async with client.get(stack.url() + "/slow/5000", headers={"X-Request-ID": "gone-1"}):
                pass
    record = access(stack, "gone-1")
    assert record["status"] == 499
    assert record["outcome"] == "client_gone"

    async def upstream_idle() -> bool:
        async with aiohttp.ClientSession() as control, control.get(echo.url() + "/_sim/stats") as r:
            return (await r.json())["in_flight"] == 0

    deadline = asyncio.get_running_loop().time() + 3  # well before the 5 s answer
    while not await upstream_idle():
        assert asyncio.get_running_loop().time() < deadline, "upstream call was not cancelled"
        await asyncio.sleep(0.02)


def raw_exchange(port: int, head: bytes, body: bytes | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        first = sock.recv(65536)
        if body is None:
            return first
        sock.sendall(body)
        rest = b""
        while b"\r\n\r\n" not in rest or not rest.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        return first + rest


def test_expect_continue_answered_only_after_checks(stack: ServerProcess) -> None:
    too_big = (
        b"POST /echo/small HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert raw_exchange(stack.port(), too_big).startswith(b"HTTP/1.1 413")

    fine = (
        b"POST /echo/small HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = raw_exchange(stack.port(), fine, b"hello")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert b'"body_length":5' in answer


async def test_long_fhir_search_passes_and_oversized_line_leaks_nothing(
    stack: ServerProcess,
) -> None:
    codes = "&".join(f"code=http://loinc.org|{n:05d}-0" for n in range(500))  # ~15 KB
    async with aiohttp.ClientSession() as client:
        async with client.get(stack.url() + "/echo/Observation?patient=p-10086&" + codes) as resp:
            assert resp.status == 200
        huge = "&".join(f"code=http://loinc.org|{n:05d}-0" for n in range(1500))  # ~45 KB
        async with client.get(stack.url() + "/echo/Observation?patient=p-10099&" + huge) as resp:
            assert resp.status == 400
    wait_until(lambda: "LineTooLong" in stack.log_path.read_text(), 5, "the error line")
    assert "p-10099" not in stack.log_path.read_text()


def serve_once(config: Path, workers: int) -> subprocess.CompletedProcess[str]:
    """``resilgate serve`` expected to give up at start-up."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "resilgate",
            "serve",
            "--config",
            str(config),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_second_gateway_on_a_taken_port_fails_clearly(spawn: Spawner, tmp_path: Path) -> None:
    echo = spawn.simulator("echo")
    routes = [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}]
    first = start_gateway(spawn, {"echo": primary(echo.url())}, routes, workers=2)
    for workers in (1, 2):
        config = write_config(
            tmp_path / f"second-{workers}.yaml",
            {"echo": primary(echo.url())},
            routes,
            listeners={
                "public": {"host": "127.0.0.1", "port": first.port()},
                "admin": {"host": "127.0.0.1", "port": 0},
            },
        )
        result = serve_once(config, workers)
        assert result.returncode == 1
        assert f"listeners.public (127.0.0.1:{first.port()}): address already in use" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr + result.stdout


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


async def test_dead_worker_is_replaced(spawn: Spawner) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(
        spawn,
        {"echo": primary(echo.url())},
        [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}],
        workers=2,
    )
    workers = children(gateway.pid)
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: (
            len(children(gateway.pid) - {victim}) == 2
            and sum(
                r.get("event") == "listening" and r.get("listener") == "public"
                for r in gateway.log_records()
            )
            == 3
        ),
        15,
        "a new worker listening",
    )
    assert replaced
    assert any(r.get("event") == "worker_died" for r in gateway.log_records())
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(gateway.url() + "/echo/after") as resp:
                assert resp.status == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_state_file_stops_start_up_with_the_reason(
    spawn: Spawner, tmp_path: Path, workers: int
) -> None:
    echo = spawn.simulator("echo")
    (tmp_path / "not-a-dir").write_text("")
    config = write_config(
        tmp_path / "bad-state.yaml",
        {"echo": primary(echo.url())},
        [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}],
        state={"backend": "sqlite", "path": str(tmp_path / "not-a-dir" / "state.db")},
    )
    result = serve_once(config, workers)
    assert result.returncode == 1
    assert "not-a-dir" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
