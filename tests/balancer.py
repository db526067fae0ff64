"""A tiny round-robin TCP load balancer that behaves like a Kubernetes Service in front of
gateway pods: new connections go, in turn, to the backends whose readiness probe passes; an
open connection stays with its backend until one side closes it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

import aiohttp

PROBE_TIMEOUT_S = 0.5
COPY_BYTES = 65536


@dataclass
class Backend:
    """One gateway: where clients connect, and its readiness URL."""

    name: str
    port: int
    ready_url: str
    ready: bool = False
    connections: list[float] = field(default_factory=list)  # monotonic time of each one


class RoundRobinBalancer:
    """Listen on an ephemeral loopback port; probe every backend each ``probe_interval_s``."""

    def __init__(self, backends: list[Backend], probe_interval_s: float = 0.1) -> None:
        self.backends = backends
        self.probe_interval_s = probe_interval_s
        self.turned_away = 0  # connections that found no ready backend
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RoundRobinBalancer:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._tasks.add(asyncio.create_task(self._probe_forever()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _probe_forever(self) -> None:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                for backend in self.backends:
                    backend.ready = await _probe(session, backend.ready_url)
                await asyncio.sleep(self.probe_interval_s)

    def _choose(self) -> Backend | None:
        ready = [backend for backend in self.backends if backend.ready]
        return ready[next(self._turn) % len(ready)] if ready else None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # so that leaving the balancer ends every connection
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self._choose()
        if backend is None:
            self.turned_away += 1
            writer.close()
            return
        backend.connections.append(time.monotonic())
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend.port)
        except OSError:
            writer.close()
            return
        pipes = [
            asyncio.create_task(_copy(reader, up_writer)),
            asyncio.create_task(_copy(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for end in (writer, up_writer):
                end.close()  # the transport finishes closing by itself


async def _probe(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await source.read(COPY_BYTES):
            sink.write(chunk)
            await sink.drain()
