"""Replay of the write journal once its upstream is back.

Every worker of every replica runs one replayer per journaling upstream. The store hands out
a queue's entries head of line (nobody gets an entry while another holds an earlier one), one
at a time, so a queue is replayed in acceptance order by one replayer at a time; a replayer
that dies leaves its entry to the next once its lease runs out. Exactly once comes from the
upstream (conditional create, idempotency key, msgid), never from this loop.

A queue is replayed only while an endpoint that takes writes has been healthy for its failback
hold-down, and at ``fallbacks.journal.replay_rate_per_s`` at most: recovery is a load event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping

import aiohttp
import orjson

from resilgate.errors import NoEndpoint
from resilgate.fallback import (
    FallbackRunner,
    FallbackServices,
    Replayed,
    UpstreamAnswer,
    UpstreamClient,
)
from resilgate.fleet import Fleet
from resilgate.logs import get_logger
from resilgate.selection import plan
from resilgate.state.records import JournalEntry, parsed_detail
from resilgate.state.store import StateStore
from resilgate.state.view import StateView
from resilgate.upstream import upstream_error

log = get_logger("resilgate.replay")

IDLE_S = 0.5  # between looks at an empty or not yet healthy queue
GIVE_UP_MIN_TRIES = 5  # an outage between two tries is not the entry's fault
SessionSource = Callable[[], aiohttp.ClientSession | None]
ViewSource = Callable[[], StateView | None]


class FleetClient(UpstreamClient):
    """One attempt at the best healthy endpoint that takes writes; its breaker hears of it."""

    def __init__(self, fleet: Fleet, session_of: SessionSource, view_of: ViewSource) -> None:
        self._fleet = fleet
        self._session_of = session_of
        self._view_of = view_of

    def writable_now(
        self, upstream: str, routes: Iterable[str] = (), *, waiting: bool = True
    ) -> bool:
        """Whether an endpoint that takes writes is healthy past its hold-down, and ops have
        held back neither the upstream nor any of ``routes``. ``waiting``: entries wait to be
        replayed, so the check counts as demand for a half-open endpoint's trial lease (an idle
        poll must not hold it)."""
        view = self._view_of()
        if view is not None:
            for target in (upstream, *routes):
                forced = view.mode_of(target)
                if forced is not None and forced.mode in ("fallback", "maintenance"):
                    return False
        now = time.monotonic()
        return any(
            not h.endpoint.read_only
            and not h.fenced
            and h.share(now) > 0
            and h.breaker.allows(demand=waiting)
            for h in self._fleet.runtimes[upstream].endpoints
        )

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
        runtime = self._fleet.runtimes[upstream]
        now = time.monotonic()
        candidates = [h.candidate(now) for h in runtime.endpoints]
        order = plan([c for c in candidates if c.share > 0], write=True, forced=None, draw=0.0)
        health = runtime.by_label(order[0].label) if order else None
        admission = health.breaker.admit() if health is not None else None
        if health is None or admission is None:
            raise NoEndpoint(f"no endpoint of {upstream} takes writes now")
        session = self._session_of()
        assert session is not None, "replays run while the app's client session is open"
        endpoint = health.endpoint
        started = time.perf_counter()
        try:
            async with session.request(
                method,
                endpoint.url_for(path),
                headers=dict(headers or {}),
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            health.breaker.record(admission, failed=True, latency_s=time.perf_counter() - started)
            raise upstream_error(exc, endpoint) from exc
        failed = response.status in self._fleet.config.upstreams[upstream].breaker.failure_statuses
        health.breaker.record(admission, failed=failed, latency_s=time.perf_counter() - started)
        return UpstreamAnswer(response.status, dict(response.headers), raw, endpoint.label)


class Replayer:
    """Replays the journal queues of this worker's upstreams, each in its own task."""

    def __init__(
        self, services: FallbackServices, runner: FallbackRunner, client: FleetClient
    ) -> None:
        self.services = services
        self.runner = runner
        self.client = client
        routes = services.config.routes
        self.queues = sorted(
            {
                route.upstream
                for route in routes
                if (fallback := runner.of(route)) is not None and fallback.journals
            }
        )
        self._routes = {route.name: route for route in routes}
        # A queue is held while ops force any of its journaling routes off (strict order).
        self._queue_routes = {
            queue: [
                r.name
                for r in routes
                if r.upstream == queue and (f := runner.of(r)) is not None and f.journals
            ]
            for queue in self.queues
        }
        # Per queue: the head entry being deferred, since when, and how many times: one the
        # upstream keeps failing must not hold its queue forever.
        self._deferred: dict[str, tuple[str, float, int]] = {}

    def __repr__(self) -> str:
        return f"<Replayer {self.services.replica} queues={self.queues}>"

    async def run(self) -> None:
        await asyncio.gather(*(self._work(queue) for queue in self.queues))

    async def _work(self, queue: str) -> None:
        options = self.services.config.fallbacks.journal
        interval = 1.0 / options.replay_rate_per_s
        next_at = 0.0
        # Whether entries wait: only then is the check demand for a half-open endpoint's trial
        # lease (and the replays its trials). Learnt from claims, and from the store while
        # the upstream cannot take writes.
        waiting = True
        while True:
            if not self.client.writable_now(queue, self._queue_routes[queue], waiting=waiting):
                waiting = waiting or await self._has_open(queue)
                await asyncio.sleep(IDLE_S)
                continue
            # Paced before the claim, so the wait does not eat into the entry's lease.
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                store = self.services.store
                entries = await store.journal_claim(
                    queue, self.services.replica, 1, options.claim_lease_s
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: the journal waits for it
                log.warning("replay_claim_failed", queue=queue, error=f"{exc}"[:200])
                await asyncio.sleep(options.retry_after_s)
                continue
            if not entries:
                waiting = False
                await asyncio.sleep(IDLE_S)
                continue
            waiting = True
            next_at = time.monotonic() + interval
            try:
                outcome = await self._replay_one(store, entries[0])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the outcome could not be recorded: the entry stays
                log.warning("replay_record_failed", queue=queue, error=f"{exc}"[:200])
                await asyncio.sleep(options.retry_after_s)
                continue
            if outcome.state == "accepted":
                await asyncio.sleep(options.retry_after_s)

    async def _has_open(self, queue: str) -> bool:
        try:
            stats = await self.services.store.journal_stats()
        except asyncio.CancelledError:
            raise
        except Exception:  # the store is down: nothing can be claimed anyway
            return False
        return any(q.queue == queue and q.open for q in stats)

    async def _replay_one(self, store: StateStore, entry: JournalEntry) -> Replayed:
        route = self._routes.get(entry.route)
        fallback = self.runner.of(route) if route is not None else None
        if fallback is None or not fallback.journals:
            outcome = Replayed("failed", f"no journaling fallback for route {entry.route!r}")
        else:
            try:
                outcome = await fallback.replay(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken fallback: keep what the entry recorded, retry
                log.warning(
                    "replay_failed",
                    queue=entry.queue,
                    ticket=entry.ticket,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )
                outcome = Replayed("accepted", entry.detail)
        outcome = self._give_up_if_stuck(entry, outcome)
        owner = self.services.replica
        if outcome.state == "accepted":
            # Keep the entry (and its place at the head of the queue) while we wait to retry.
            recorded = await store.journal_note(entry.ticket, owner, outcome.detail)
        else:
            recorded = await store.journal_finish(
                entry.ticket, owner, outcome.state, outcome.detail
            )
        state = outcome.state if recorded else "lease_lost"
        self.services.metrics.replays.labels(entry.queue, state).inc()
        if not recorded:  # another replayer took it over: its record stands, not ours
            log.warning("replay_lease_lost", queue=entry.queue, ticket=entry.ticket)
        log.info(
            "replay_finished" if outcome.state != "accepted" else "replay_deferred",
            queue=entry.queue,
            route=entry.route,
            ticket=entry.ticket,
            state=state,
        )
        return outcome

    def _give_up_if_stuck(self, entry: JournalEntry, outcome: Replayed) -> Replayed:
        """A head entry deferred for ``give_up_after_s`` and at least ``GIVE_UP_MIN_TRIES``
        times becomes a dead letter (``failed``) that keeps what it recorded, and its queue
        goes on."""
        if outcome.state != "accepted":
            self._deferred.pop(entry.queue, None)
            return outcome
        now = self.services.clock()
        ticket, since, tries = self._deferred.get(entry.queue, ("", now, 0))
        if ticket != entry.ticket:
            since, tries = now, 0
        tries += 1
        self._deferred[entry.queue] = (entry.ticket, since, tries)
        limit = self.services.config.fallbacks.journal.give_up_after_s
        if now - since < limit or tries < GIVE_UP_MIN_TRIES:
            return outcome
        self._deferred.pop(entry.queue, None)
        log.warning("replay_gave_up", queue=entry.queue, ticket=entry.ticket, after_s=limit)
        detail = {
            "gave_up_after_s": round(now - since),
            "tries": tries,
            "last": parsed_detail(outcome.detail),
        }
        return Replayed("failed", orjson.dumps(detail).decode())
