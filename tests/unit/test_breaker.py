"""The endpoint breaker's policy, on a fake clock: opening, open times, half-open trials."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from typing import Any

from circuitbreaker import CircuitBreaker
from hypothesis import given, settings
from hypothesis import strategies as st

from resilgate.breaker import Admission, EndpointBreaker, Transition
from resilgate.config import Breaker

LABEL = "his/primary"
BASE: dict[str, Any] = {
    "consecutive_failures": 3,
    "window_s": 10,
    "min_calls": 10,
    "failure_rate": 0.5,
    "slow_call_s": 1.0,
    "slow_call_rate": 0.8,
    "open_s": 5,
    "max_open_s": 40,
    "open_jitter": 0,
    "half_open_trials": 2,
    "close_after": 3,
}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A breaker on a fake clock, with the transitions it emitted."""

    def __init__(self, seed: int = 0, **overrides: Any) -> None:
        self.clock = FakeClock()
        self.config = Breaker.model_validate(BASE | overrides)
        self.seen: list[Transition] = []
        self.breaker = EndpointBreaker(
            LABEL,
            self.config,
            clock=self.clock,
            rng=random.Random(seed),
            on_transition=self.seen.append,
        )

    def call(self, *, failed: bool = False, latency_s: float = 0.01) -> None:
        admission = self.breaker.admit()
        assert admission is not None
        self.breaker.record(admission, failed=failed, latency_s=latency_s)

    def to_half_open(self) -> None:
        self.clock.now += self.breaker.open_remaining_s
        assert self.breaker.state == "half_open"
        self.breaker.trials_allowed = True

    def trial(self) -> Admission:
        admission = self.breaker.admit()
        assert admission is not None
        assert admission.trial
        return admission

    def changes(self) -> list[tuple[str, str, str]]:
        return [(t.old, t.new, t.reason) for t in self.seen]


def test_consecutive_failures_open() -> None:
    rig = Rig()
    rig.call(failed=True)
    rig.call(failed=True)
    assert rig.breaker.state == "closed"
    rig.call(failed=True)
    assert rig.breaker.state == "open"
    assert rig.changes() == [("closed", "open", "3 failures in a row")]
    assert rig.seen[0].at == 1000.0
    assert rig.seen[0].open_for_s == 5.0
    assert rig.breaker.window() == (0, 0, 0)  # cleared on opening
    assert repr(rig.breaker) == "<EndpointBreaker his/primary OPEN 5s left, 3 failures in a row>"


def test_success_resets_in_a_row_but_not_the_window_rate() -> None:
    # Fail, succeed, fail, succeed...: never two failures in a row, half of all calls failed.
    pattern = [i % 2 == 0 for i in range(200)]
    package = CircuitBreaker(failure_threshold=3, name="package-default")
    for failed in pattern:
        with contextlib.suppress(OSError), package:
            if failed:
                raise OSError("upstream down")
    assert package.state == "closed"

    rig = Rig()
    for failed in pattern[:9]:
        rig.call(failed=failed)
    assert (
        repr(rig.breaker) == "<EndpointBreaker his/primary CLOSED, 5/9 failed in 10s, 1 in a row>"
    )
    rig.call(failed=pattern[9])
    assert rig.changes() == [("closed", "open", "5/10 failed in 10s")]


def test_rates_need_min_calls() -> None:
    rig = Rig(consecutive_failures=100)
    for _ in range(9):
        rig.call(failed=True)
    assert rig.breaker.state == "closed"
    assert rig.breaker.window() == (9, 0, 9)
    rig.call(failed=True)
    assert rig.changes() == [("closed", "open", "10/10 failed in 10s")]

    slow = Rig()
    for _ in range(9):
        slow.call(latency_s=2.0)
    assert slow.breaker.state == "closed"
    slow.call(latency_s=2.0)
    assert slow.changes() == [("closed", "open", "10/10 slow in 10s")]


def test_slow_call_rate_opens_and_counts_failed_slow_calls() -> None:
    rig = Rig()
    rig.call(latency_s=0.5)
    rig.call(latency_s=0.5, failed=True)
    rig.call(latency_s=1.0, failed=True)  # exactly slow_call_s is slow
    assert rig.breaker.window() == (2, 1, 3)
    for _ in range(6):
        rig.call(latency_s=3.0)
    assert repr(rig.breaker) == (
        "<EndpointBreaker his/primary CLOSED, 2/9 failed, 7 slow in 10s, 0 in a row>"
    )
    rig.call(latency_s=3.0)
    assert rig.changes() == [("closed", "open", "8/10 slow in 10s")]


