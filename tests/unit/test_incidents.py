"""Incident levels, early warnings and the watcher that applies them, on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from resilgate.alerts import AlertSender
from resilgate.config import Breaker, Config, Incident
from resilgate.fleet import Fleet
from resilgate.incidents import (
    EndpointCalls,
    IncidentState,
    Measured,
    check_warnings,
    level_for,
    measure,
    newly_open,
    severity,
    step,
    sum_endpoints,
)
from resilgate.metrics import Metrics
from resilgate.outcomes import RequestOutcome
from resilgate.state.memory import MemoryStore
from resilgate.state.records import ForcedMode, Verdict
from resilgate.state.redis import RedisStore
from resilgate.state.store import StateStore, StoreUnavailable
from resilgate.state.view import StateView
from resilgate.traffic import TrafficWindow
from resilgate.upstream import clusters_from
from resilgate.watch import Watcher
from tests.conftest import wait_until_async
from tests.redis_server import RedisServer
from tests.webhook_receiver import WebhookReceiver

CALM_S = 30.0


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def incident(**overrides: Any) -> Incident:
    return Incident.model_validate({"min_requests": 20, "calm_s": CALM_S, **overrides})


def core(total: int, affected: int) -> dict[str, dict[str, int]]:
    return {"core": {"total": total, "affected": affected}}


# -- measuring ----------------------------------------------------------------------------------


def test_the_share_is_weighted_by_criticality_and_summed_over_workers() -> None:
    one = {"core": {"total": 100, "affected": 50}, "support": {"total": 100, "affected": 100}}
    two = {"core": {"total": 100, "affected": 10}, "reporting": {"total": 50, "affected": 50}}
    by_default = measure([one, two], incident().weights)
    assert by_default == Measured(requests=200, affected=60)  # core alone decides
    weighted = measure([one, two], {"core": 1.0, "support": 0.5, "reporting": 0.0})
    assert weighted == Measured(requests=250, affected=110)
    assert weighted.share == pytest.approx(0.44)


@pytest.mark.parametrize(
    ("requests", "affected", "level"),
    [
        (100, 0, 0),
        (100, 1, 3),
        (100, 19, 3),
        (100, 20, 2),  # from level2_share up
        (100, 50, 2),  # level 1 only above level1_share
        (100, 51, 1),
        (19, 19, 0),  # fewer than min_requests: no level declared
        (20, 20, 1),
    ],
)
def test_levels_follow_the_emergency_plan(requests: int, affected: int, level: int) -> None:
    assert level_for(Measured(requests, affected), incident()) == level


# -- raising and lowering ---------------------------------------------------------------------


def run_levels(
    shares: Sequence[tuple[float, float]], config: Incident
) -> list[tuple[float, int, int | None]]:
    """(time, share) steps -> (time, level after, level changed to or None)."""
    state = IncidentState()
    seen = []
    for at, share in shares:
        state, change = step(state, Measured(100, 100 * share), at, config)
        seen.append((at, state.level, change.level if change else None))
    return seen


def test_a_level_is_raised_at_once_and_lowered_after_the_calm_period() -> None:
    steps = run_levels([(0, 0.0), (1, 0.6), (2, 0.0), (31, 0.0), (32, 0.0)], incident())
    assert steps == [(0, 0, None), (1, 1, 1), (2, 1, None), (31, 1, None), (32, 0, 0)]


def test_lowering_goes_to_the_worst_level_seen_during_the_calm_period() -> None:
    # Level 1, then 30 s at level-2 and level-3 shares: down to 2, then 30 s more to 3.
    shares = [(0, 0.6), (10, 0.3), (20, 0.1), (40, 0.1), (60, 0.1), (70, 0.1)]
    levels = [level for _, level, _ in run_levels(shares, incident())]
    assert levels == [1, 1, 1, 2, 2, 3]


def test_a_share_back_at_the_level_restarts_the_calm_period() -> None:
    shares = [(0, 0.6), (10, 0.0), (25, 0.7), (50, 0.0), (79, 0.0), (80, 0.0)]
    levels = [level for _, level, _ in run_levels(shares, incident())]
    assert levels == [1, 1, 1, 1, 1, 0]


def test_a_change_carries_what_it_was_measured_on() -> None:
    state, change = step(IncidentState(), Measured(400, 100), 5.0, incident())
    assert change is not None
    assert (change.level, change.previous, change.share, change.requests) == (2, 0, 0.25, 400)
    assert state.since == 5.0
    assert IncidentState.from_json(orjson.loads(orjson.dumps(state.to_json()))) == state


levels_of_shares = st.sampled_from([0.0, 0.1, 0.3, 0.6])


@settings(max_examples=300, deadline=None)
@given(
    calm_s=st.sampled_from([0.0, 3.0, 10.0]),
    steps=st.lists(
        st.tuples(st.floats(0.1, 5.0), levels_of_shares, st.integers(0, 60)), max_size=60
    ),
)
def test_the_level_is_never_below_what_the_share_called_for_within_calm_s(
    calm_s: float, steps: list[tuple[float, float, int]]
) -> None:
    config = incident(calm_s=calm_s)
    state, now = IncidentState(), 0.0
    wanted: list[tuple[float, int]] = []
    for gap, share, requests in steps:
        now += gap
        measured = Measured(requests, requests * share)
        before = state.level
        state, change = step(state, measured, now, config)
        assert (change is None) == (state.level == before)
        wanted.append((now, level_for(measured, config)))
        recent = [level for at, level in wanted if at >= now - calm_s]
        assert all(severity(state.level) >= severity(level) for level in recent)


@settings(max_examples=200, deadline=None)
@given(
    calm_s=st.sampled_from([0.0, 3.0, 10.0]),
    before=st.lists(levels_of_shares, max_size=20),
    settled=levels_of_shares,
)
def test_a_steady_share_settles_its_level_within_two_calm_periods(
    calm_s: float, before: list[float], settled: float
) -> None:
    config = incident(calm_s=calm_s)
    state, now = IncidentState(), 0.0
    for share in before:
        now += 1.0
        state, _ = step(state, Measured(100, 100 * share), now, config)
    start = now
    while now <= start + 2 * calm_s + 1:
        now += 1.0
        state, _ = step(state, Measured(100, 100 * settled), now, config)
    assert state.level == level_for(Measured(100, 100 * settled), config)


# -- early warning ----------------------------------------------------------------------------

BREAKER = Breaker.model_validate({"min_calls": 20, "failure_rate": 0.5, "slow_call_rate": 0.8})


def warnings_after(
    windows: list[dict[str, EndpointCalls]], fraction: float = 0.5
) -> list[list[tuple[str, bool, str]]]:
    """Each round's changes as (key, raised, reason), warnings carried from round to round."""
    active: dict[str, Any] = {}
    rounds = []
    for now, endpoints in enumerate(windows):
        active, changes = check_warnings(
            active, endpoints, lambda label: BREAKER, fraction, float(now)
        )
        rounds.append([(c.warning.key, c.raised, c.reason) for c in changes])
    return rounds


