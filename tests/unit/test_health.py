"""An endpoint's health on a fake clock: what counts as down, and how traffic fails back."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilgate.config import Upstream
from resilgate.health import EndpointHealth, UpstreamRuntime
from resilgate.probes import EndpointProbes
from resilgate.selection import plan
from resilgate.upstream import Cluster

HOLD_DOWN_S = 10.0
RAMP_S = 20.0
RAMP_START = 0.1
OPEN_S = 5.0


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def upstream(**failback: float) -> Upstream:
    return Upstream.model_validate(
        {
            "endpoints": [
                {"name": "dr", "url": "http://127.0.0.1:2", "priority": 1},
                {"name": "primary", "url": "http://127.0.0.1:1", "priority": 0},
            ],
            "failback": {"hold_down_s": HOLD_DOWN_S, "ramp_s": RAMP_S, "ramp_start": RAMP_START}
            | failback,
            "breaker": {"open_s": OPEN_S, "max_open_s": 40, "open_jitter": 0},
            "probes": {"http": {"rise": 2, "fall": 3}},
        }
    )


class Rig:
    """The health of ``his/primary`` on a fake clock."""

    def __init__(self, **failback: float) -> None:
        self.clock = FakeClock()
        self.upstream = upstream(**failback)
        self.runtime = UpstreamRuntime.build(
            Cluster.from_config("his", self.upstream),
            self.upstream,
            clock=self.clock,
            rng=random.Random(0),
        )
        primary = self.runtime.by_label("his/primary")
        assert primary is not None
        self.health: EndpointHealth = primary

    def share(self) -> float:
        return self.health.share(self.clock.now)

    def advance(self, seconds: float) -> float:
        self.clock.now += seconds
        return self.share()

    def open_breaker_until_half_open(self) -> None:
        self.health.breaker.trip("test")
        assert self.share() == 0.0
        self.advance(self.health.breaker.open_remaining_s)
        assert self.health.breaker.state == "half_open"

    def attach_probes(self) -> EndpointProbes:
        probes = EndpointProbes(self.health.endpoint, self.upstream.probes)
        self.health.probes = probes
        return probes


def test_runtime_holds_each_endpoint_in_priority_order_and_a_budget() -> None:
    rig = Rig()
    assert [h.endpoint.label for h in rig.runtime.endpoints] == ["his/primary", "his/dr"]
    assert rig.runtime.by_label("his/nowhere") is None
    assert rig.runtime.budget.name == "his"


def test_a_healthy_endpoint_takes_all_its_traffic() -> None:
    rig = Rig()
    assert rig.share() == 1.0
    assert rig.health.why_down() == ""
    candidate = rig.health.candidate(rig.clock.now)
    assert (candidate.share, candidate.admits, candidate.fenced) == (1.0, True, False)
    assert repr(rig.health).startswith("<EndpointHealth his/primary up, share 1.00, ")


def test_after_the_breaker_opens_traffic_holds_down_then_ramps_back() -> None:
    rig = Rig()
    rig.health.breaker.trip("test")
    assert rig.health.why_down() == "breaker open"
    assert rig.share() == 0.0
    assert repr(rig.health).startswith("<EndpointHealth his/primary breaker open, share 0.00, ")
    rig.advance(OPEN_S)  # half-open: clear from here, hold-down starts
    assert rig.health.why_down() == ""
    assert rig.advance(HOLD_DOWN_S - 0.5) == 0.0
    assert rig.advance(0.5) == pytest.approx(RAMP_START)
    assert rig.advance(RAMP_S / 2) == pytest.approx(RAMP_START + (1 - RAMP_START) / 2)
    assert rig.advance(RAMP_S / 2 - 0.5) < 1.0
    assert rig.advance(0.5) == 1.0
    assert rig.advance(3600) == 1.0


def test_half_open_trials_wait_for_the_hold_down() -> None:
    rig = Rig()
    rig.open_breaker_until_half_open()
    rig.health.breaker.trials_allowed = True
    dr_first = plan(
        [h.candidate(rig.clock.now) for h in rig.runtime.endpoints],
        write=False,
        forced=None,
        draw=0.0,
    )
    assert [e.name for e in dr_first] == ["dr"]
    rig.advance(HOLD_DOWN_S)
    trial = plan(
        [h.candidate(rig.clock.now) for h in rig.runtime.endpoints],
        write=False,
        forced=None,
        draw=0.0,
    )
    assert [e.name for e in trial] == ["primary", "dr"]  # draw 0 < ramp_start


def test_with_every_other_site_down_a_holding_endpoint_serves_at_once() -> None:
    rig = Rig()
    dr = rig.runtime.by_label("his/dr")
    assert dr is not None
    rig.open_breaker_until_half_open()
    rig.health.breaker.trials_allowed = True
    dr.fenced = True  # the other site is out too: waiting out the hold-down helps nobody
    candidates = [h.candidate(rig.clock.now) for h in rig.runtime.endpoints]
    assert [c.holding for c in candidates] == [True, False]
    only = plan(candidates, write=False, forced=None, draw=0.99)
    assert [e.name for e in only] == ["primary"]


@pytest.mark.parametrize("during", ["hold-down", "ramp"])
def test_a_new_down_episode_restarts_hold_down_and_ramp(during: str) -> None:
    rig = Rig()
    rig.open_breaker_until_half_open()
    rig.advance(HOLD_DOWN_S / 2 if during == "hold-down" else HOLD_DOWN_S + RAMP_S / 2)
    rig.health.breaker.trip("trial failed")
    assert rig.share() == 0.0
    rig.advance(rig.health.breaker.open_remaining_s)
    assert rig.health.breaker.state == "half_open"
    assert rig.advance(HOLD_DOWN_S - 0.5) == 0.0  # the whole hold-down again
    assert rig.advance(0.5) == pytest.approx(RAMP_START)  # and the ramp from its start


def test_fenced_endpoint_is_down_and_holds_down_after_the_fence_lifts() -> None:
    rig = Rig()
    rig.health.fenced = True
    assert rig.health.why_down() == "fenced"
    assert rig.share() == 0.0
    assert rig.health.candidate(rig.clock.now).fenced
    rig.advance(60)
    rig.health.fenced = False
    assert rig.share() == 0.0
    assert rig.advance(HOLD_DOWN_S) == pytest.approx(RAMP_START)


def test_open_at_a_quorum_of_replicas_is_down_though_our_breaker_is_closed() -> None:
    rig = Rig()
    rig.health.adopted = True
    assert rig.health.breaker.state == "closed"
    assert rig.health.why_down() == "open at a quorum of replicas"
    assert rig.share() == 0.0
    rig.health.adopted = False
    assert rig.share() == 0.0
    assert rig.advance(HOLD_DOWN_S - 0.5) == 0.0
    assert rig.advance(0.5) == pytest.approx(RAMP_START)


def test_probes_down_then_back_up_after_rise_passes_then_hold_down() -> None:
    rig = Rig()
    probes = rig.attach_probes()
    (check,) = probes.checks
    assert rig.share() == 1.0  # no verdict yet at start-up is not down
    for _ in range(3):
        check.record(False, "status 503")
    assert rig.health.why_down() == "probes down"
    assert rig.share() == 0.0
    check.record(True, "status 200")  # one pass of the two it needs: still down
    assert rig.advance(HOLD_DOWN_S * 3) == 0.0
    check.record(True, "status 200")
    assert probes.verdict == "up"
    assert rig.share() == 0.0
    assert rig.advance(HOLD_DOWN_S) == pytest.approx(RAMP_START)


def test_a_returning_endpoint_needs_its_probes_up_not_just_not_down() -> None:
    rig = Rig()
    rig.health.breaker.trip("test")
    assert rig.share() == 0.0
    probes = rig.attach_probes()  # probes just started: no verdict yet
    rig.advance(OPEN_S)
    assert probes.verdict == "unknown"
    assert rig.health.why_down() == ""
    assert rig.advance(HOLD_DOWN_S * 3) == 0.0
    for _ in range(2):
        probes.checks[0].record(True, "status 200")
    assert rig.share() == 0.0
    assert rig.advance(HOLD_DOWN_S) == pytest.approx(RAMP_START)


def test_no_ramp_gives_all_traffic_back_after_the_hold_down() -> None:
    rig = Rig(ramp_s=0)
    rig.open_breaker_until_half_open()
    assert rig.advance(HOLD_DOWN_S - 0.5) == 0.0
    assert rig.advance(0.5) == 1.0


def test_no_hold_down_starts_the_ramp_as_soon_as_it_is_clear() -> None:
    rig = Rig(hold_down_s=0)
    rig.health.breaker.trip("test")
    assert rig.share() == 0.0
    assert rig.advance(rig.health.breaker.open_remaining_s) == pytest.approx(RAMP_START)


# -- the failback rule against a model of it ------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.just(("trip", 0.0)),
        st.just(("fence", 0.0)),
        st.just(("unfence", 0.0)),
        st.just(("adopt", 0.0)),
        st.just(("release", 0.0)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5, 7.0, 13.0, 45.0])),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(ops=OPS, hold_down_s=st.sampled_from([0.0, 3.0, 10.0]), ramp_s=st.sampled_from([0.0, 8.0]))
def test_share_follows_the_failback_rule(
    ops: list[tuple[str, float]], hold_down_s: float, ramp_s: float
) -> None:
    rig = Rig(hold_down_s=hold_down_s, ramp_s=ramp_s)
    health = rig.health
    flags: dict[str, Any] = {"fence": ("fenced", True), "unfence": ("fenced", False)}
    flags |= {"adopt": ("adopted", True), "release": ("adopted", False)}
    returning = False  # seen down, not yet given all its traffic back
    clear_since: float | None = None  # first moment seen clear since then
    for op, seconds in ops:
        if op == "trip":
            health.breaker.trip("test")
        elif op == "advance":
            rig.clock.now += seconds
        else:
            setattr(health, *flags[op])
        now = rig.clock.now
        down = health.fenced or health.adopted or health.breaker.state == "open"
        share = health.share(now)
        if down:
            expected, returning, clear_since = 0.0, True, None
        elif not returning:
            expected = 1.0
        else:
            clear_since = now if clear_since is None else clear_since
            ramping = now - clear_since - hold_down_s
            if ramping < 0:
                expected = 0.0
            elif ramping >= ramp_s:
                expected, returning = 1.0, False
            else:
                expected = RAMP_START + (1 - RAMP_START) * ramping / ramp_s
        assert share == pytest.approx(expected), (op, now)
        assert 0.0 <= share <= 1.0
