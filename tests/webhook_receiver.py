"""A real webhook receiver for tests: an HTTP server on a loopback port, in its own thread.

It records every POST with its arrival time and answers ``fail_status`` to the first
``fail_first`` of them (``fail_next`` adds more), 204 to the rest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True, slots=True)
class Post:
    """One POST as it arrived, and what the receiver answered."""

    at: float  # time.time() on arrival
    monotonic: float
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)
        return data

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class WebhookReceiver:
    """Start with ``with WebhookReceiver() as hooks:``; ``hooks.url`` is the webhook URL."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        self.fail_status = fail_status
        self._failures_left = fail_first
        self._posts: list[Post] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __repr__(self) -> str:
        return f"<WebhookReceiver :{self.port} {len(self._posts)} posts>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._failures_left += count

    @property
    def posts(self) -> list[Post]:
        """Every POST so far, in arrival order."""
        with self._lock:
            return list(self._posts)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The accepted events (named ``name``, if given), in arrival order."""
        return [
            p.event
            for p in self.posts
            if p.accepted and (name is None or p.event.get("event") == name)
        ]

    def arrivals(self, name: str) -> list[float]:
        """Arrival times (monotonic) of the accepted events named ``name``."""
        return [p.monotonic for p in self.posts if p.accepted and p.event.get("event") == name]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            failing = self._failures_left > 0
            self._failures_left -= failing
            status = self.fail_status if failing else 204
            self._posts.append(
                Post(time.time(), time.monotonic(), dict(request.headers), body, status)
            )
        return web.Response(status=status)

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port: int = self._runner.addresses[0][1]
        return port

    def start(self) -> WebhookReceiver:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