def primary(failed: int, calls: int, slow: int = 0, closed: bool = True) -> dict[str, Any]:
    return {"his/primary": EndpointCalls(failed, slow, calls, closed)}


def test_a_warning_rises_at_the_fraction_of_the_breaker_rate_and_clears_with_hysteresis() -> None:
    rounds = warnings_after(
        [
            primary(24, 100),  # 24 %: under 25 %
            primary(25, 100),  # 25 % = 0.5 x 50 %: warn
            primary(21, 100),  # 21 %: above the clear line (80 % of 25 % = 20 %), still on
            primary(19, 100),  # cleared
        ]
    )
    assert rounds == [
        [],
        [("his/primary failure_rate", True, "")],
        [],
        [("his/primary failure_rate", False, "rate fell")],
    ]


def test_no_warning_on_too_few_calls_nor_while_a_breaker_is_not_closed() -> None:
    rounds = warnings_after([primary(19, 19), primary(40, 100, closed=False)])
    assert rounds == [[], []]


def test_a_warning_ends_when_the_breaker_takes_over_or_traffic_dries_up() -> None:
    opened = warnings_after([primary(30, 100), primary(30, 100, closed=False)])
    assert opened[1] == [("his/primary failure_rate", False, "breaker no longer closed")]
    dried = warnings_after([primary(30, 100), primary(5, 9)])
    assert dried[1] == [("his/primary failure_rate", False, "too little traffic to tell")]


