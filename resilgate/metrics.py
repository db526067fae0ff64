"""Prometheus metrics of one worker, in its own registry (no module-level singletons).

With ``PROMETHEUS_MULTIPROC_DIR`` set (see :mod:`resilgate.metrics_dir`) every worker writes its
values to files in that directory and :meth:`Metrics.render` exposes all workers together:
counters and histograms add up, ``livesum`` gauges add up over live workers, and
``livemostrecent`` gauges show the value a live worker set last.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from resilgate.errors import StartupError
from resilgate.health import EndpointHealth
from resilgate.metrics_dir import ENV
from resilgate.outcomes import RequestOutcome
from resilgate.selection import Candidate, plan
from resilgate.state.records import BreakerState, ModeName, QueueStats

# From a cached answer to an upstream's whole timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The text format every Prometheus reads (our names need none of 1.0.0's escaping).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
BREAKER_STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")


class Metrics:
    """The series the engine and the ops watcher update; exposed by the admin API."""

    def __init__(self) -> None:
        if os.environ.get(ENV) and not getattr(values.ValueClass, "_multiprocess", False):
            raise StartupError(
                f"{ENV} is set but prometheus_client was imported before it was: each worker "
                "would expose only its own metrics (call resilgate.metrics_dir.prepare() first)"
            )
        self.registry = CollectorRegistry(auto_describe=True)
        self._leaders: dict[str, str] = {}  # upstream -> endpoint taking most of its traffic
        self._queues: set[str] = set()  # journal queues seen, to zero those that emptied
        # (route, upstream, endpoint, status class) -> its request counter and duration
        # histogram: label lookups cost more than the updates. Bounded by the config's routes
        # and endpoints, the fallbacks and six status classes.
        self._request_series: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        registry = self.registry

        # -- traffic -----------------------------------------------------------------------
        self.requests = Counter(
            "resilgate_requests",
            "Requests answered, by route, upstream, endpoint that answered (fallback:<name> "
            "for a fallback, none for neither) and status class.",
            ["route", "upstream", "endpoint", "status_class"],
            registry=registry,
        )
        self.duration = Histogram(
            "resilgate_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.no_endpoint = Counter(
            "resilgate_no_endpoint",
            "Requests no endpoint could take (all down, fenced or full), by route.",
            ["route"],
            registry=registry,
        )

        # -- endpoints -----------------------------------------------------------------------
        self.breaker_state = Gauge(
            "resilgate_breaker_state",
            "Workers whose breaker of the endpoint is in the state (closed, open, half_open).",
            ["endpoint", "state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "resilgate_breaker_transitions",
            "Circuit breaker state changes, by endpoint and new state.",
            ["endpoint", "state"],
            registry=registry,
        )
        self.probe_changes = Counter(
            "resilgate_probe_verdicts",
            "Probe verdict changes, by endpoint and new verdict.",
            ["endpoint", "verdict"],
            registry=registry,
        )
        self.failovers = Counter(
            "resilgate_failovers",
            "Changes of the endpoint that takes most of an upstream's traffic (by health, "
            "failback ramp, fence or forced upstream mode; not by load), counted by each worker; "
            "a failback is a failover back to the primary.",
            ["upstream", "from_endpoint", "to_endpoint"],
            registry=registry,
        )

        # -- retries ------------------------------------------------------------------------
        self.retries = Counter(
            "resilgate_retries",
            "Retries and hedges on another endpoint, by upstream and whether the budget allowed.",
            ["upstream", "kind", "allowed"],
            registry=registry,
        )
        self.budget_available = Gauge(
            "resilgate_retry_budget_available",
            "Retries and hedges the upstream's retry budget still allows in its window, summed "
            "over workers.",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.budget_used = Gauge(
            "resilgate_retry_budget_used",
            "Retries and hedges taken from the upstream's retry budget in its window, summed "
            "over workers.",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=registry,
        )

        # -- fallbacks and the journal --------------------------------------------------------
        self.fallbacks = Counter(
            "resilgate_fallbacks",
            "Fallback answers by route, fallback and outcome (served, declined, failed, "
            "observe_skipped).",
            ["route", "fallback", "outcome"],
            registry=registry,
        )
        self.replays = Counter(
            "resilgate_replays",
            "Journal entries replayed, by queue and how they ended.",
            ["queue", "state"],
            registry=registry,
        )
        self.journal_open = Gauge(
            "resilgate_journal_open",
            "Journal entries waiting to be replayed (accepted or replaying), by queue.",
            ["queue"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.journal_oldest_age = Gauge(
            "resilgate_journal_oldest_age_seconds",
            "Age of the oldest open journal entry, by queue (0 when none is open).",
            ["queue"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.journal_dead = Gauge(
            "resilgate_journal_dead",
            "Dead letters (conflict or failed) waiting for a person, by queue.",
            ["queue"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )

        # -- the fleet ------------------------------------------------------------------------
        self.store_up = Gauge(
            "resilgate_store_up",
            "1 while the shared state store answers, 0 while it does not.",
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.incident_level = Gauge(
            "resilgate_incident_level",
            "Incident level of the emergency plan: 1 (worst) to 3, 0 for none.",
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.incident_share = Gauge(
            "resilgate_incident_share",
            "Share of recent weighted traffic that failed or was degraded (0 to 1).",
            multiprocess_mode="livemostrecent",
            registry=registry,
        )

    def __repr__(self) -> str:
        return f"<Metrics {len(list(self.registry.collect()))} families>"

    def observe(self, outcome: RequestOutcome) -> None:
        """Count one answered request and its duration."""
        route = outcome.route or "unmatched"
        if outcome.served_by:
            endpoint = outcome.served_by
        elif outcome.degraded:
            endpoint = f"fallback:{outcome.degraded}"
        else:
            endpoint = "none"
        status = outcome.status
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "other"
        key = (route, outcome.upstream or "none", endpoint, status_class)
        series = self._request_series.get(key)
        if series is None:
            series = (self.requests.labels(*key), self.duration.labels(route))
            self._request_series[key] = series
        series[0].inc()
        series[1].observe(outcome.duration_s)

    def set_breaker(self, endpoint: str, state: BreakerState) -> None:
        """This worker's breaker of ``endpoint`` is now in ``state``."""
        for each in BREAKER_STATES:
            self.breaker_state.labels(endpoint, each).set(1 if each == state else 0)

    def add_upstream(self, upstream: str, endpoints: Sequence[str]) -> None:
        """Every possible failover of the upstream, at 0 (a series that appears only with the
        first failover hides that first one from ``increase()``)."""
        for before in endpoints:
            for after in endpoints:
                if before != after:
                    self.failovers.labels(upstream, before, after)

    def note_leader(self, upstream: str, endpoint: str | None) -> None:
        """The endpoint that now takes most of the upstream's traffic (None: none may); a
        change from the last one is a failover. The first one seen is where traffic starts."""
        if endpoint is None:
            return  # nothing takes traffic: the failover is counted when something does
        before = self._leaders.get(upstream)
        self._leaders[upstream] = endpoint
        if before is not None and before != endpoint:
            self.failovers.labels(upstream, before, endpoint).inc()

    def set_retry_budget(self, upstream: str, used: int, allowed: int) -> None:
        """This worker's retry budget of ``upstream`` now: taken and allowed in its window."""
        self.budget_used.labels(upstream).set(used)
        self.budget_available.labels(upstream).set(max(0, allowed - used))

    def expect_queues(self, queues: Iterable[str]) -> None:
        """Journal queues that read 0 while they hold nothing (rather than being absent)."""
        self._queues |= set(queues)

    def set_journal(self, stats: Sequence[QueueStats], now: float) -> None:
        """The journal's depth per queue, ``now`` on the wall clock; queues no longer listed
        read 0."""
        listed = {queue.queue for queue in stats}
        for queue in stats:
            oldest = queue.oldest_open_at
            self.journal_open.labels(queue.queue).set(queue.open)
            self.journal_dead.labels(queue.queue).set(queue.dead)
            age = 0.0 if oldest is None else max(0.0, now - oldest)
            self.journal_oldest_age.labels(queue.queue).set(age)
        for gone in self._queues - listed:
            for gauge in (self.journal_open, self.journal_dead, self.journal_oldest_age):
                gauge.labels(gone).set(0)
        self._queues |= listed

    def set_store_up(self, up: bool) -> None:
        self.store_up.set(1 if up else 0)

    def set_incident(self, level: int, share: float) -> None:
        self.incident_level.set(level)
        self.incident_share.set(share)

    def render(self) -> tuple[bytes, str]:
        """The exposition of every worker (this one alone outside multiprocess mode), and its
        content type."""
        if os.environ.get(ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE


def traffic_leader(
    healths: Sequence[EndpointHealth], now: float, forced: ModeName | None
) -> str | None:
    """The endpoint that takes most of an upstream's reads, judged on health, failback ramp,
    fences and a forced upstream mode but not on load (a full or stalled moment is no
    failover); None when no endpoint may take traffic."""
    if forced in ("fallback", "maintenance"):
        return None
    candidates = [
        Candidate(h.endpoint, h.share(now), admits=True, full=False, stalled=False, fenced=h.fenced)
        for h in healths
    ]
    # A draw of 0.5: a ramping endpoint leads once it takes more than half of the traffic.
    order = plan(candidates, write=False, forced=forced, draw=0.5)
    return order[0].label if order else None


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sums)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
