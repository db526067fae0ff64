"""A steady, bounded stream of requests through the gateway, recording what each one saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it was sent (monotonic), how long it took, what came back."""

    sent_at: float
    latency_s: float
    status: int  # 0: no HTTP answer at all
    served_by: str
    body: bytes = b""

    @property
    def failed(self) -> bool:
        return self.status == 0 or self.status >= 500


@dataclass
class Stream:
    """Results of :func:`steady`, with the helpers the scenarios assert on."""

    samples: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.failed]

    def sent_after(self, at: float) -> list[Sample]:
        return [s for s in self.samples if s.sent_at >= at]

    def slower_than(self, seconds: float) -> list[Sample]:
        return [s for s in self.samples if s.latency_s > seconds]

    def served(self, label: str) -> list[Sample]:
        return [s for s in self.samples if s.served_by == label]


Request = Callable[[aiohttp.ClientSession], Awaitable[aiohttp.ClientResponse]]


async def steady(
    request: Request,
    rate_per_s: float,
    duration_s: float,
    events: dict[float, Callable[[], Any]] | None = None,
    keep_body: bool = False,
) -> Stream:
    """Send ``request`` ``rate_per_s`` times a second for ``duration_s`` (open loop: a slow
    answer does not slow the stream), running each of ``events`` (seconds from the start ->
    callable) once on the way. Every request has its own 30 s client deadline."""
    stream = Stream()
    pending: set[asyncio.Task[None]] = set()
    todo = sorted((events or {}).items())
    connector = aiohttp.TCPConnector(limit=2000, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(http: aiohttp.ClientSession, sent_at: float) -> None:
        status, served_by, body = 0, "", b""
        try:
            async with await request(http) as response:
                body = await response.read()
                status = response.status
                served_by = response.headers.get("X-Resilgate-Upstream", "")
        except (aiohttp.ClientError, TimeoutError):
            pass
        latency = time.monotonic() - sent_at
        stream.samples.append(
            Sample(sent_at, latency, status, served_by, body if keep_body else b"")
        )

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.monotonic()
        total = int(rate_per_s * duration_s)
        for index in range(total):
            due = start + index / rate_per_s
            while todo and start + todo[0][0] <= due:
                todo.pop(0)[1]()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(http, time.monotonic()))
            pending.add(task)
            task.add_done_callback(pending.discard)
        for _, action in todo:
            action()
        if pending:
            await asyncio.wait(pending, timeout=35)
    stream.samples.sort(key=lambda s: s.sent_at)
    return stream
