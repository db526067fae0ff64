"""One worker's endpoint health, tied to the rest of the fleet through the state store.

Breaker transitions are logged, counted and published as verdicts; other replicas' verdicts
are read from the :class:`StateView` (a quorum of open ones takes an endpoint out here too);
ops' ``maintenance`` on ``upstream/endpoint`` fences it; one replica at a time holds the trial
lease of a half-open endpoint, and only one with traffic for it. Nothing here is awaited by the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping

import aiohttp

from resilgate.breaker import Transition
from resilgate.config import Config
from resilgate.health import EndpointHealth, UpstreamRuntime
from resilgate.logs import get_logger
from resilgate.metrics import Metrics, traffic_leader
from resilgate.probes import EndpointProbes
from resilgate.state.records import Verdict
from resilgate.state.store import StateStore
from resilgate.state.view import StateView
from resilgate.upstream import Cluster

log = get_logger("resilgate.fleet")
TICK_S = 0.1
LEASE_TTL_S = 5.0
LEASE_RENEW_S = 1.5
LEASE_RETRY_S = 0.5
# A worker whose requests asked for a half-open endpoint this recently may hold its trial lease.
DEMAND_S = 2.0
REPUBLISH_S = 30.0


def replica_id() -> str:
    """This worker's name in the fleet: host and process."""
    return f"{socket.gethostname()}/{os.getpid()}"


