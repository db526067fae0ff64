"""An endpoint's health as one worker judges it, from every signal it has.

The rule (also in the README): an endpoint is **down** while any of these holds: its breaker
is open (this worker's own traffic; probes going down open it too), its probes say down, ops
fenced it (``maintenance``), or a quorum of other replicas has its breaker open. It is
**clear** when none holds and its probes, if it has any, say up. After being down it gets
traffic again only once it has been clear for the hold-down time; then its share ramps from
``ramp_start`` to all of it over ``ramp_s``. Half-open trials are part of that returning
traffic, so they also wait for the hold-down.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from resilgate.breaker import EndpointBreaker, Transition
from resilgate.config import Upstream
from resilgate.load import EndpointLoad
from resilgate.probes import EndpointProbes
from resilgate.retry_budget import RetryBudget
from resilgate.selection import Candidate
from resilgate.upstream import Cluster, Endpoint


class EndpointHealth:
    """Breaker, probes, load and failback state of one endpoint in one worker."""

    def __init__(
        self,
        endpoint: Endpoint,
        upstream: Upstream,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._failback = upstream.failback
        self._clock = clock
        self.breaker = EndpointBreaker(
            endpoint.label, upstream.breaker, clock=clock, rng=rng, on_transition=on_transition
        )
        self.load = EndpointLoad(endpoint.label, upstream.max_in_flight, upstream.stall, clock)
        self.probes: EndpointProbes | None = None  # attached when probes start
        self.fenced = False
        self.adopted = False  # a quorum of other replicas has this endpoint's breaker open
        self._returning = False  # it was down and has not yet got all its traffic back
        self._clear_since: float | None = None

    def __repr__(self) -> str:
        now = self._clock()
        return (
            f"<EndpointHealth {self.endpoint.label} {self.why_down() or 'up'}, "
            f"share {self.share(now):.2f}, {self.breaker!r}>"
        )

    def why_down(self) -> str:
        """Why the endpoint is down now, or "" when it is not."""
        if self.fenced:
            return "fenced"
        if self.breaker.state == "open":
            return "breaker open"
        if self.probes is not None and self.probes.verdict == "down":
            return "probes down"
        if self.adopted:
            return "open at a quorum of replicas"
        return ""

    def _clear(self) -> bool:
        return not self.why_down() and (
            self.probes is None or not self.probes.checks or self.probes.verdict == "up"
        )

    def share(self, now: float) -> float:
        """Share of traffic it may take now: 0 when down or holding down, 1 when fully back."""
        if self.why_down():
            self._returning = True
            self._clear_since = None
            return 0.0
        if not self._returning:
            return 1.0
        if not self._clear():
            self._clear_since = None
            return 0.0
        if self._clear_since is None:
            self._clear_since = now
        ramping = now - self._clear_since - self._failback.hold_down_s
        if ramping < 0:
            return 0.0
        ramp_s = self._failback.ramp_s
        start = self._failback.ramp_start
        if ramp_s <= 0 or ramping >= ramp_s:
            self._returning = False
            return 1.0
        return start + (1 - start) * ramping / ramp_s

    def candidate(self, now: float) -> Candidate:
        share = self.share(now)
        return Candidate(
            endpoint=self.endpoint,
            share=share,
            admits=self.breaker.allows(),
            full=self.load.full,
            stalled=self.load.stalled(),
            fenced=self.fenced,
            holding=share == 0 and self._clear_since is not None,
        )


@dataclass
class UpstreamRuntime:
    """The endpoints' health and the retry budget of one upstream in one worker."""

    name: str
    endpoints: tuple[EndpointHealth, ...]
    budget: RetryBudget

    def __repr__(self) -> str:
        return f"<UpstreamRuntime {self.name}: {', '.join(map(repr, self.endpoints))}>"

    def by_label(self, label: str) -> EndpointHealth | None:
        for health in self.endpoints:
            if health.endpoint.label == label:
                return health
        return None

    @classmethod
    def build(
        cls,
        cluster: Cluster,
        upstream: Upstream,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> UpstreamRuntime:
        endpoints = tuple(
            EndpointHealth(e, upstream, clock=clock, rng=rng, on_transition=on_transition)
            for e in cluster.endpoints
        )
        return cls(cluster.name, endpoints, RetryBudget(cluster.name, upstream.retry_budget, clock))
