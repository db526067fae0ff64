"""What a fallback is, and how the engine runs one.

A fallback is a small class with named hooks (the hospital's live in ``fallbacks/``):

- ``serve``: answer a request no endpoint can take (``None``: this one it cannot serve);
- ``observe``: see a live successful answer of its routes (the stale cache fills from these);
- ``replay``: apply one of its journal entries upstream once the upstream is back;
- ``start`` / ``stop``: background work of its own (numbers leased ahead, for instance).

The engine calls every hook under a guard: a fallback that fails is logged and counted, and the
``notice`` fallback answers instead. Every fallback answer carries ``X-Resilgate-Degraded``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from resilgate.config import Config, Route
from resilgate.logs import get_logger
from resilgate.metrics import Metrics
from resilgate.state.records import JournalEntry, JournalState
from resilgate.state.store import StateStore, StoreUnavailable

log = get_logger("resilgate.fallback")

DEGRADED = "X-Resilgate-Degraded"
TICKETS_PATH = "/_resilgate/tickets/"  # + ticket: where its state can be read
MAX_OBSERVING = 64  # live answers being handed to fallbacks at once, per worker


@dataclass(frozen=True, slots=True)
class FallbackRequest:
    """A client request as a fallback sees it (the body read whole, if it had one)."""

    route: Route
    method: str
    path: str
    query: Mapping[str, str]
    raw_path: str  # path and query as the client sent them
    headers: CIMultiDictProxy[str]
    body: bytes | None
    request_id: str
    reason: str  # why no endpoint served it, for logs and the notice


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """What an upstream answered to a replayed request."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    endpoint: str  # ``upstream/endpoint``

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