def test_slow_calls_warn_on_their_own_rate() -> None:
    rounds = warnings_after([primary(0, 100, slow=40)])
    assert rounds == [[("his/primary slow_rate", True, "")]]


def test_an_active_warning_shows_the_latest_rate() -> None:
    active, _ = check_warnings({}, primary(30, 100), lambda _: BREAKER, 0.5, 1.0)
    active, changes = check_warnings(active, primary(45, 150), lambda _: BREAKER, 0.5, 2.0)
    warning = active["his/primary failure_rate"]
    assert not changes
    assert (warning.rate, warning.calls, warning.since) == (0.3, 150, 1.0)


def test_breaker_windows_sum_over_workers_and_one_open_breaker_counts() -> None:
    reports = [
        {"his/primary": {"failed": 3, "slow": 1, "calls": 10, "state": "closed"}},
        {"his/primary": {"failed": 2, "slow": 0, "calls": 15, "state": "half_open"}},
        {"his/dr": {"failed": 0, "slow": 0, "calls": 4, "state": "closed"}},
    ]
    assert sum_endpoints(reports) == {
        "his/primary": EndpointCalls(5, 1, 25, closed=False),
        "his/dr": EndpointCalls(0, 0, 4, closed=True),
    }


def test_an_open_breaker_is_announced_once_per_opening() -> None:
    def open_at(state: str, at: float, replica: str = "a/1") -> Verdict:
        return Verdict("his/primary", replica, state, at)  # type: ignore[arg-type]

    announced, opened = newly_open([], [open_at("open", 100)], 100, 60)
    assert [v.replica for v in opened] == ["a/1"]
    for state in ("half_open", "open"):  # trials failed: the same episode
        announced, opened = newly_open(announced, [open_at(state, 105)], 105, 60)
        assert not opened
    announced, opened = newly_open(announced, [open_at("closed", 110)], 110, 60)
    assert not announced
    announced, opened = newly_open(announced, [open_at("open", 120)], 120, 60)
    assert len(opened) == 1
    _, stale = newly_open([], [open_at("open", 100, "gone/9")], 200, 60)
    assert not stale


# -- the traffic window -------------------------------------------------------------------------


def outcome(criticality: str | None, status: int = 200, degraded: str | None = None) -> Any:
    return RequestOutcome("r", criticality, "his", None, degraded, status, 0.01, 0.0)


def test_the_traffic_window_counts_by_criticality_over_its_window() -> None:
    clock = FakeClock(1000.0)
    window = TrafficWindow(10, clock)
    window.record(outcome("core"))
    window.record(outcome("core", 503))
    window.record(outcome("support", 200, degraded="stale-cache"))
    window.record(outcome(None, 404))  # matched no route: not counted
    clock.now += 5
    window.record(outcome("core", degraded="journal"))
    assert window.summary() == {
        "core": {"total": 3, "affected": 2},
        "support": {"total": 1, "affected": 1},
        "reporting": {"total": 0, "affected": 0},
    }
    clock.now += 5  # the first second has left the 10 s window
    assert window.summary()["core"] == {"total": 1, "affected": 1}
    assert repr(window) == "<TrafficWindow 10s: core 1/1, support 0/0, reporting 0/0 affected>"


# -- the watcher --------------------------------------------------------------------------------


def watcher_config(webhook: str) -> Config:
    return Config.model_validate(
        {
            "upstreams": {
                "his": {
                    "endpoints": [
                        {"name": "primary", "url": "http://127.0.0.1:1", "priority": 0},
                        {"name": "dr", "url": "http://127.0.0.1:2", "priority": 1},
                    ],
                    "breaker": {"min_calls": 20, "failure_rate": 0.5, "consecutive_failures": 99},
                }
            },
            "routes": [{"name": "his", "upstream": "his", "match": {"path_prefix": "/"}}],
            "incident": {"window_s": 10, "min_requests": 10, "calm_s": 5},
            "alerts": {"webhooks": [webhook], "backoff_s": 0.05, "max_attempts": 3},
        }
    )