def test_window_slides_by_whole_seconds() -> None:
    rig = Rig(consecutive_failures=100)
    for _ in range(9):
        rig.call(failed=True)
    rig.clock.now = 1009.99  # the 1000 bucket is still the oldest of ten
    assert rig.breaker.window() == (9, 0, 9)
    rig.clock.now = 1010.0
    assert rig.breaker.window() == (0, 0, 0)
    rig.call(failed=True)
    assert rig.breaker.state == "closed"  # the first nine no longer count towards min_calls


def test_open_time_doubles_up_to_the_cap() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    for _ in range(5):
        rig.to_half_open()
        rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
    assert [t.open_for_s for t in rig.seen if t.new == "open"] == [5, 10, 20, 40, 40, 40]
    assert rig.changes()[1:3] == [
        ("open", "half_open", "open time over"),
        ("half_open", "open", "trial failed"),
    ]


def test_open_time_jitter_stays_in_bounds_and_follows_the_rng() -> None:
    def open_times(seed: int) -> list[float]:
        rig = Rig(seed, open_jitter=0.2)
        rig.breaker.trip("quorum")
        for _ in range(7):
            rig.to_half_open()
            rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
        return [t.open_for_s for t in rig.seen if t.new == "open"]

    times = open_times(seed=1)
    for got, base in zip(times, [5, 10, 20, 40, 40, 40, 40, 40], strict=True):
        assert base * 0.8 <= got <= base * 1.2
    assert len(set(times)) == len(times)  # jitter applied to every opening
    assert open_times(seed=1) == times


def test_openings_count_resets_after_staying_closed_for_max_open_s() -> None:
    rig = Rig()
    rig.breaker.trip("first")
    rig.breaker.close("other replica's trials passed")
    rig.clock.now += 39.9
    rig.breaker.trip("second")  # closed for less than max_open_s: still a repeat
    rig.breaker.close("again")
    rig.clock.now += 40
    rig.breaker.trip("third")
    assert [t.open_for_s for t in rig.seen if t.new == "open"] == [5, 10, 5]


def test_half_open_once_the_open_time_ran_out() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.clock.now += 4.99
    assert rig.breaker.state == "open"
    assert not rig.breaker.allows()
    assert rig.breaker.admit() is None
    rig.clock.now += 2  # noticed late: dated when it ran out
    assert rig.breaker.state == "half_open"
    assert rig.seen[-1] == Transition(LABEL, "open", "half_open", "open time over", 1005.0)
    assert rig.breaker.open_remaining_s == 0.0


def test_trials_wait_for_the_lease_each_time() -> None:
    rig = Rig()
    rig.breaker.trials_allowed = True  # set while open: the entry into half-open clears it
    rig.breaker.trip("quorum")
    rig.clock.now += 5
    assert rig.breaker.state == "half_open"
    assert rig.breaker.trials_allowed is False
    assert not rig.breaker.allows()
    assert rig.breaker.admit() is None
    assert repr(rig.breaker) == (
        "<EndpointBreaker his/primary HALF_OPEN 0/2 trials out, 0/3 passed, no trial lease>"
    )
    rig.breaker.trials_allowed = True
    assert rig.breaker.allows()
    rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
    rig.clock.now += 10
    assert rig.breaker.state == "half_open"
    assert rig.breaker.trials_allowed is False


def test_every_call_that_asks_is_demand_even_a_refused_one() -> None:
    rig = Rig()
    assert rig.breaker.idle_s == math.inf
    rig.breaker.trip("quorum")
    rig.clock.now += 5
    assert rig.breaker.state == "half_open"
    assert "no trial lease" in repr(rig.breaker)
    assert rig.breaker.window() == (0, 0, 0)
    assert rig.breaker.idle_s == math.inf  # looking at it asks for nothing
    assert not rig.breaker.wants_trials(2.0)
    assert rig.breaker.admit() is None  # another worker holds the lease: refused, yet asked
    assert rig.breaker.idle_s == 0.0
    assert rig.breaker.wants_trials(2.0)
    rig.clock.now += 2.0
    assert rig.breaker.wants_trials(2.0)
    rig.clock.now += 0.01
    assert not rig.breaker.wants_trials(2.0)
    assert not rig.breaker.allows(demand=False)  # a poll that would send nothing
    assert not rig.breaker.wants_trials(2.0)
    assert not rig.breaker.allows()
    assert rig.breaker.wants_trials(2.0)
    assert rig.breaker.idle_s == 0.0


def test_trials_out_keep_the_lease_wanted_until_they_are_back() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.to_half_open()
    first, second = rig.trial(), rig.trial()
    assert rig.breaker.trials_out == 2
    rig.clock.now += 30  # trials slower than the demand window: still this worker's
    assert rig.breaker.wants_trials(2.0)
    rig.breaker.record(first, failed=False, latency_s=30)
    rig.breaker.abandon(second)
    assert rig.breaker.trials_out == 0
    assert not rig.breaker.wants_trials(2.0)