class UpstreamClient:
    """Sends one request to the best endpoint of an upstream that takes writes (replays).

    Raises ``resilgate.errors.UpstreamError`` (or ``NoEndpoint``) when no answer came; an
    ``UpstreamUnreachable`` means nothing was sent.
    """

    async def send(
        self,
        upstream: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> UpstreamAnswer:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Replayed:
    """How one replay ended: ``applied``, ``duplicate``, ``conflict`` or ``failed`` finish the
    entry (the last two are dead letters for a person); ``accepted`` hands it back to be tried
    again later (the upstream could not take it yet), and stops its queue until then."""

    state: JournalState
    detail: str


@dataclass
class FallbackServices:
    """What fallbacks may use; reached through the engine, never through globals."""

    config: Config
    metrics: Metrics
    replica: str  # this process, as the store's lease owner
    client: UpstreamClient
    store_of: Callable[[], StateStore | None]
    clock: Callable[[], float] = time.time
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def store(self) -> StateStore:
        store = self.store_of()
        if store is None:
            raise StoreUnavailable("the state store is not open yet")
        return store

    def spawn(self, work: Awaitable[None], what: str) -> None:
        """Run ``work`` in the background; a failure is logged, never raised."""

        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fallback_task_failed", task=what, error=_short(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_ticket(self, prefix: str) -> str:
        """A ticket nobody can guess or collide with, e.g. ``J-20250320-091200-3f9a0c1b2d4e``."""
        stamp = datetime.fromtimestamp(self.clock()).strftime("%Y%m%d-%H%M%S")
        return f"{prefix}-{stamp}-{secrets.token_hex(6)}"

    async def journal(self, request: FallbackRequest, ticket: str, payload: bytes) -> JournalEntry:
        """Append an entry for ``request`` to the journal queue of its route's upstream,
        durably (spooled locally while Redis is unreachable), and log it (``journal_accepted``);
        raises StoreUnavailable (logged ``journal_unstored``) if even that failed."""
        route = request.route
        entry = JournalEntry(ticket, route.name, payload, self.clock(), queue=route.upstream)
        try:
            stored = await self.store.journal_append(entry)
        except StoreUnavailable as exc:
            log.warning(
                "journal_unstored",
                route=route.name,
                ticket=ticket,
                request_id=request.request_id,
                error=_short(exc),
            )
            raise
        log.info(
            "journal_accepted",
            route=route.name,
            queue=stored.queue,
            ticket=ticket,
            seq=stored.seq,  # 0: spooled locally until the store is back
            request_id=request.request_id,
        )
        return stored

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Fallback:
    """A degraded path; subclasses set ``name`` and override the hooks they need."""

    name: ClassVar[str] = ""
    journals: ClassVar[bool] = False  # its answers leave journal entries to ``replay``

    def __init__(self, services: FallbackServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    async def start(self) -> None:
        """Begin background work; called once the state store is open."""

    async def stop(self) -> None:
        """End background work."""

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        """Answer ``request``; None when this fallback has no answer for it (notice answers)."""
        return None

    def observes(self, route: Route, method: str) -> bool:
        """Whether ``observe`` wants live answers to ``method`` on ``route``."""
        return False

    async def observe(
        self, request: FallbackRequest, status: int, headers: Mapping[str, str], body: bytes
    ) -> None:
        """See a live answer that ``observes`` asked for (read whole)."""

    async def replay(self, entry: JournalEntry) -> Replayed:
        """Apply one journal entry of this fallback upstream, exactly once."""
        raise NotImplementedError(f"fallback {self.name} journals nothing")


def degraded(
    name: str,
    status: int,
    body: Any,
    request_id: str,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    """A fallback's answer: JSON ``body`` (bytes are sent as they are), marked degraded."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    answer = web.Response(status=status, body=raw, content_type=content_type)
    answer.headers.update(headers or {})
    answer.headers[DEGRADED] = name
    answer.headers["X-Request-ID"] = request_id
    answer.headers["Cache-Control"] = "no-store"
    return answer


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class FallbackRunner:
    """The fallbacks the routes name (and ``notice``, the answer of last resort), run under a
    guard: a fallback that declines or fails is logged and counted, and the notice answers."""

    def __init__(self, services: FallbackServices, registry: Mapping[str, type[Fallback]]) -> None:
        self.services = services
        wanted = {route.fallback for route in services.config.routes if route.fallback}
        unknown = sorted(wanted - set(registry))
        if unknown or "notice" not in registry:
            missing = ", ".join(unknown or ["notice"])
            raise ValueError(f"no fallback implementation named {missing}")
        self.by_name: dict[str, Fallback] = {
            name: registry[name](services) for name in sorted(wanted | {"notice"})
        }
        self._observing = 0

    def __repr__(self) -> str:
        return f"<FallbackRunner {', '.join(self.by_name)}>"

    def of(self, route: Route) -> Fallback | None:
        return self.by_name.get(route.fallback) if route.fallback else None

    async def start(self) -> None:
        for fallback in self.by_name.values():
            try:
                await fallback.start()
            except Exception as exc:
                log.warning("fallback_start_failed", fallback=fallback.name, error=_short(exc))

    async def stop(self) -> None:
        for fallback in self.by_name.values():
            try:
                await fallback.stop()
            except Exception as exc:
                log.warning("fallback_stop_failed", fallback=fallback.name, error=_short(exc))
        await self.services.cancel_tasks()

    async def answer(self, request: FallbackRequest) -> web.StreamResponse:
        """The route's fallback answer, or the notice when it has none or fails."""
        route = request.route
        fallback = self.of(route)
        served = fallback.name if fallback else "notice"
        answer: web.StreamResponse | None = None
        if fallback is not None and fallback.name != "notice":
            try:
                answer = await fallback.serve(request)
            except Exception as exc:
                self._count(route, fallback.name, "failed")
                log.warning(
                    "fallback_failed",
                    fallback=fallback.name,
                    route=route.name,
                    request_id=request.request_id,
                    error=_short(exc),
                )
            else:
                if answer is None:
                    self._count(route, fallback.name, "declined")
            if answer is None:
                served = "notice"
        if answer is None:
            answer = await self.by_name["notice"].serve(request)
            assert answer is not None, "the notice always answers"
        self._count(route, served, "served")
        log.info(
            "fallback_served",
            fallback=served,
            route=route.name,
            request_id=request.request_id,
            status=answer.status,
            reason=request.reason,
        )
        return answer

    def observes(self, route: Route, method: str) -> bool:
        fallback = self.of(route)
        return fallback is not None and fallback.observes(route, method)

    def observe(
        self, request: FallbackRequest, status: int, headers: Mapping[str, str], body: bytes
    ) -> None:
        """Hand a live answer to the route's fallback in the background (never delays it).
        Beyond ``MAX_OBSERVING`` at once the answer is skipped: a burst must not pile up
        bodies and store writes behind a slow store."""
        fallback = self.of(request.route)
        if fallback is None:
            return
        if self._observing >= MAX_OBSERVING:
            self._count(request.route, fallback.name, "observe_skipped")
            return
        self._observing += 1

        async def observing(fallback: Fallback) -> None:
            try:
                await fallback.observe(request, status, headers, body)
            finally:
                self._observing -= 1

        self.services.spawn(observing(fallback), f"{fallback.name}.observe")

    def _count(self, route: Route, fallback: str, outcome: str) -> None:
        self.services.metrics.fallbacks.labels(route.name, fallback, outcome).inc()
