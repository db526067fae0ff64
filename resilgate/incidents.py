"""Incident levels and early warnings: pure decisions on fleet-wide counts and a given time.

Levels follow the hospital emergency plan: 1 (worst) when more than ``level1_share`` of the
weighted recent requests failed or were degraded, 2 from ``level2_share``, 3 above
``level3_share``, 0 (none) otherwise or on fewer than ``min_requests``. A level is raised at
once and lowered only after the share stayed lower for ``calm_s``, then to the worst level seen
meanwhile: the level is never below any level the share called for within the last ``calm_s``.

An early warning is raised for an endpoint whose failure (or slow-call) rate, summed over the
fleet's breaker windows, reaches ``warning_fraction`` of its breaker's rate while its breaker is
closed everywhere; it clears below ``CLEAR_RATIO`` of that, on too little traffic, or once a
breaker is no longer closed (the breaker has taken over).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from resilgate.config import Breaker, Criticality, Incident
from resilgate.state.records import Verdict

# A warning clears once the rate is below this share of its threshold (no flapping around it).
CLEAR_RATIO = 0.8
WarningKind = Literal["failure_rate", "slow_rate"]
KINDS: tuple[WarningKind, ...] = ("failure_rate", "slow_rate")


def severity(level: int) -> int:
    """0 for no incident, then 1 (level 3) .. 3 (level 1): comparable, unlike level numbers."""
    return 0 if level == 0 else 4 - level


def _level(severity_: int) -> int:
    return 0 if severity_ == 0 else 4 - severity_


# -- incident level -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """Weighted requests of the window and the share of them that failed or were degraded."""

    requests: float
    affected: float

    @property
    def share(self) -> float:
        return self.affected / self.requests if self.requests > 0 else 0.0


def measure(
    summaries: Iterable[Mapping[str, Mapping[str, int]]], weights: Mapping[Criticality, float]
) -> Measured:
    """Sum the workers' traffic summaries (criticality -> total, affected) with the weights;
    a criticality without a weight counts nothing."""
    requests = affected = 0.0
    for summary in summaries:
        for criticality, weight in weights.items():
            counts = summary.get(criticality, {})
            requests += weight * counts.get("total", 0)
            affected += weight * counts.get("affected", 0)
    return Measured(requests, affected)


def level_for(measured: Measured, config: Incident) -> int:
    """The level the share calls for now, before any calm period."""
    if measured.requests < config.min_requests:
        return 0
    share = measured.share
    if share > config.level1_share:
        return 1
    if share >= config.level2_share:
        return 2
    if share > config.level3_share:
        return 3
    return 0


@dataclass(frozen=True, slots=True)
class IncidentState:
    """The level in force, and the calm period that may lower it."""

    level: int = 0
    since: float | None = None  # when the level was entered
    share: float = 0.0
    requests: float = 0.0
    calm_since: float | None = None  # the share has called for less since then
    calm_worst: int = 0  # the worst level called for since calm_since

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IncidentState:
        return cls(
            level=int(data.get("level", 0)),
            since=data.get("since"),
            share=float(data.get("share", 0.0)),
            requests=float(data.get("requests", 0.0)),
            calm_since=data.get("calm_since"),
            calm_worst=int(data.get("calm_worst", 0)),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """The level changed."""

    level: int
    previous: int
    share: float
    requests: float
    at: float


def step(
    state: IncidentState, measured: Measured, now: float, config: Incident
) -> tuple[IncidentState, Change | None]:
    """The state after measuring ``measured`` at ``now``, and the change if the level moved."""
    wanted = level_for(measured, config)
    current = replace(state, share=measured.share, requests=measured.requests)
    if severity(wanted) >= severity(state.level):
        current = replace(current, calm_since=None, calm_worst=0)
        if wanted == state.level:
            return current, None
        return _moved(current, state.level, wanted, now)
    if state.calm_since is None:
        current = replace(current, calm_since=now, calm_worst=wanted)
    elif severity(wanted) > severity(state.calm_worst):
        current = replace(current, calm_worst=wanted)
    if current.calm_since is None or now - current.calm_since < config.calm_s:
        return current, None
    lowered = current.calm_worst
    # A new calm period starts now if the share already calls for less than the new level.
    calm = (now, wanted) if severity(wanted) < severity(lowered) else (None, 0)
    current = replace(current, calm_since=calm[0], calm_worst=calm[1])
    return _moved(current, state.level, lowered, now)


def _moved(
    state: IncidentState, previous: int, level: int, now: float
) -> tuple[IncidentState, Change]:
    moved = replace(state, level=level, since=now)
    return moved, Change(level, previous, state.share, state.requests, now)


# -- early warning --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointCalls:
    """An endpoint's breaker windows summed over the fleet."""

    failed: int = 0
    slow: int = 0
    calls: int = 0
    closed: bool = True  # closed at every replica that reported it


