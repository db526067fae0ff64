"""The circuit breaker of one endpoint: our policy around the ``circuitbreaker`` package.

The package keeps the closed/open/half-open state machine: it opens through its own failure
path, derives half-open from ``open_remaining`` and closes with ``reset()``. What it lacks is
decided here, synchronously and on an injected clock: a time-based window of failure and slow
rates, open times that double with jitter, and a bounded, leased set of half-open trials.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker

from resilgate.config import Breaker
from resilgate.logs import get_logger
from resilgate.state.records import BreakerState

log = get_logger("resilgate.breaker")
_STATES: dict[str, BreakerState] = {
    STATE_CLOSED: "closed",
    STATE_OPEN: "open",
    STATE_HALF_OPEN: "half_open",
}


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a breaker's state, as handed to ``on_transition``."""

    endpoint: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float
    open_for_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Admission:
    """A call let through; hand it back to ``record`` or ``abandon`` exactly once.

    ``epoch`` names the breaker state it was admitted in: an outcome arriving after the state
    changed is stale and counts nothing.
    """

    trial: bool
    epoch: int


class _Circuit(CircuitBreaker):
    """The package's state machine on our clock. Never decorated, so never in its monitor."""

    def __init__(self, label: str, open_s: float, clock: Callable[[], float]) -> None:
        # A threshold of 1 makes every failure the package sees an opening: we decide when.
        super().__init__(failure_threshold=1, recovery_timeout=open_s, name=label)
        self._clock = clock
        self._opened = clock()

    @property
    def open_remaining(self) -> float:
        return self._opened + self._recovery_timeout - self._clock()

    @property
    def phase(self) -> BreakerState:
        return _STATES[self.state]

    @property
    def opened_until(self) -> float:
        return self._opened + self._recovery_timeout

    def open_for(self, seconds: float) -> None:
        self._recovery_timeout = seconds
        self._CircuitBreaker__call_failed()
        self._opened = self._clock()


@dataclass(slots=True)
class _Bucket:
    second: int
    calls: int = 0
    failed: int = 0
    slow: int = 0


