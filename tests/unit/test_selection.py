"""Endpoint choice: which endpoints a request tries, in which order, for every state."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from resilgate.selection import Candidate, plan
from resilgate.state.records import ModeName
from resilgate.upstream import Endpoint

PRIMARY = Endpoint("his", "primary", 0, False, "http://127.0.0.1:9001")
DR = Endpoint("his", "dr", 1, False, "http://127.0.0.1:9002")
REPLICA = Endpoint("his", "replica", 1, True, "http://127.0.0.1:9003")
REMOTE_DR = Endpoint("his", "remote-dr", 2, False, "http://127.0.0.1:9004")


def healthy(
    endpoint: Endpoint,
    *,
    share: float = 1.0,
    admits: bool = True,
    full: bool = False,
    stalled: bool = False,
    fenced: bool = False,
) -> Candidate:
    return Candidate(
        endpoint, share=share, admits=admits, full=full, stalled=stalled, fenced=fenced
    )


def names(endpoints: list[Endpoint]) -> list[str]:
    return [endpoint.name for endpoint in endpoints]


def test_all_healthy_lowest_priority_number_first() -> None:
    candidates = [healthy(REMOTE_DR), healthy(DR), healthy(PRIMARY)]
    assert names(plan(candidates, write=False, forced=None, draw=0.5)) == [
        "primary",
        "dr",
        "remote-dr",
    ]


def test_primary_down_or_breaker_open_fails_over_to_dr() -> None:
    down = [healthy(PRIMARY, share=0.0), healthy(DR)]
    assert names(plan(down, write=False, forced=None, draw=0.0)) == ["dr"]
    refusing = [healthy(PRIMARY, admits=False), healthy(DR)]
    assert names(plan(refusing, write=False, forced=None, draw=0.0)) == ["dr"]


def test_nothing_usable_gives_an_empty_plan() -> None:
    candidates = [healthy(PRIMARY, share=0.0), healthy(DR, admits=False)]
    assert plan(candidates, write=False, forced=None, draw=0.0) == []


def test_a_holding_endpoint_is_used_only_when_nothing_else_can_serve() -> None:
    holding = healthy(PRIMARY, share=0.0)
    holding = replace(holding, holding=True)
    assert names(plan([holding, healthy(DR)], write=False, forced=None, draw=0.0)) == ["dr"]
    alone = [holding, healthy(DR, share=0.0)]
    assert names(plan(alone, write=False, forced=None, draw=0.0)) == ["primary"]
    refusing = [replace(holding, admits=False), healthy(DR, share=0.0)]
    assert plan(refusing, write=False, forced=None, draw=0.0) == []


def test_a_write_never_goes_to_a_read_only_replica_a_read_may() -> None:
    candidates = [healthy(PRIMARY, share=0.0), healthy(REPLICA)]
    assert plan(candidates, write=True, forced=None, draw=0.0) == []
    assert names(plan(candidates, write=False, forced=None, draw=0.0)) == ["replica"]


def test_a_fenced_endpoint_is_never_used() -> None:
    candidates = [healthy(PRIMARY, fenced=True), healthy(DR)]
    assert names(plan(candidates, write=False, forced=None, draw=0.0)) == ["dr"]


def test_a_full_bulkhead_skips_the_endpoint() -> None:
    candidates = [healthy(PRIMARY, full=True), healthy(DR)]
    assert names(plan(candidates, write=False, forced=None, draw=0.0)) == ["dr"]


def test_a_stalled_endpoint_goes_last_but_stays_in_the_plan() -> None:
    candidates = [healthy(PRIMARY, stalled=True), healthy(DR), healthy(REMOTE_DR)]
    assert names(plan(candidates, write=False, forced=None, draw=0.0)) == [
        "dr",
        "remote-dr",
        "primary",
    ]


def test_a_ramping_endpoint_comes_first_for_its_share_of_draws() -> None:
    candidates = [healthy(PRIMARY, share=0.25), healthy(DR)]
    firsts = [
        plan(candidates, write=False, forced=None, draw=i / 1000)[0].name for i in range(1000)
    ]
    assert firsts.count("primary") == 250
    assert firsts[:250] == ["primary"] * 250  # draws below the share
    # Otherwise right after the next one, not dropped.
    assert names(plan(candidates, write=False, forced=None, draw=0.25)) == ["dr", "primary"]


def test_a_ramping_endpoint_does_not_overtake_into_a_stalled_one() -> None:
    candidates = [healthy(PRIMARY, share=0.1), healthy(DR, stalled=True)]
    assert names(plan(candidates, write=False, forced=None, draw=0.9)) == ["primary", "dr"]


def test_forced_primary_uses_the_primary_whatever_its_health() -> None:
    candidates = [
        healthy(PRIMARY, share=0.0, admits=False, stalled=True),
        healthy(DR),
    ]
    assert names(plan(candidates, write=False, forced="primary", draw=0.0)) == ["primary"]


def test_forced_primary_with_a_full_primary_does_not_spill_to_dr() -> None:
    candidates = [healthy(PRIMARY, full=True), healthy(DR)]
    assert plan(candidates, write=False, forced="primary", draw=0.0) == []


def test_forced_dr_skips_a_healthy_primary() -> None:
    candidates = [healthy(PRIMARY), healthy(DR), healthy(REMOTE_DR)]
    assert names(plan(candidates, write=False, forced="dr", draw=0.0)) == ["dr", "remote-dr"]
    # ... but still respects DR's own health.
    candidates = [healthy(PRIMARY), healthy(DR, share=0.0), healthy(REMOTE_DR)]
    assert names(plan(candidates, write=False, forced="dr", draw=0.0)) == ["remote-dr"]


# -- properties over any set of candidates ------------------------------------------------------


@st.composite
def candidate_sets(draw: st.DrawFn) -> list[Candidate]:
    count = draw(st.integers(0, 6))
    result = []
    for i in range(count):
        endpoint = Endpoint(
            "his",
            f"site{i}",
            draw(st.integers(0, 3)),
            draw(st.booleans()),
            f"http://127.0.0.1:{9000 + i}",
        )
        result.append(
            Candidate(
                endpoint,
                share=draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1)),
                admits=draw(st.booleans()),
                full=draw(st.booleans()),
                stalled=draw(st.booleans()),
                fenced=draw(st.booleans()),
            )
        )
    return result


FORCED: st.SearchStrategy[ModeName | None] = st.sampled_from([None, "auto", "primary", "dr"])
DRAWS = st.floats(0, 1, exclude_max=True)


@settings(max_examples=100, deadline=None)
@given(candidates=candidate_sets(), write=st.booleans(), forced=FORCED, draw=DRAWS)
def test_plan_only_ever_holds_endpoints_allowed_to_take_the_request(
    candidates: list[Candidate], write: bool, forced: ModeName | None, draw: float
) -> None:
    result = plan(candidates, write=write, forced=forced, draw=draw)
    by_endpoint = {c.endpoint: c for c in candidates}
    assert len(set(result)) == len(result)
    assert set(result) <= set(by_endpoint)
    chosen = [by_endpoint[endpoint] for endpoint in result]
    assert not any(c.fenced or c.full for c in chosen)
    if write:
        assert not any(c.endpoint.read_only for c in chosen)
    if forced == "primary":
        assert len({c.endpoint.priority for c in chosen}) <= 1
        return
    assert all(c.share > 0 and c.admits for c in chosen)
    if forced == "dr":
        assert all(c.endpoint.priority > 0 for c in chosen)
    # Nothing eligible is left out.
    eligible = {
        c.endpoint
        for c in candidates
        if not c.fenced
        and not c.full
        and c.share > 0
        and c.admits
        and not (write and c.endpoint.read_only)
        and not (forced == "dr" and c.endpoint.priority == 0)
    }
    assert set(result) == eligible
    stalled = [c.stalled for c in chosen]
    assert stalled == sorted(stalled), "a stalled endpoint went before a live one"


@settings(max_examples=60, deadline=None)
@given(candidates=candidate_sets(), write=st.booleans(), draw=DRAWS)
def test_without_ramping_or_stalls_the_order_is_by_priority(
    candidates: list[Candidate], write: bool, draw: float
) -> None:
    steady = [replace(c, share=1.0 if c.share > 0 else 0.0, stalled=False) for c in candidates]
    result = plan(steady, write=write, forced=None, draw=draw)
    priorities = [endpoint.priority for endpoint in result]
    assert priorities == sorted(priorities)


@settings(max_examples=60, deadline=None)
@given(candidates=candidate_sets(), write=st.booleans(), draw=DRAWS)
def test_forced_primary_picks_the_lowest_usable_tier_minus_full_endpoints(
    candidates: list[Candidate], write: bool, draw: float
) -> None:
    result = plan(candidates, write=write, forced="primary", draw=draw)
    usable = [c for c in candidates if not c.fenced and not (write and c.endpoint.read_only)]
    if not usable:
        assert result == []
        return
    tier = min(c.endpoint.priority for c in usable)
    assert set(result) == {c.endpoint for c in usable if c.endpoint.priority == tier and not c.full}