def sum_endpoints(reports: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, EndpointCalls]:
    """Sum the workers' per-endpoint reports (``failed``, ``slow``, ``calls``, ``state``)."""
    summed: dict[str, EndpointCalls] = {}
    for report in reports:
        for label, window in report.items():
            before = summed.get(label, EndpointCalls())
            summed[label] = EndpointCalls(
                before.failed + int(window.get("failed", 0)),
                before.slow + int(window.get("slow", 0)),
                before.calls + int(window.get("calls", 0)),
                before.closed and window.get("state", "closed") == "closed",
            )
    return summed


@dataclass(frozen=True, slots=True)
class EarlyWarning:
    """An endpoint's rate climbing towards its breaker's threshold."""

    endpoint: str
    kind: WarningKind
    rate: float  # the latest rate seen
    threshold: float  # the warning's threshold: warning_fraction x breaker_rate
    breaker_rate: float  # the rate that opens the breaker
    calls: int
    since: float

    @property
    def key(self) -> str:
        return f"{self.endpoint} {self.kind}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EarlyWarning:
        return cls(
            endpoint=str(data["endpoint"]),
            kind="slow_rate" if data.get("kind") == "slow_rate" else "failure_rate",
            rate=float(data["rate"]),
            threshold=float(data["threshold"]),
            breaker_rate=float(data["breaker_rate"]),
            calls=int(data["calls"]),
            since=float(data["since"]),
        )


@dataclass(frozen=True, slots=True)
class WarningChange:
    """A warning raised, or cleared (then ``reason`` says why)."""

    warning: EarlyWarning
    raised: bool
    reason: str = ""


def check_warnings(
    active: Mapping[str, EarlyWarning],
    endpoints: Mapping[str, EndpointCalls],
    breaker_of: Callable[[str], Breaker | None],
    fraction: float,
    now: float,
) -> tuple[dict[str, EarlyWarning], list[WarningChange]]:
    """The warnings in force after looking at ``endpoints`` now, and what changed."""
    in_force: dict[str, EarlyWarning] = {}
    changes: list[WarningChange] = []
    for label in sorted(endpoints.keys() | {w.endpoint for w in active.values()}):
        calls = endpoints.get(label)
        breaker = breaker_of(label)
        for kind in KINDS:
            key = f"{label} {kind}"
            before = active.get(key)
            if breaker is None or calls is None:
                if before is not None:
                    changes.append(WarningChange(before, False, "endpoint no longer reported"))
                continue
            breaker_rate = (
                breaker.failure_rate if kind == "failure_rate" else breaker.slow_call_rate
            )
            counted = calls.failed if kind == "failure_rate" else calls.slow
            rate = counted / calls.calls if calls.calls else 0.0
            threshold = fraction * breaker_rate
            if before is None:
                if calls.closed and calls.calls >= breaker.min_calls and rate >= threshold:
                    warning = EarlyWarning(
                        label, kind, rate, threshold, breaker_rate, calls.calls, now
                    )
                    in_force[key] = warning
                    changes.append(WarningChange(warning, True))
                continue
            latest = replace(before, rate=rate, calls=calls.calls)
            reason = _clear_reason(calls, breaker, rate, threshold)
            if reason:
                changes.append(WarningChange(latest, False, reason))
            else:
                in_force[key] = latest
    return in_force, changes


def _clear_reason(calls: EndpointCalls, breaker: Breaker, rate: float, threshold: float) -> str:
    if not calls.closed:
        return "breaker no longer closed"
    if calls.calls < breaker.min_calls / 2:
        return "too little traffic to tell"
    if rate < CLEAR_RATIO * threshold:
        return "rate fell"
    return ""


# -- breakers opening anywhere --------------------------------------------------------------


def newly_open(
    announced: Iterable[str], verdicts: Iterable[Verdict], now: float, fresh_s: float
) -> tuple[frozenset[str], list[Verdict]]:
    """Open verdicts not yet announced, and the announced set after them.

    A key (``endpoint replica``) stays announced until that replica's breaker is seen closed
    (or its verdict is gone), so an open / half-open / open cycle is announced once. A verdict
    older than ``fresh_s`` (a replica that left) is not announced.
    """
    before = set(announced)
    after: set[str] = set()
    opened: list[Verdict] = []
    for verdict in verdicts:
        key = f"{verdict.endpoint} {verdict.replica}"
        if verdict.state == "closed":
            continue
        if key in before:
            after.add(key)
        elif verdict.state == "open" and now - verdict.at <= fresh_s:
            after.add(key)
            opened.append(verdict)
    return frozenset(after), sorted(opened, key=lambda v: v.at)