def test_only_a_half_open_breaker_wants_trials() -> None:
    rig = Rig()
    assert rig.breaker.allows()
    assert rig.breaker.idle_s == 0.0
    assert not rig.breaker.wants_trials(2.0)
    rig.breaker.trip("quorum")
    assert not rig.breaker.allows()
    assert not rig.breaker.wants_trials(2.0)
    rig.to_half_open()
    rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
    assert rig.breaker.state == "open"
    assert rig.breaker.trials_out == 0
    assert not rig.breaker.wants_trials(2.0)


def test_half_open_lets_only_so_many_trials_out_at_once() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.to_half_open()
    first, _second = rig.trial(), rig.trial()
    assert not rig.breaker.allows()
    assert rig.breaker.admit() is None
    rig.breaker.record(first, failed=False, latency_s=0.01)
    assert repr(rig.breaker) == "<EndpointBreaker his/primary HALF_OPEN 1/2 trials out, 1/3 passed>"
    rig.trial()
    assert rig.breaker.admit() is None


def test_close_after_passed_trials_in_a_row() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.to_half_open()
    for _ in range(2):
        rig.breaker.record(rig.trial(), failed=False, latency_s=0.01)
    assert rig.breaker.state == "half_open"
    rig.breaker.record(rig.trial(), failed=False, latency_s=3.0)  # slow but answered: passes
    assert rig.breaker.state == "closed"
    assert rig.changes()[-1] == ("half_open", "closed", "3 trials passed")
    assert rig.seen[-1].open_for_s == 0.0
    assert (
        repr(rig.breaker) == "<EndpointBreaker his/primary CLOSED, 0/0 failed in 10s, 0 in a row>"
    )
    admission = rig.breaker.admit()
    assert admission is not None
    assert not admission.trial


def test_failed_trial_reopens_for_longer_and_starts_counting_again() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.to_half_open()
    rig.breaker.record(rig.trial(), failed=False, latency_s=0.01)
    rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
    assert rig.breaker.state == "open"
    assert rig.seen[-1].open_for_s == 10
    assert repr(rig.breaker) == "<EndpointBreaker his/primary OPEN 10s left, trial failed>"
    rig.to_half_open()
    assert repr(rig.breaker) == "<EndpointBreaker his/primary HALF_OPEN 0/2 trials out, 0/3 passed>"


def test_abandoned_trial_frees_its_slot_and_counts_nothing() -> None:
    rig = Rig()
    rig.breaker.trip("quorum")
    rig.to_half_open()
    first, _second = rig.trial(), rig.trial()
    rig.breaker.abandon(first)
    assert repr(rig.breaker) == "<EndpointBreaker his/primary HALF_OPEN 1/2 trials out, 0/3 passed>"
    rig.trial()
    assert rig.breaker.admit() is None

    closed = Rig()
    admission = closed.breaker.admit()
    assert admission is not None
    closed.breaker.abandon(admission)
    assert closed.breaker.window() == (0, 0, 0)


def test_late_answers_from_before_an_opening_count_nothing() -> None:
    rig = Rig()
    late = rig.breaker.admit()
    assert late is not None
    for _ in range(3):
        rig.call(failed=True)
    opened = list(rig.seen)
    rig.clock.now += 1
    rig.breaker.record(late, failed=True, latency_s=9.0)
    assert rig.breaker.open_remaining_s == 4.0
    assert rig.seen == opened

    rig.to_half_open()
    stale_trial = rig.trial()
    rig.breaker.record(late, failed=True, latency_s=9.0)
    assert rig.breaker.state == "half_open"
    rig.breaker.record(rig.trial(), failed=True, latency_s=0.01)
    rig.to_half_open()
    # The stale trial neither passes nor frees a slot of this half-open period.
    rig.breaker.record(stale_trial, failed=False, latency_s=0.01)
    rig.breaker.abandon(stale_trial)
    assert repr(rig.breaker) == "<EndpointBreaker his/primary HALF_OPEN 0/2 trials out, 0/3 passed>"

    for _ in range(3):
        rig.breaker.record(rig.trial(), failed=False, latency_s=0.01)
    rig.breaker.record(late, failed=True, latency_s=9.0)
    assert rig.breaker.window() == (0, 0, 0)
    assert rig.breaker.state == "closed"


