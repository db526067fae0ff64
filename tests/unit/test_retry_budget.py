"""The retry budget on a fake clock: the floor, the share of traffic, the sliding window."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from resilgate.config import RetryBudget as RetryBudgetConfig
from resilgate.retry_budget import RetryBudget


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(
    clock: FakeClock, *, ratio: float = 0.2, min_per_s: float = 3.0, window_s: float = 10.0
) -> RetryBudget:
    config = RetryBudgetConfig(ratio=ratio, min_per_s=min_per_s, window_s=window_s)
    return RetryBudget("his", config, clock)


def spend_all(retries: RetryBudget, limit: int = 10_000) -> int:
    """Spend until refused; how many were granted."""
    granted = 0
    while retries.try_spend():
        granted += 1
        assert granted < limit, "the budget never ran out"
    return granted


def test_with_no_traffic_the_floor_allows_min_per_s_times_window() -> None:
    clock = FakeClock()
    retries = budget(clock, ratio=0.2, min_per_s=3, window_s=10)
    assert spend_all(retries) == 30
    assert retries.refused == 1
    assert not retries.try_spend()
    assert retries.refused == 2
    assert repr(retries) == "<RetryBudget his 30/30 retries for 0 requests in 10s>"


def test_heavy_traffic_allows_ratio_of_requests() -> None:
    clock = FakeClock()
    retries = budget(clock, ratio=0.2, min_per_s=3, window_s=10)
    for _ in range(1000):
        retries.note_request()
    assert retries.allowed(clock.now) == 200
    assert spend_all(retries) == 200
    assert retries.refused == 1


def test_a_zero_floor_and_zero_ratio_allow_no_retry_at_all() -> None:
    clock = FakeClock()
    retries = budget(clock, ratio=0.0, min_per_s=0.0)
    for _ in range(100):
        retries.note_request()
    assert not retries.try_spend()
    assert retries.refused == 1


def test_old_requests_leave_the_window() -> None:
    clock = FakeClock(1000.0)
    retries = budget(clock, ratio=0.2, min_per_s=3, window_s=10)
    for _ in range(1000):
        retries.note_request()
    clock.now = 1009.5  # still the window of second 1000
    assert retries.allowed(clock.now) == 200
    clock.now = 1010.0
    assert retries.allowed(clock.now) == 30  # back to the floor


def test_spent_retries_leave_the_window_and_the_budget_refills() -> None:
    clock = FakeClock(1000.0)
    retries = budget(clock, ratio=0.2, min_per_s=3, window_s=10)
    assert spend_all(retries) == 30
    clock.now = 1005.0
    assert not retries.try_spend()  # half a window later, still spent
    clock.now = 1010.0
    assert spend_all(retries) == 30
    assert retries.refused == 3


def test_retries_spread_over_the_window_only_old_ones_free_up() -> None:
    clock = FakeClock(1000.0)
    retries = budget(clock, ratio=0.0, min_per_s=1, window_s=4)
    for second in range(4):
        clock.now = 1000.0 + second
        assert retries.try_spend()
    assert not retries.try_spend()
    clock.now = 1004.0  # the retry of second 1000 left the window, the others did not
    assert retries.try_spend()
    assert not retries.try_spend()


def test_ratio_of_requests_is_not_lost_to_float_rounding() -> None:
    clock = FakeClock()
    retries = budget(clock, ratio=0.29, min_per_s=0)
    for _ in range(100):
        retries.note_request()
    assert retries.allowed(clock.now) == 29


# -- the budget against a model of its rule --------------------------------------------------

# Exact binary fractions, so that the model's arithmetic and the budget's agree to the bit.
RATIOS = st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
FLOORS = st.sampled_from([0.0, 0.5, 1.0, 3.0])
WINDOWS = st.sampled_from([1.0, 2.0, 5.0, 10.0])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(1, 20)),
        st.tuples(st.just("retry"), st.integers(1, 20)),
        st.tuples(st.just("advance"), st.sampled_from([0.25, 0.5, 1.0, 3.0, 11.0])),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(ratio=RATIOS, min_per_s=FLOORS, window_s=WINDOWS, ops=OPS)
def test_a_retry_is_allowed_exactly_while_the_window_has_room(
    ratio: float, min_per_s: float, window_s: float, ops: list[tuple[str, float]]
) -> None:
    clock = FakeClock(1000.0)
    retries = budget(clock, ratio=ratio, min_per_s=min_per_s, window_s=window_s)
    requests_at: list[float] = []
    retries_at: list[float] = []
    refused = 0

    def in_window(times: list[float]) -> int:
        # Counted per whole second: the current one and the window_s - 1 before it.
        newest = math.floor(clock.now)
        return sum(1 for t in times if math.floor(t) > newest - window_s)

    def allowed() -> int:
        share = Fraction(ratio) * in_window(requests_at)
        floor = Fraction(min_per_s) * Fraction(window_s)
        return math.floor(max(share, floor))

    for op, amount in ops:
        if op == "advance":
            clock.now += amount
            continue
        for _ in range(int(amount)):
            if op == "request":
                retries.note_request()
                requests_at.append(clock.now)
                continue
            room = in_window(retries_at) < allowed()
            assert retries.try_spend() == room
            if room:
                retries_at.append(clock.now)
            else:
                refused += 1
    assert retries.refused == refused
    assert retries.allowed(clock.now) == allowed()
