"""Drills against the in-memory store with a fake clock: starting and refusing, what each
worker counts and how the report sums them, and the one fleet-wide finish."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from resilgate.config import Config
from resilgate.drills import (
    DRILL_KIND,
    FINISHED_KIND,
    TALLY_KIND,
    DrillRecord,
    DrillRefused,
    DrillRunner,
    InvalidDrill,
    UnknownDrillTarget,
    mode_in_the_way,
)
from resilgate.outcomes import RequestOutcome
from resilgate.state.memory import MemoryStore
from resilgate.state.records import ForcedMode
from resilgate.state.store import StoreUnavailable

T0 = 1_700_000_000.0
GRACE_S = 2.0
KEEP_DAYS = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def endpoint(name: str, priority: int) -> dict[str, Any]:
    return {"name": name, "url": f"http://127.0.0.1:1/{name}", "priority": priority}


CONFIG = Config.model_validate(
    {
        "upstreams": {
            "his": {"endpoints": [endpoint("primary", 0), endpoint("dr", 1)]},
            "lab": {"endpoints": [endpoint("primary", 0)]},
        },
        "routes": [
            {
                "name": "his-write",
                "upstream": "his",
                "fallback": "journal",
                "match": {"path_prefix": "/fhir/", "methods": ["POST"]},
            },
            {"name": "his-read", "upstream": "his", "match": {"path_prefix": "/fhir/"}},
            {"name": "lab-read", "upstream": "lab", "match": {"path_prefix": "/lab/"}},
        ],
        "drills": {"restore_grace_s": GRACE_S},
        "state": {"audit_retention_days": KEEP_DAYS},
    }
)


def outcome(
    at: float,
    route: str = "his-write",
    *,
    served_by: str | None = None,
    degraded: str | None = None,
    status: int = 200,
    duration_s: float = 0.01,
) -> RequestOutcome:
    upstream = next(r.upstream for r in CONFIG.routes if r.name == route)
    return RequestOutcome(route, "core", upstream, served_by, degraded, status, duration_s, at)


def live(
    at: float, route: str = "his-write", site: str = "primary", duration_s: float = 0.01
) -> RequestOutcome:
    label = f"his/{site}" if route != "lab-read" else "lab/primary"
    return outcome(at, route, served_by=label, duration_s=duration_s)


def journaled(at: float, duration_s: float = 0.01) -> RequestOutcome:
    return outcome(at, degraded="journal", status=202, duration_s=duration_s)


def notice(at: float) -> RequestOutcome:
    return outcome(at, "his-read", degraded="notice", status=503)


class FlakyStore(MemoryStore):
    """The memory store, whose calls named in ``down`` fail as if it were unreachable; and
    ``after_load`` runs right after a read of the modes (another process's write landing)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down: set[str] = set()
        self.after_load: ForcedMode | None = None

    async def load_modes(self) -> dict[str, ForcedMode]:
        modes = await super().load_modes()
        if self.after_load is not None:
            await super().put_mode(self.after_load)
            self.after_load = None
        return modes

    def _reach(self, call: str) -> None:
        if call in self.down:
            raise StoreUnavailable("connection refused")

    async def doc_list(self, kind: str) -> dict[str, bytes]:
        self._reach("doc_list")
        return await super().doc_list(kind)

    async def doc_put(self, kind: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._reach("doc_put")
        await super().doc_put(kind, key, value, ttl_s)

    async def doc_delete(self, kind: str, key: str) -> None:
        self._reach("doc_delete")
        await super().doc_delete(kind, key)

    async def put_mode_if_absent(self, mode: ForcedMode, now: float) -> ForcedMode | None:
        self._reach("put_mode")
        return await super().put_mode_if_absent(mode, now)


class Fleet:
    """Two workers' drill runners sharing one store and one clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.store = FlakyStore(self.clock)
        self.a = DrillRunner(CONFIG, "host/1", lambda: self.store, self.clock)
        self.b = DrillRunner(CONFIG, "host/2", lambda: self.store, self.clock)

    async def tick(self) -> None:
        await self.a.tick()
        await self.b.tick()

    async def audit(self) -> list[tuple[str, str, str]]:
        return [(r.action, r.actor, r.target) for r in reversed(await self.store.audit_list())]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


async def test_a_drill_forces_its_mode_until_its_end_and_is_audited(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 30, "quarterly drill", "ops-alice")

    assert drill.id.startswith("D-") and len(drill.id) == 14
    assert (drill.state, drill.started_at, drill.ends_at) == ("running", T0, T0 + 30)
    assert drill.report.requests == 0 and drill.report.switch_to_degraded_s is None
    mode = (await fleet.store.load_modes())["his"]
    assert (mode.mode, mode.actor, mode.set_at, mode.expires_at) == (
        "fallback",
        f"drill:{drill.id}",
        T0,
        T0 + 30,
    )
    assert mode.reason == f"drill {drill.id}: quarterly drill"
    [start] = await fleet.store.audit_list()
    assert (start.action, start.actor, start.target, start.reason) == (
        "drill.start",
        "ops-alice",
        "his",
        "quarterly drill",
    )
    assert orjson.loads(start.detail) == {"drill": drill.id, "mode": "fallback", "duration_s": 30}
    assert fleet.a.running_ids() == [drill.id]
    assert fleet.b.running_ids() == []
    await fleet.b.tick()
    assert fleet.b.running_ids() == [drill.id]

    fleet.clock.now = T0 + 30  # the mode ends by itself, whoever is alive
    assert not mode.active(fleet.clock())
    assert (await fleet.a.view(drill.id)).state == "restoring"  # type: ignore[union-attr]
    assert fleet.a.running_ids() == []


async def test_unknown_targets_modes_and_durations_are_rejected(fleet: Fleet) -> None:
    with pytest.raises(UnknownDrillTarget, match="no route or upstream named 'pharmacy'"):
        await fleet.a.start("pharmacy", "fallback", 10, "r", "ops")
    with pytest.raises(InvalidDrill, match="not 'primary'"):
        await fleet.a.start("his", "primary", 10, "r", "ops")
    for duration_s in (0, -1, 86401):
        with pytest.raises(InvalidDrill, match="at most 86400"):
            await fleet.a.start("his", "fallback", duration_s, "r", "ops")
    with pytest.raises(DrillRefused, match="no DR endpoint"):
        await fleet.a.start("lab-read", "dr", 10, "r", "ops")
    assert await fleet.store.load_modes() == {}
    assert await fleet.store.doc_list("drill") == {}
    assert await fleet.store.audit_list() == []


async def test_a_target_forced_by_ops_or_in_a_drill_is_refused_until_free(fleet: Fleet) -> None:
    ops = ForcedMode("his", "dr", "db migration", "ops-bob", T0, expires_at=T0 + 5)
    await fleet.store.put_mode(ops)
    with pytest.raises(DrillRefused, match="in dr mode, forced by ops-bob: db migration"):
        await fleet.a.start("his", "fallback", 10, "r", "ops")

    fleet.clock.now = T0 + 5  # the ops mode has expired
    first = await fleet.a.start("his", "fallback", 10, "r", "ops")
    with pytest.raises(DrillRefused, match="in fallback mode, forced by drill:"):
        await fleet.b.start("his", "maintenance", 10, "r", "ops")
    fleet.clock.now = first.ends_at  # its mode ended, the drill is still being restored
    with pytest.raises(DrillRefused, match="another drill on his is not finished"):
        await fleet.b.start("his", "maintenance", 10, "r", "ops")
    other = await fleet.b.start("his-read", "maintenance", 10, "r", "ops")  # another target
    assert other.state == "running"

    fleet.clock.now = first.ends_at + GRACE_S + 1
    await fleet.tick()
    assert (await fleet.a.view(first.id)).state == "finished"  # type: ignore[union-attr]
    again = await fleet.b.start("his", "maintenance", 10, "r", "ops")
    assert again.state == "running"


async def test_the_report_sums_what_every_worker_counted(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    await fleet.b.tick()  # b learns of it
    a, b = fleet.a, fleet.b

    a.record(live(T0 - 0.5))  # before the drill: not its own
    a.record(live(T0 + 0.2))  # the mode had not reached this worker yet
    a.record(journaled(T0 + 0.3))
    a.record(notice(T0 + 0.4))
    b.record(journaled(T0 + 0.25))
    b.record(journaled(T0 + 5))
    b.record(outcome(T0 + 6, "his-read", status=404))  # a fallback that says "not found"
    b.record(live(T0 + 7, "lab-read"))  # another upstream: not drilled
    await fleet.tick()

    report = (await a.view(drill.id)).report  # type: ignore[union-attr]
    assert report.model_dump() == {
        "requests": 6,
        "served_live": 1,
        "served_by": {"his/primary": 1},
        "fallback_serves": {"journal": 3, "notice": 1},
        "client_errors": 1,
        "statuses": {"2xx": 4, "4xx": 1, "5xx": 1},
        "switch_to_degraded_s": 0.25,  # b's first journaled answer, the fleet's earliest
        "switch_back_s": None,
        "workers": 2,
    }
    [listed] = await b.list()
    assert listed.report == report and listed.id == drill.id


async def test_a_worker_that_learns_of_a_drill_late_still_counts_its_start(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    # The forced mode reached worker b before b's next look at the drills.
    fleet.b.record(journaled(T0 + 0.1))
    fleet.b.record(notice(T0 + 0.2))
    await fleet.b.tick()
    fleet.b.record(journaled(T0 + 0.6))
    await fleet.b.tick()
    report = (await fleet.a.view(drill.id)).report  # type: ignore[union-attr]
    assert report.fallback_serves == {"journal": 2, "notice": 1}
    assert report.workers == 1


async def test_requests_belong_to_the_drill_by_when_they_started(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    end = drill.ends_at
    a = fleet.a
    a.record(live(T0 + 0.05, duration_s=0.1))  # started before the drill
    a.record(journaled(end + 0.2, duration_s=0.3))  # gated before the end, answered after
    a.record(live(end + 0.5, duration_s=0.4))  # started after the end: the switch back
    a.record(live(end + 0.3, duration_s=0.2))  # an earlier one, recorded later
    a.record(live(end + GRACE_S + 1))  # too late to be the switch back
    await a.tick()
    report = (await a.view(drill.id)).report  # type: ignore[union-attr]
    assert report.requests == 1
    assert report.fallback_serves == {"journal": 1}
    assert report.switch_to_degraded_s == 10.2
    assert report.switch_back_s == 0.3


async def test_a_dr_drill_switches_away_from_the_primary_and_back(fleet: Fleet) -> None:
    drill = await fleet.a.start("his-read", "dr", 10, "dr site drill", "ops")
    a = fleet.a
    a.record(live(T0 + 0.1, "his-read", "primary"))
    a.record(live(T0 + 0.4, "his-read", "dr"))
    a.record(live(T0 + 0.5, "his-read", "dr"))
    a.record(live(T0 + 0.6, "his-write", "dr"))  # another route of the upstream
    a.record(live(drill.ends_at + 0.1, "his-read", "dr"))  # still on the DR site
    a.record(live(drill.ends_at + 0.7, "his-read", "primary"))
    await a.tick()
    report = (await a.view(drill.id)).report  # type: ignore[union-attr]
    assert (report.requests, report.served_live) == (3, 3)
    assert report.served_by == {"his/dr": 2, "his/primary": 1}
    assert report.fallback_serves == {}
    assert (report.switch_to_degraded_s, report.switch_back_s) == (0.4, 0.7)


async def test_one_worker_finishes_the_drill_and_audits_its_report(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "maintenance", 10, "drill", "ops-alice")
    await fleet.b.tick()
    fleet.a.record(notice(T0 + 1))
    fleet.b.record(notice(T0 + 2))
    fleet.b.record(live(drill.ends_at + 0.5))
    fleet.clock.now = drill.ends_at + GRACE_S  # the report still waits for late counts
    await fleet.tick()
    assert (await fleet.a.view(drill.id)).state == "restoring"  # type: ignore[union-attr]
    assert "his" in await fleet.store.load_modes()

    fleet.clock.now = drill.ends_at + GRACE_S + 1
    await fleet.tick()
    await fleet.tick()
    finished = await fleet.b.view(drill.id)
    assert finished is not None and finished.state == "finished"
    assert finished.finished_at == fleet.clock.now
    assert await fleet.store.load_modes() == {}
    assert await fleet.audit() == [
        ("drill.start", "ops-alice", "his"),
        ("drill.end", "resilgate", "his"),
    ]
    end = (await fleet.store.audit_list())[0]
    detail = orjson.loads(end.detail)
    assert detail["drill"] == drill.id and detail["mode"] == "maintenance"
    assert detail["report"] == finished.report.model_dump()
    assert finished.report.fallback_serves == {"notice": 2}
    assert finished.report.client_errors == 2 and finished.report.switch_back_s == 0.5
    assert fleet.a.running_ids() == fleet.b.running_ids() == []
    assert "[]" in repr(fleet.a) and "[]" in repr(fleet.b)  # both let go of it


async def test_the_finish_leaves_a_mode_that_ops_set_meanwhile(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    ops = ForcedMode("his", "primary", "real outage at the DR site", "ops-bob", T0 + 3)
    await fleet.store.put_mode(ops)
    fleet.clock.now = drill.ends_at + GRACE_S + 1
    await fleet.tick()
    assert (await fleet.a.view(drill.id)).state == "finished"  # type: ignore[union-attr]
    assert await fleet.store.load_modes() == {"his": ops}


async def test_counts_kept_during_a_store_outage_are_published_once_it_is_back(
    fleet: Fleet,
) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    a, store = fleet.a, fleet.store
    a.record(journaled(T0 + 1))
    await a.tick()
    a.record(live(drill.ends_at + 1))
    await a.tick()  # published again, whole: not counted twice
    store.down = {"doc_put"}
    a.record(journaled(T0 + 2))
    with pytest.raises(StoreUnavailable):
        await a.tick()
    store.down = {"doc_list", "doc_put"}
    a.record(journaled(T0 + 3))
    with pytest.raises(StoreUnavailable):
        await a.tick()
    store.down = set()
    await a.tick()
    report = (await a.view(drill.id)).report  # type: ignore[union-attr]
    assert report.fallback_serves == {"journal": 3} and report.switch_back_s == 1
    assert list(await store.doc_list(TALLY_KIND)) == [f"{drill.id}/host/1"]


async def test_a_failed_start_leaves_nothing_that_blocks_a_retry(fleet: Fleet) -> None:
    fleet.store.down = {"put_mode"}
    with pytest.raises(StoreUnavailable):
        await fleet.a.start("his", "fallback", 10, "drill", "ops")
    fleet.store.down = set()
    assert await fleet.store.doc_list("drill") == {}
    assert await fleet.store.load_modes() == {}
    assert await fleet.store.audit_list() == []
    assert (await fleet.a.start("his", "fallback", 10, "drill", "ops")).state == "running"


async def test_without_a_store_nothing_starts_and_the_loop_waits(fleet: Fleet) -> None:
    runner = DrillRunner(CONFIG, "host/1", lambda: None, fleet.clock)
    with pytest.raises(StoreUnavailable, match="not open yet"):
        await runner.start("his", "fallback", 10, "drill", "ops")
    await runner.tick()
    runner.record(journaled(T0))
    assert "store starting" in repr(runner)


async def test_a_drill_on_a_target_this_config_lacks_is_still_finished(fleet: Fleet) -> None:
    # Started by a replica with a newer config (rolling upgrade).
    record = DrillRecord(
        id="D-000000000001",
        target="pharmacy",
        mode="fallback",
        reason="new system drill",
        actor="ops",
        started_at=T0,
        ends_at=T0 + 10,
    )
    await fleet.store.doc_put("drill", record.id, record.model_dump_json().encode())
    await fleet.tick()
    assert fleet.a.running_ids() == [record.id]
    fleet.clock.now = record.ends_at + GRACE_S + 1
    await fleet.tick()
    assert (await fleet.a.view(record.id)).state == "finished"  # type: ignore[union-attr]


def ops_mode(target: str, expires_at: float | None = None) -> ForcedMode:
    return ForcedMode(target, "maintenance", "patching", "ops-bob", T0 - 1, expires_at)


@pytest.mark.parametrize(
    ("forced_on", "drilled", "refused"),
    [
        ("his", "his-write", True),  # the route's own mode would override its upstream's
        ("his/primary", "his-read", True),  # the upstream's endpoint
        ("his/dr", "his", True),
        ("his-read", "his", True),  # one of the upstream's routes
        ("his-read", "his-write", False),  # a sibling route: its own mode stands
        ("his", "lab-read", False),  # another upstream
        ("lab/primary", "his", False),
    ],
)
async def test_a_drill_is_refused_while_ops_hold_a_mode_it_would_override(
    fleet: Fleet, forced_on: str, drilled: str, refused: bool
) -> None:
    await fleet.store.put_mode(ops_mode(forced_on))
    if not refused:
        assert (await fleet.a.start(drilled, "fallback", 10, "r", "ops")).state == "running"
        return
    with pytest.raises(DrillRefused) as caught:
        await fleet.a.start(drilled, "fallback", 10, "r", "ops")
    assert str(caught.value) == (
        f"{forced_on} (related to {drilled}) is in maintenance mode, forced by ops-bob: patching"
    )
    assert await fleet.store.load_modes() == {forced_on: ops_mode(forced_on)}
    assert await fleet.store.doc_list(DRILL_KIND) == {}
    assert await fleet.store.audit_list() == []


def test_only_active_operator_modes_on_related_targets_are_in_the_way() -> None:
    drill = ForcedMode("his-read", "fallback", "drill D-1: r", "drill:D-1", T0, T0 + 10)
    modes = {"his-read": drill, "his/primary": ops_mode("his/primary", expires_at=T0)}
    related = ("his-read", "his-write", "his/primary", "his/dr")
    # Another drill's mode on a route, an operator's that expired: neither is in the way.
    assert mode_in_the_way("his", related, modes, T0) is None
    assert mode_in_the_way("his", related, modes, T0 - 0.1) == modes["his/primary"]
    # On the target itself, any active mode is (a drill's too).
    assert mode_in_the_way("his-read", ("his",), modes, T0) == drill
    assert mode_in_the_way("his-read", ("his",), modes, T0 + 10) is None


async def test_an_operators_put_landing_after_the_check_wins_and_the_drill_is_refused(
    fleet: Fleet,
) -> None:
    ops = ops_mode("his")
    fleet.store.after_load = ops  # the PUT lands between the drill's check and its own put
    with pytest.raises(DrillRefused, match=r"^his is in maintenance mode, forced by ops-bob"):
        await fleet.a.start("his", "fallback", 10, "r", "ops")
    assert await fleet.store.load_modes() == {"his": ops}
    assert await fleet.store.doc_list(DRILL_KIND) == {}
    assert await fleet.store.audit_list() == []
    await fleet.store.delete_mode("his")  # the target's drill lease was given back
    assert (await fleet.a.start("his", "fallback", 10, "r", "ops")).state == "running"


async def test_a_finished_drill_keeps_its_report_for_the_audit_retention(fleet: Fleet) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    await fleet.b.tick()
    fleet.a.record(journaled(T0 + 1))
    fleet.b.record(journaled(T0 + 2))
    fleet.clock.now = drill.ends_at + GRACE_S + 1
    await fleet.a.tick()  # a finishes it, before b's last look
    store = fleet.store
    assert await store.doc_list(DRILL_KIND) == {}  # the workers' twice-a-second read is empty
    assert await store.doc_list(TALLY_KIND) == {}
    assert list(await store.doc_list(FINISHED_KIND)) == [drill.id]

    # b counted one more before it saw the drill finished: its last flush lands after the
    # finish, changes nothing in the report, and does not stay forever.
    fleet.b.record(journaled(T0 + 3, duration_s=0.5))
    await fleet.b.tick()
    assert list(await store.doc_list(TALLY_KIND)) == [f"{drill.id}/host/2"]
    [listed] = await fleet.b.list()
    assert listed.state == "finished" and listed.report.fallback_serves == {"journal": 1}
    assert await fleet.b.view(drill.id) == listed

    fleet.clock.now += KEEP_DAYS * 86400 - 1
    assert [d.id for d in await fleet.a.list()] == [drill.id]
    fleet.clock.now += GRACE_S + 3
    assert await fleet.a.list() == []
    assert await fleet.a.view(drill.id) is None
    assert await store.doc_list(TALLY_KIND) == {}


async def test_a_finish_stopped_half_way_is_completed_without_a_second_report(
    fleet: Fleet,
) -> None:
    drill = await fleet.a.start("his", "fallback", 10, "drill", "ops")
    fleet.a.record(journaled(T0 + 1))
    await fleet.a.tick()
    fleet.clock.now = drill.ends_at + GRACE_S + 1
    fleet.store.down = {"doc_delete"}  # the finished drill is written, then the store goes
    with pytest.raises(StoreUnavailable):
        await fleet.a.tick()
    assert (await fleet.b.view(drill.id)).state == "finished"  # type: ignore[union-attr]
    fleet.store.down = set()
    await fleet.tick()
    assert await fleet.store.doc_list(DRILL_KIND) == {}
    assert await fleet.store.doc_list(TALLY_KIND) == {}
    assert [action for action, _, _ in await fleet.audit()] == ["drill.start", "drill.end"]
    assert (await fleet.b.start("his", "maintenance", 10, "r", "ops")).state == "running"
