"""An open-loop client for timelines: a fixed send rate whatever the answers do, and every
request's send time, latency, status and serving endpoint recorded (after tests/load.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

# Which endpoint served an answer, read from its headers ("" when none says).
Labeller = Callable[[CIMultiDictProxy[str]], str]


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: sent ``sent_s`` after the stream started, answered ``latency_s`` later."""

    sent_s: float
    latency_s: float
    status: int  # 0: no HTTP answer at all
    served_by: str

    @property
    def failed(self) -> bool:
        return self.status == 0 or self.status >= 500


@dataclass
class Timeline:
    """What :func:`stream` saw; ``started_at`` is the monotonic clock at its start."""

    samples: list[Sample]
    events: dict[str, float]
    started_at: float

    def mark(self, name: str, at_monotonic: float) -> None:
        self.events[name] = at_monotonic - self.started_at


async def stream(
    url: str,
    label: Labeller,
    rate_per_s: float,
    duration_s: float,
    events: dict[float, Callable[[], None]] | None = None,
    client_timeout_s: float = 10.0,
) -> Timeline:
    """GET ``url`` ``rate_per_s`` times a second for ``duration_s``, running each of ``events``
    (seconds from the start -> callable) once on the way. Returns the samples in send order
    and when each event ran (seconds from the start, by the action's name). Stops by itself:
    every request has a ``client_timeout_s`` deadline and stragglers are abandoned after it."""
    samples: list[Sample] = []
    fired: dict[str, float] = {}
    todo = sorted((events or {}).items())
    pending: set[asyncio.Task[None]] = set()
    start = time.monotonic()

    async def one(http: aiohttp.ClientSession, sent: float) -> None:
        status, served_by = 0, ""
        try:
            async with http.get(url) as response:
                await response.read()
                status, served_by = response.status, label(response.headers)
        except (aiohttp.ClientError, TimeoutError):
            pass
        samples.append(Sample(sent - start, time.monotonic() - sent, status, served_by))

    def run_due(until: float) -> None:
        while todo and start + todo[0][0] <= until:
            at, action = todo.pop(0)
            action()
            fired[getattr(action, "__name__", str(at))] = time.monotonic() - start

    connector = aiohttp.TCPConnector(limit=4000)
    timeout = aiohttp.ClientTimeout(total=client_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        total = int(rate_per_s * duration_s)
        for index in range(total):
            due = start + index / rate_per_s
            run_due(due)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(http, time.monotonic()))
            pending.add(task)
            task.add_done_callback(pending.discard)
        run_due(float("inf"))
        if pending:
            await asyncio.wait(pending, timeout=client_timeout_s + 2)
            for task in pending:
                task.cancel()
    samples.sort(key=lambda s: s.sent_s)
    return Timeline(samples, fired, start)
