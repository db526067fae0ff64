"""100 MB each way through the gateway: intact, and without buffering in the gateway's memory."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from resilgate.simulators.echo import CHUNK, pattern_bytes
from tests.conftest import Spawner
from tests.gateway import primary, start_gateway

SIZE = 100 * 1024 * 1024
MAX_GROWTH = 50 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's resident memory while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.02)  # sampling period, not synchronisation

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def expected_download_digest(size: int) -> str:
    digest = hashlib.sha256()
    block = pattern_bytes(CHUNK)
    full, rest = divmod(size, CHUNK)
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


async def test_100mb_upload_and_download_stream_through(spawn: Spawner) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(
        spawn,
        {"echo": primary(echo.url())},
        [
            {
                "name": "bulk",
                "upstream": "echo",
                "match": {"path_prefix": "/"},
                "max_body_bytes": 200 * 1024 * 1024,
                "timeouts": {"connect_s": 2, "total_s": 120},
            }
        ],
    )
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        async with client.get(gateway.url() + "/echo/warm-up") as resp:
            assert resp.status == 200

        sent = hashlib.sha256()

        async def upload() -> AsyncIterator[bytes]:
            piece = bytes(range(251)) * 1000
            remaining = SIZE
            while remaining:
                chunk = piece[: min(len(piece), remaining)]
                sent.update(chunk)
                remaining -= len(chunk)
                yield chunk

        with PeakRss(gateway.pid) as upload_memory:
            async with client.post(gateway.url() + "/echo/upload", data=upload()) as resp:
                echoed = await resp.json()
        assert echoed["body_length"] == SIZE
        assert echoed["body_sha256"] == sent.hexdigest()

        received = hashlib.sha256()
        length = 0
        with PeakRss(gateway.pid) as download_memory:
            async with client.get(gateway.url() + f"/bytes/{SIZE}") as resp:
                assert resp.headers["Content-Length"] == str(SIZE)
                async for chunk in resp.content.iter_any():
                    received.update(chunk)
                    length += len(chunk)
        assert length == SIZE
        assert received.hexdigest() == expected_download_digest(SIZE)

    assert upload_memory.growth < MAX_GROWTH, f"upload grew RSS by {upload_memory.growth}"
    assert download_memory.growth < MAX_GROWTH, f"download grew RSS by {download_memory.growth}"
    print(  # reported with -s; the figures go into the issue note
        f"rss growth: upload {upload_memory.growth / 2**20:.1f} MiB, "
        f"download {download_memory.growth / 2**20:.1f} MiB"
    )
