"""One endpoint's load on a fake clock: the bulkhead, smoothed latency, stall verdicts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilgate.config import Stall
from resilgate.load import STALL_MAX_S, EndpointLoad

LABEL = "his/primary"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock, *, max_in_flight: int = 8, **stall: Any) -> EndpointLoad:
    config = Stall.model_validate({"factor": 10, "floor_s": 0.05, "min_pending": 3} | stall)
    return EndpointLoad(LABEL, max_in_flight, config, clock)


def answer_after(load: EndpointLoad, clock: FakeClock, seconds: float) -> None:
    attempt = load.start()
    clock.now += seconds
    load.answered(attempt)
    load.finished(attempt)


def test_bulkhead_is_full_at_max_in_flight_and_frees_when_attempts_finish() -> None:
    clock = FakeClock()
    load = make(clock, max_in_flight=2)
    first = load.start()
    assert not load.full
    second = load.start()
    assert load.full
    assert load.in_flight == 2
    load.answered(first)  # answered but still streaming: still counts
    assert load.full
    load.finished(first)
    assert not load.full
    load.finished(second)
    assert load.in_flight == 0


def test_before_any_answer_stall_detection_is_patient() -> None:
    clock = FakeClock()
    assert make(clock).stall_after_s() == 1.0
    assert make(clock, floor_s=2.5).stall_after_s() == 2.5


def test_latency_is_smoothed_like_rfc_6298() -> None:
    clock = FakeClock()
    load = make(clock)
    answer_after(load, clock, 0.1)
    # srtt 0.1, rttvar 0.05: 10 * (0.1 + 4 * 0.05)
    assert load.stall_after_s() == pytest.approx(3.0)
    answer_after(load, clock, 0.1)
    # rttvar 0.75 * 0.05 + 0.25 * 0; srtt unchanged
    assert load.stall_after_s() == pytest.approx(10 * (0.1 + 4 * 0.0375))
    answer_after(load, clock, 0.9)
    # rttvar from the old srtt: 0.75 * 0.0375 + 0.25 * 0.8; srtt 0.875 * 0.1 + 0.125 * 0.9
    assert load.stall_after_s() == pytest.approx(10 * (0.2 + 4 * 0.228125))


def test_stall_threshold_follows_the_endpoint_down_to_the_floor() -> None:
    clock = FakeClock()
    load = make(clock, floor_s=0.05)
    answer_after(load, clock, 2.0)
    slow = load.stall_after_s()
    assert slow == pytest.approx(60.0)
    for _ in range(100):
        answer_after(load, clock, 0.001)
    assert load.stall_after_s() == 0.05


def test_waiting_requests_and_no_answer_for_stall_after_is_a_stall() -> None:
    clock = FakeClock()
    load = make(clock)
    answer_after(load, clock, 0.125)  # stall after 10 * (0.125 + 4 * 0.0625) = 3.75s
    for _ in range(3):
        load.start()
    clock.now += 3.5
    assert not load.stalled()
    clock.now += 0.25
    assert load.stalled()
    assert repr(load) == (
        "<EndpointLoad his/primary 3/8 in flight, 3 waiting, stall after 3750ms, STALLED 0.00s>"
    )
    clock.now += 1.0
    assert repr(load).endswith("STALLED 1.00s>")


def test_fewer_than_min_pending_waiting_is_never_a_stall() -> None:
    clock = FakeClock()
    load = make(clock, min_pending=3)
    load.start()
    load.start()
    clock.now += 3600
    assert not load.stalled()
    load.start()
    assert load.stalled()


def test_an_answer_to_any_request_restarts_the_wait() -> None:
    clock = FakeClock()
    load = make(clock)
    waiting = [load.start() for _ in range(4)]
    clock.now += 0.5
    load.answered(waiting[-1])  # the newest answers; the older three still wait
    after = load.stall_after_s()
    clock.now += after - 0.01
    assert not load.stalled()  # the oldest waited longer than that, but an answer came since
    clock.now += 0.02
    assert load.stalled()


def test_stall_verdict_sticks_after_the_waiting_requests_give_up() -> None:
    clock = FakeClock()
    load = make(clock)
    waiting = [load.start() for _ in range(3)]
    clock.now += 1.0
    assert load.stalled()
    for attempt in waiting:  # timed out, no answer
        load.finished(attempt)
    clock.now += STALL_MAX_S - 0.5
    assert load.stalled()
    clock.now += 0.5
    assert not load.stalled()  # expired: nobody confirmed it
    assert load.stalled_since is None


@pytest.mark.parametrize("clear", ["answer", "alive", "clear_stall"])
def test_stall_verdict_is_cleared(clear: str) -> None:
    clock = FakeClock()
    load = make(clock)
    waiting = [load.start() for _ in range(4)]
    clock.now += 1.0
    assert load.stalled()
    if clear == "answer":
        load.answered(waiting.pop())
    elif clear == "alive":
        load.alive()  # a probe got an answer
    else:
        for attempt in waiting:
            load.finished(attempt)
        load.clear_stall()  # the breaker took over
    assert not load.stalled()
    assert "STALLED" not in repr(load)


def test_a_disabled_detector_never_calls_a_stall() -> None:
    clock = FakeClock()
    load = make(clock, enabled=False)
    for _ in range(10):
        load.start()
    clock.now += 3600
    assert not load.stalled()


# -- invariants over any sequence -----------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.just(("start", 0.0)),
        st.just(("answer", 0.0)),
        st.just(("finish", 0.0)),
        st.just(("alive", 0.0)),
        st.tuples(st.just("advance"), st.floats(0.001, 40.0)),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(ops=OPS, min_pending=st.integers(1, 4), enabled=st.booleans())
def test_stall_verdicts_need_enough_waiting_and_silence(
    ops: list[tuple[str, float]], min_pending: int, enabled: bool
) -> None:
    clock = FakeClock()
    load = make(clock, min_pending=min_pending, enabled=enabled)
    waiting: list[int] = []
    in_flight: list[int] = []
    started: dict[int, float] = {}
    most_waiting = 0
    for op, seconds in ops:
        heard = False
        if op == "start":
            attempt = load.start()
            started[attempt] = clock.now
            waiting.append(attempt)
            in_flight.append(attempt)
        elif op == "answer" and waiting:
            load.answered(waiting.pop(0))
            heard = True
        elif op == "finish" and in_flight:
            attempt = in_flight.pop(0)
            load.finished(attempt)
            if attempt in waiting:
                waiting.remove(attempt)
        elif op == "alive":
            load.alive()
            heard = True
        elif op == "advance":
            clock.now += seconds
        most_waiting = max(most_waiting, len(waiting))
        stalled = load.stalled()
        assert load.in_flight == len(in_flight)
        assert load.full == (len(in_flight) >= load.max_in_flight)
        assert load.stall_after_s() >= 0.05
        if heard:
            assert not stalled, "an answer did not clear the stall"
        silent_since = max([load.last_answer_at, *(started[a] for a in waiting[:1])])
        if (
            enabled
            and len(waiting) >= min_pending
            and clock.now - silent_since >= load.stall_after_s()
        ):
            assert stalled, "requests waited in silence, no stall called"
        if stalled:
            assert enabled
            assert most_waiting >= min_pending
            assert clock.now - load.last_answer_at >= load.stall_after_s()