class _Window:
    """Calls of the last ``seconds`` seconds, in 1-second buckets with running totals."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._span = max(1, math.ceil(seconds))
        self._buckets: deque[_Bucket] = deque()
        self.calls = self.failed = self.slow = 0

    def add(self, now: float, *, failed: bool, slow: bool) -> None:
        self._evict(now)
        second = math.floor(now)
        if not self._buckets or self._buckets[-1].second < second:
            self._buckets.append(_Bucket(second))
        bucket = self._buckets[-1]
        bucket.calls += 1
        bucket.failed += failed
        bucket.slow += slow
        self.calls += 1
        self.failed += failed
        self.slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._evict(now)
        return self.failed, self.slow, self.calls

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failed = self.slow = 0

    def _evict(self, now: float) -> None:
        oldest = math.floor(now) - self._span + 1
        while self._buckets and self._buckets[0].second < oldest:
            gone = self._buckets.popleft()
            self.calls -= gone.calls
            self.failed -= gone.failed
            self.slow -= gone.slow


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class EndpointBreaker:
    """Decides whether calls to one endpoint go through; emits every state change once.

    Closed: opens on ``consecutive_failures`` in a row, or once the window holds ``min_calls``
    and the failure or slow-call share reaches its rate. Open: for ``open_s`` doubling with
    each opening in a row, capped and jittered. Half-open: up to ``half_open_trials`` trials at
    once while ``trials_allowed`` (the engine's fleet lease, meant for a worker that
    ``wants_trials``); ``close_after`` passed trials close it, one failed trial opens it again.
    """

    def __init__(
        self,
        label: str,
        config: Breaker,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.label = label
        self.trials_allowed = False
        self._config = config
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_transition = on_transition
        self._circuit = _Circuit(label, config.open_s, clock)
        self._window = _Window(config.window_s)
        # The state last announced: the package derives half-open silently, we notice it.
        self._announced: BreakerState = "closed"
        self._epoch = 0
        self._in_a_row = 0
        self._openings = 0
        self._closed_since = clock()
        self._open_reason = ""
        self._trials_out = 0
        self._trials_passed = 0
        self._asked_at = -math.inf  # the last call that asked, let through or not

    @property
    def state(self) -> BreakerState:
        """The state now; reading it announces an open time that has run out."""
        return self._current()

    @property
    def open_remaining_s(self) -> float:
        return self._circuit.open_remaining if self.state == "open" else 0.0

    @property
    def trials_out(self) -> int:
        """Trials admitted in this half-open period and not yet back; 0 in other states."""
        return self._trials_out if self.state == "half_open" else 0

    @property
    def idle_s(self) -> float:
        """Seconds since a call last asked (``allows`` or ``admit``); inf if none ever did."""
        return self._clock() - self._asked_at

    def wants_trials(self, demand_s: float) -> bool:
        """Half-open, with calls that asked within ``demand_s`` or trials still out: this
        worker has traffic to send trials with, so the trial lease is of use here."""
        return self.state == "half_open" and (self.idle_s <= demand_s or self._trials_out > 0)

    def allows(self, *, demand: bool = True) -> bool:
        """Whether ``admit`` would let a call through now (reserves nothing). It counts as a
        call asking, even when refused, unless ``demand`` is False (a poll that sends nothing)."""
        if demand:
            self._asked_at = self._clock()
        return self._admissible(self._current())

    def admit(self) -> Admission | None:
        """Reserve a call: a plain one when closed, a trial when half-open, else None."""
        self._asked_at = self._clock()
        state = self._current()
        if not self._admissible(state):
            return None
        trial = state == "half_open"
        if trial:
            self._trials_out += 1
        return Admission(trial=trial, epoch=self._epoch)

    def record(self, admission: Admission, *, failed: bool, latency_s: float) -> None:
        """The outcome of an admitted call; a stale admission (state changed since) is ignored."""
        self._current()
        if admission.epoch != self._epoch:
            return
        if admission.trial:
            self._trials_out -= 1
            if failed:
                self._open("trial failed")
                return
            self._trials_passed += 1
            if self._trials_passed >= self._config.close_after:
                self._close(_count(self._trials_passed, "trial") + " passed")
            return
        config = self._config
        self._in_a_row = self._in_a_row + 1 if failed else 0
        self._window.add(self._clock(), failed=failed, slow=latency_s >= config.slow_call_s)
        failed_n, slow_n, calls = self._window.totals(self._clock())
        span = f"in {self._window.seconds:g}s"
        if self._in_a_row >= config.consecutive_failures:
            self._open(_count(self._in_a_row, "failure") + " in a row")
        elif calls >= config.min_calls and failed_n / calls >= config.failure_rate:
            self._open(f"{failed_n}/{calls} failed {span}")
        elif calls >= config.min_calls and slow_n / calls >= config.slow_call_rate:
            self._open(f"{slow_n}/{calls} slow {span}")

    def abandon(self, admission: Admission) -> None:
        """A call that ended without an outcome (e.g. cancelled): frees its trial slot."""
        self._current()
        if admission.trial and admission.epoch == self._epoch:
            self._trials_out -= 1

    def trip(self, reason: str) -> None:
        """Open now with the next open time, unless already open."""
        if self.state != "open":
            self._open(reason)

    def close(self, reason: str) -> None:
        """Close now, unless already closed."""
        if self.state != "closed":
            self._close(reason)

    def window(self) -> tuple[int, int, int]:
        """(failed, slow, calls) in the current window."""
        return self._window.totals(self._clock())

    def __repr__(self) -> str:
        state = self.state
        head = f"<EndpointBreaker {self.label} {state.upper()}"
        if state == "open":
            return f"{head} {math.ceil(self.open_remaining_s)}s left, {self._open_reason}>"
        if state == "half_open":
            config = self._config
            lease = "" if self.trials_allowed else ", no trial lease"
            return (
                f"{head} {self._trials_out}/{config.half_open_trials} trials out, "
                f"{self._trials_passed}/{config.close_after} passed{lease}>"
            )
        failed, slow, calls = self.window()
        rates = f"{failed}/{calls} failed, {slow} slow" if slow else f"{failed}/{calls} failed"
        return f"{head}, {rates} in {self._window.seconds:g}s, {self._in_a_row} in a row>"

    def _current(self) -> BreakerState:
        phase = self._circuit.phase
        if phase == "half_open" and self._announced == "open":
            self._trials_out = self._trials_passed = 0
            self.trials_allowed = False
            # Dated when the open time ran out, not when someone happened to look.
            self._announce("half_open", "open time over", at=self._circuit.opened_until)
        return phase

    def _admissible(self, state: BreakerState) -> bool:
        if state == "half_open":
            return self.trials_allowed and self._trials_out < self._config.half_open_trials
        return state == "closed"

    def _open(self, reason: str) -> None:
        config = self._config
        now = self._clock()
        if self._announced == "closed" and now - self._closed_since >= config.max_open_s:
            self._openings = 0
        self._openings += 1
        # The exponent is capped only so that a long flapping run cannot overflow a float.
        base = min(config.open_s * 2.0 ** min(self._openings - 1, 64), config.max_open_s)
        open_for = base * self._rng.uniform(1 - config.open_jitter, 1 + config.open_jitter)
        self._circuit.open_for(open_for)
        self._window.clear()
        self._in_a_row = 0
        self._open_reason = reason
        self._announce("open", reason, at=now, open_for_s=open_for)

    def _close(self, reason: str) -> None:
        self._circuit.reset()
        self._closed_since = self._clock()
        self._trials_out = self._trials_passed = 0
        self._announce("closed", reason, at=self._closed_since)

    def _announce(
        self, new: BreakerState, reason: str, *, at: float, open_for_s: float = 0.0
    ) -> None:
        old, self._announced = self._announced, new
        self._epoch += 1
        if self._on_transition is None:
            return
        # The callback may read this breaker (its state is already final) but not break it.
        try:
            self._on_transition(Transition(self.label, old, new, reason, at, open_for_s))
        except Exception:
            log.exception("breaker_callback_failed", endpoint=self.label, state=new)