def test_trip_and_close_from_any_state() -> None:
    rig = Rig()
    rig.breaker.close("already closed")
    rig.breaker.trip("fleet quorum: 2 replicas open")
    remaining = rig.breaker.open_remaining_s
    rig.breaker.trip("again")  # already open: keeps its open time
    assert rig.breaker.open_remaining_s == remaining
    rig.to_half_open()
    rig.breaker.trip("fleet quorum")  # from half-open: the next, longer open time
    rig.breaker.close("another replica's trials passed")
    assert rig.changes() == [
        ("closed", "open", "fleet quorum: 2 replicas open"),
        ("open", "half_open", "open time over"),
        ("half_open", "open", "fleet quorum"),
        ("open", "closed", "another replica's trials passed"),
    ]
    assert [t.open_for_s for t in rig.seen] == [5, 0, 10, 0]
    assert rig.breaker.allows()


def test_each_transition_is_emitted_once() -> None:
    rig = Rig()
    for _ in range(3):
        rig.call(failed=True)
    rig.clock.now += 5
    for _ in range(5):
        assert rig.breaker.state == "half_open"
        repr(rig.breaker)
        rig.breaker.allows()
    rig.breaker.trials_allowed = True
    for _ in range(3):
        rig.breaker.record(rig.trial(), failed=False, latency_s=0.01)
    rig.breaker.window()
    assert [(t.old, t.new) for t in rig.seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert [t.at for t in rig.seen] == [1000.0, 1005.0, 1005.0]


def test_a_failing_callback_does_not_break_the_breaker() -> None:
    def explode(transition: Transition) -> None:
        raise RuntimeError(f"metrics exporter down at {transition.new}")

    clock = FakeClock()
    breaker = EndpointBreaker(
        LABEL, Breaker.model_validate(BASE), clock=clock, on_transition=explode
    )
    breaker.trip("quorum")
    clock.now += 5
    assert breaker.state == "half_open"
    breaker.close("trials passed elsewhere")
    assert breaker.state == "closed"


# Property tests: random interleavings of everything a caller and the clock can do.

CONFIGS = st.builds(
    lambda trials, close_after, open_s, cap, jitter, in_a_row, min_calls: Breaker(
        half_open_trials=trials,
        close_after=close_after,
        open_s=open_s,
        max_open_s=open_s * cap,
        open_jitter=jitter,
        consecutive_failures=in_a_row,
        min_calls=min_calls,
        window_s=5,
        slow_call_s=1.0,
    ),
    st.integers(1, 3),
    st.integers(1, 3),
    st.floats(0.5, 10),
    st.floats(1, 16),
    st.floats(0, 0.5),
    st.integers(1, 4),
    st.integers(1, 5),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit")),
        st.tuples(st.just("record"), st.integers(0, 9), st.booleans(), st.sampled_from([0, 2])),
        st.tuples(st.just("abandon"), st.integers(0, 9)),
        st.tuples(st.just("advance"), st.floats(0, 40)),
        st.tuples(st.just("lease"), st.booleans()),
        st.tuples(st.just("trip")),
        st.tuples(st.just("close")),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(config=CONFIGS, ops=OPS, seed=st.integers(0, 2**32))
def test_invariants_hold_for_any_sequence(
    config: Breaker, ops: list[tuple[Any, ...]], seed: int
) -> None:
    clock = FakeClock()
    seen: list[Transition] = []
    breaker = EndpointBreaker(
        LABEL, config, clock=clock, rng=random.Random(seed), on_transition=seen.append
    )
    low = config.open_s * (1 - config.open_jitter)
    high = config.max_open_s * (1 + config.open_jitter) * (1 + 1e-9)
    # Calls in flight, each with the number of transitions seen when it was admitted.
    out: list[tuple[Admission, int]] = []
    for op, *args in ops:
        if op == "admit":
            state, expected = breaker.state, breaker.allows()
            admission = breaker.admit()
            assert (admission is not None) == expected
            if admission is not None:
                assert state != "open"
                assert admission.trial == (state == "half_open")
                out.append((admission, len(seen)))
        elif op in ("record", "abandon") and out:
            admission, _ = out.pop(args[0] % len(out))
            if op == "record":
                breaker.record(admission, failed=args[1], latency_s=args[2])
            else:
                breaker.abandon(admission)
        elif op == "advance":
            clock.now += args[0]
        elif op == "lease":
            breaker.trials_allowed = args[0]
        elif op == "trip":
            breaker.trip("tripped")
        elif op == "close":
            breaker.close("closed elsewhere")

        state = breaker.state
        this_period = [a for a, era in out if a.trial and era == len(seen)]
        assert len(this_period) <= config.half_open_trials
        assert breaker.trials_out == len(this_period)
        if breaker.wants_trials(2.0):
            assert state == "half_open"
        if state == "open":
            assert breaker.admit() is None
            assert 0 < breaker.open_remaining_s <= high
    for before, after in itertools.pairwise(seen):
        assert after.old == before.new != after.new
    for transition in seen:
        if transition.new == "open":
            assert low <= transition.open_for_s <= high