class Worker:
    """One worker's watcher on the shared store, with its own traffic and breakers."""

    def __init__(
        self, name: str, config: Config, store: StateStore, clock: Callable[[], float]
    ) -> None:
        self.view = StateView(store, clock=clock)
        self.traffic = TrafficWindow(config.incident.window_s, clock)
        self.fleet = Fleet(config, clusters_from(config), Metrics())
        self.alerts = AlertSender(config.alerts, env={})
        self.watcher = Watcher(
            config,
            name,
            self.fleet,
            lambda: self.view,
            self.traffic,
            self.alerts,
            self.fleet.metrics,
            clock=clock,
        )

    def requests(self, ok: int, failed: int) -> None:
        for index in range(ok + failed):
            self.traffic.record(outcome("core", 503 if index < failed else 200))

    def calls(self, label: str, ok: int, failed: int) -> None:
        """Calls through the endpoint's breaker, failures first, until it lets none through."""
        breaker = self.fleet.health(label).breaker
        for index in range(ok + failed):
            admission = breaker.admit()
            if admission is None:
                return
            breaker.record(admission, failed=index < failed, latency_s=0.01)

    async def tick(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # the watcher's own handling is under test
            await self.view.refresh()
        await self.watcher.tick()


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


async def test_the_leader_alerts_once_and_a_new_leader_does_not_repeat_it(
    hooks: WebhookReceiver,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    config = watcher_config(hooks.url)
    a, b = (Worker(name, config, store, clock) for name in ("host/1", "host/2"))
    senders = [asyncio.create_task(w.alerts.run()) for w in (a, b)]
    try:
        await a.tick()
        await b.tick()
        assert (a.watcher.leader, b.watcher.leader) == (True, False)
        a.requests(ok=10, failed=10)
        b.requests(ok=20, failed=0)  # 10 of 40 affected: level 2
        await b.tick()  # b publishes its traffic first
        await a.tick()
        await wait_until_async(lambda: hooks.events("incident_level"), 5, "the level 2 alert")
        await b.tick()
        assert b.watcher.incident["level"] == 2 and b.watcher.incident["leader"] == "host/1"
        # a stops; its lease runs out and b takes over, reading what a decided.
        clock.now += 4
        await b.tick()
        await b.tick()
        assert b.watcher.leader
        clock.now += 11  # all traffic has left the window: calm from here
        await b.tick()
        clock.now += 5
        await b.tick()
        events = await wait_until_async(lambda: hooks.events("incident_level")[1:], 5, "level 0")
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    levels = [(e["level"], e["previous"]) for e in hooks.events("incident_level")]
    assert levels == [(2, 0), (0, 2)]
    first = hooks.events("incident_level")[0]
    assert first["gateway"] == "host/1" and events[0]["gateway"] == "host/2"
    assert first["share"] == 0.25 and first["requests"] == 40 and first["window_s"] == 10
    assert "二级" in first["message_zh"] and "level 2" in first["message_en"]


async def test_an_early_warning_then_the_breaker_opening_each_sent_once(
    hooks: WebhookReceiver,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    config = watcher_config(hooks.url)
    worker = Worker("host/1", config, store, clock)
    sender = asyncio.create_task(worker.alerts.run())
    try:
        worker.calls("his/primary", ok=14, failed=6)  # 30 %: warn at 25 %, opens at 50 %
        await worker.tick()
        await worker.tick()
        assert [w["endpoint"] for w in worker.watcher.warnings] == ["his/primary"]
        worker.calls("his/primary", ok=0, failed=20)  # 26/40 failed: the breaker opens
        # The fleet's publishing task is not running here: its verdict, by hand.
        await store.put_verdict(Verdict("his/primary", "host/1", "open", clock.now))
        await worker.tick()
        await worker.tick()
        await wait_until_async(lambda: len(hooks.posts) >= 3, 5, "three alerts")
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    names = [event["event"] for event in hooks.events()]
    assert names == ["early_warning", "breaker_opened", "warning_cleared"]
    warning, opened, cleared = hooks.events()
    assert (warning["kind"], warning["rate"], warning["threshold"]) == ("failure_rate", 0.3, 0.25)
    assert (warning["breaker_rate"], warning["calls"]) == (0.5, 20)
    assert (opened["endpoint"], opened["replica"]) == ("his/primary", "host/1")
    assert cleared["reason"] == "breaker no longer closed"
    assert not worker.watcher.warnings


async def test_an_expired_mode_is_lifted_and_audited(hooks: WebhookReceiver) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    worker = Worker("host/1", watcher_config(hooks.url), store, clock)
    lasting = ForcedMode("his", "dr", "move", "ops-ann", clock.now)
    expiring = ForcedMode(
        "his/primary", "maintenance", "patching", "ops-bob", clock.now, clock.now + 60
    )
    for mode in (lasting, expiring):
        await store.put_mode(mode)
    await worker.tick()
    assert set(await store.load_modes()) == {"his", "his/primary"}
    clock.now += 60
    await worker.tick()
    assert set(await store.load_modes()) == {"his"}
    [record] = await store.audit_list()
    assert (record.actor, record.action, record.target) == (
        "resilgate",
        "mode.expired",
        "his/primary",
    )
    assert "set_by=ops-bob" in record.detail


async def test_a_drills_mode_is_left_to_its_runner_until_long_past_its_end(
    hooks: WebhookReceiver,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    config = watcher_config(hooks.url)
    worker = Worker("host/1", config, store, clock)
    end = clock.now + 10
    drill = ForcedMode("his", "fallback", "drill D-1: quarterly", "drill:D-1", clock.now, end)
    fence = ForcedMode("his/primary", "maintenance", "patching", "ops-bob", clock.now, end)
    for mode in (drill, fence):
        await store.put_mode(mode)
    clock.now = end  # both ended: the operator's is the watcher's to lift, the drill's is not
    await worker.tick()
    assert await store.load_modes() == {"his": drill}
    # In case no worker is left to finish the drill: lifted once long past its end.
    clock.now = end + config.drills.restore_grace_s + 59.9
    await worker.tick()
    assert await store.load_modes() == {"his": drill}
    clock.now = end + config.drills.restore_grace_s + 60
    await worker.tick()
    assert await store.load_modes() == {}
    expired = [(r.action, r.target) for r in reversed(await store.audit_list())]
    assert expired == [("mode.expired", "his/primary"), ("mode.expired", "his")]
    assert "set_by=drill:D-1" in (await store.audit_list())[0].detail


async def test_the_watcher_lifts_only_the_mode_it_saw_expire(hooks: WebhookReceiver) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    worker = Worker("host/1", watcher_config(hooks.url), store, clock)
    expiring = ForcedMode("his", "dr", "move", "ops-ann", clock.now, clock.now + 5)
    await store.put_mode(expiring)
    clock.now += 5
    await worker.view.refresh()  # the watcher's view holds the expired mode
    again = ForcedMode("his", "dr", "move, for longer", "ops-li", clock.now, clock.now + 600)
    await store.put_mode(again)  # an operator's PUT lands before the watcher lifts it
    await worker.watcher.tick()
    assert worker.watcher.leader
    assert await store.load_modes() == {"his": again}
    assert await store.audit_list() == []  # nothing expired, nothing said


async def test_a_store_outage_is_logged_once_and_the_last_level_kept(
    hooks: WebhookReceiver, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = RedisStore(redis_server.url, spool_path=tmp_path / "spool.db", op_timeout_s=0.2)
    await store.open()
    try:
        worker = Worker("host/1", watcher_config(hooks.url), store, time.time)
        worker.requests(ok=0, failed=20)
        await worker.tick()
        assert worker.watcher.incident["level"] == 1
        with capture_logs() as logs:
            with redis_server.paused():
                for _ in range(3):
                    await worker.tick()
                assert worker.watcher.incident["level"] == 1
                assert not worker.watcher.leader
            await worker.tick()
        assert worker.watcher.leader
    finally:
        await store.close()
    said = [e["event"] for e in logs if str(e["event"]).startswith("watcher_")]
    assert said == ["watcher_store_unreachable", "watcher_leading", "watcher_store_ok"]