class Fleet:
    """The health of every endpoint in this worker, and its links to the fleet."""

    def __init__(self, config: Config, clusters: Mapping[str, Cluster], metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.replica = replica_id()
        self.view: StateView | None = None
        self.runtimes: dict[str, UpstreamRuntime] = {
            name: UpstreamRuntime.build(
                cluster, config.upstreams[name], on_transition=self._on_transition
            )
            for name, cluster in clusters.items()
        }
        self._healths = {h.endpoint.label: h for rt in self.runtimes.values() for h in rt.endpoints}
        for name, runtime in self.runtimes.items():
            metrics.add_upstream(name, [health.endpoint.label for health in runtime.endpoints])
        for label, health in self._healths.items():
            metrics.set_breaker(label, health.breaker.state)
        self._outbox: asyncio.Queue[Verdict] = asyncio.Queue()
        self._leases: dict[str, asyncio.Task[None]] = {}
        self._opened_at: dict[str, float] = {}  # wall clock of our last opening
        self._recovered_at: dict[str, float] = {}  # another replica closed it after trials
        self._seen: dict[tuple[str, str], str] = {}  # (endpoint, replica) -> state seen

    def __repr__(self) -> str:
        return f"<Fleet {self.replica} {', '.join(map(repr, self._healths.values()))}>"

    def health(self, label: str) -> EndpointHealth:
        return self._healths[label]

    # -- breaker transitions (synchronous, from the request path or the tick) --------------

    def _on_transition(self, transition: Transition) -> None:
        label, new = transition.endpoint, transition.new
        event = {"open": "breaker_opened", "half_open": "breaker_half_open"}.get(
            new, "breaker_closed"
        )
        fields = {"endpoint": label, "was": transition.old, "reason": transition.reason}
        if new == "open":
            log.warning(event, open_for_s=round(transition.open_for_s, 2), **fields)
        else:
            log.info(event, **fields)
        self.metrics.breaker_transitions.labels(label, new).inc()
        self.metrics.set_breaker(label, new)
        self._outbox.put_nowait(Verdict(label, self.replica, new, time.time()))
        health = self._healths.get(label)
        if health is None:
            return
        health.share(time.monotonic())  # a down episode starts the hold-down clock
        if new == "open":
            self._opened_at[label] = time.time()
            health.load.clear_stall()  # the breaker keeps it out from here
        if new == "half_open" and label not in self._leases:
            self._leases[label] = asyncio.get_running_loop().create_task(self._trials(health))

    async def _trials(self, health: EndpointHealth) -> None:
        """Hold the fleet's trial lease of a half-open endpoint while this worker has traffic
        for it (``wants_trials``); only the holder sends trials. A worker without traffic lets
        the lease go, or never takes it: holding it, it would send no trial, and refuse the
        workers that have traffic for as long as it renews."""
        label, breaker = health.endpoint.label, health.breaker
        name = f"trial:{label}"
        held = False
        renew_at = 0.0
        try:
            while breaker.state == "half_open":
                store = self.view.store if self.view is not None else None
                if store is None:
                    held = True
                elif not breaker.wants_trials(DEMAND_S):
                    if held:
                        # No trial leaves here once the lease may be another worker's.
                        breaker.trials_allowed = held = False
                        log.info("trial_lease_left", endpoint=label, replica=self.replica)
                        with contextlib.suppress(Exception):
                            await store.release(name, self.replica)
                elif not held or time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + LEASE_RENEW_S
                    held = await self._take_lease(store, name, label, held)
                breaker.trials_allowed = held
                await asyncio.sleep(LEASE_RETRY_S)
        finally:
            self._leases.pop(label, None)
            if held and self.view is not None:
                with contextlib.suppress(Exception):
                    await self.view.store.release(name, self.replica)

    async def _take_lease(self, store: StateStore, name: str, label: str, held: bool) -> bool:
        """Take or renew a trial lease; whether this worker may send trials now."""
        try:
            holds = await store.lease(name, self.replica, LEASE_TTL_S, time.time())
        except Exception as exc:  # store down: decide from local traffic alone
            if not held:
                log.warning("trial_lease_unavailable", endpoint=label, error=str(exc))
            return True
        if holds != held:
            event = "trial_lease_taken" if holds else "trial_lease_lost"
            log.info(event, endpoint=label, replica=self.replica)
        return holds

    # -- background work --------------------------------------------------------------------

    async def run(self, view: StateView) -> None:
        """Probes, verdict publishing and the fleet tick, until cancelled."""
        self.view = view
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        ) as session:
            tasks = [
                asyncio.create_task(self._publish()),
                asyncio.create_task(self._tick()),
            ]
            for runtime in self.runtimes.values():
                probes = self.config.upstreams[runtime.name].probes
                for health in runtime.endpoints:
                    health.probes = EndpointProbes(
                        health.endpoint, probes, on_change=self._probe_changed(health)
                    )
                    tasks.append(asyncio.create_task(health.probes.run(session)))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in [*tasks, *self._leases.values()]:
                    task.cancel()
                await asyncio.gather(*tasks, *self._leases.values(), return_exceptions=True)

    def _probe_changed(self, health: EndpointHealth) -> Callable[[EndpointProbes], None]:
        def changed(probes: EndpointProbes) -> None:
            self.metrics.probe_changes.labels(health.endpoint.label, probes.verdict).inc()
            if probes.verdict == "up":
                health.load.alive()
            elif probes.verdict == "down":
                # Its breaker opens too, so the verdict reaches the fleet like any other.
                health.breaker.trip("probes down")
            health.share(time.monotonic())

        return changed

    async def _publish(self) -> None:
        while True:
            verdict = await self._outbox.get()
            if self.view is None:
                continue
            try:
                await self.view.store.put_verdict(verdict)
            except Exception as exc:  # the view logs the store outage; the verdict is local
                log.debug("verdict_not_published", endpoint=verdict.endpoint, error=str(exc))

    async def _tick(self) -> None:
        republish_at = time.monotonic()  # at once: /status shows every worker from the start
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            try:
                self._read_view()
                for health in self._healths.values():
                    health.share(now)  # moves hold-down and ramp on without traffic
                self._export(now)
            except Exception:  # logged, and the next tick tries again; probes keep running
                log.exception("fleet_tick_failed")
            if now >= republish_at:
                republish_at = now + REPUBLISH_S
                for label, health in self._healths.items():
                    state = health.breaker.state
                    self._outbox.put_nowait(Verdict(label, self.replica, state, time.time()))

    def _export(self, now: float) -> None:
        """Metrics that move with time: retry budgets, and which endpoint leads each upstream's
        traffic (a new leader is a failover)."""
        view = self.view
        for name, runtime in self.runtimes.items():
            self.metrics.set_retry_budget(name, *runtime.budget.usage())
            mode = view.mode_of(name) if view is not None else None
            leader = traffic_leader(runtime.endpoints, now, mode.mode if mode else None)
            self.metrics.note_leader(name, leader)

    def _read_view(self) -> None:
        view = self.view
        if view is None:
            return
        wall = time.time()
        open_at: dict[str, set[str]] = {}
        for verdict in view.verdicts:
            if verdict.replica == self.replica:
                continue
            key = (verdict.endpoint, verdict.replica)
            before = self._seen.get(key)
            if before != verdict.state:
                self._seen[key] = verdict.state
                if before in ("open", "half_open") and verdict.state == "closed":
                    self._recovered_at[verdict.endpoint] = verdict.at
                log.info(
                    "remote_verdict_seen",
                    endpoint=verdict.endpoint,
                    replica=verdict.replica,
                    state=verdict.state,
                    lag_ms=round((wall - verdict.at) * 1000, 1),
                )
            health = self._healths.get(verdict.endpoint)
            if health is None:
                continue
            fresh_s = self.config.upstreams[health.endpoint.upstream].breaker.verdict_fresh_s
            if verdict.state == "open" and wall - verdict.at <= fresh_s:
                open_at.setdefault(verdict.endpoint, set()).add(verdict.replica)
            if (
                verdict.state == "closed"
                and health.breaker.state == "half_open"
                and self._recovered_at.get(verdict.endpoint, 0.0)
                >= self._opened_at.get(verdict.endpoint, wall)
            ):
                # Trials there passed since we opened: no need to repeat them, whether or not we
                # hold the lease now (it moves between workers as their traffic comes and goes).
                health.breaker.close(f"trials passed at {verdict.replica}")
        for label, health in self._healths.items():
            quorum = self.config.upstreams[health.endpoint.upstream].breaker.quorum
            adopted = len(open_at.get(label, ())) >= quorum
            if adopted != health.adopted:
                health.adopted = adopted
                event = "quorum_open_adopted" if adopted else "quorum_open_released"
                log.warning(event, endpoint=label, replicas=sorted(open_at.get(label, ())))
            mode = view.mode_of(label)
            fenced = mode is not None and mode.mode == "maintenance"
            if fenced != health.fenced:
                health.fenced = fenced
                if fenced and mode is not None:
                    log.warning(
                        "endpoint_fenced", endpoint=label, actor=mode.actor, reason=mode.reason
                    )
                else:
                    log.warning("endpoint_fence_lifted", endpoint=label)
