"""One behavioural suite for every state backend: memory, SQLite, and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from resilgate.state.records import AuditRecord, ForcedMode, JournalEntry, QueueStats, Verdict
from resilgate.state.store import DuplicateTicket, StateStore
from tests.conftest import wait_until_async

# Leases are judged by the time the caller passes, so these tests pass fixed ones.
NOW = 1_767_225_600.0
LEASE = "half-open:his/primary"


class FakeClock:
    """Wall-clock time that tests can move forward (for expiry and retention)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def open_backend(backend: str, tmp_path: Path, clock: Callable[[], float]) -> StateStore:
    if backend == "memory":
        from resilgate.state.memory import MemoryStore

        return MemoryStore(clock=clock)
    if backend == "sqlite":
        from resilgate.state.sqlite import SqliteStore

        return SqliteStore(tmp_path / "state.db", clock=clock)
    from resilgate.state.redis import RedisStore
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    store = RedisStore(server.url, spool_path=tmp_path / "spool.db", clock=clock)
    store.test_server = server  # type: ignore[attr-defined]
    return store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[StateStore]:
    backend = await open_backend(request.param, tmp_path, clock)
    server = getattr(backend, "test_server", None)
    try:
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()
    finally:
        if server is not None:
            server.close()


def mode(target: str = "his", name: str = "dr", expires_at: float | None = None) -> ForcedMode:
    return ForcedMode(target, name, "primary DC power work", "ops:li", time.time(), expires_at)  # type: ignore[arg-type]


def entry(ticket: str, created_at: float = 0.0, queue: str = "his") -> JournalEntry:
    return JournalEntry(
        ticket,
        f"{queue}-orders-write",
        b'{"resourceType":"MedicationRequest"}',
        created_at,
        queue=queue,
    )


def tickets(entries: list[JournalEntry]) -> list[str]:
    return [e.ticket for e in entries]


async def test_modes_round_trip_and_are_announced(store: StateStore) -> None:
    await store.wait_for_change(0.01)  # settle anything announced at open
    await store.put_mode(mode("his", "dr"))
    assert await store.wait_for_change(1.0)
    await store.put_mode(mode("insurance", "fallback"))
    modes = await store.load_modes()
    assert {t: m.mode for t, m in modes.items()} == {"his": "dr", "insurance": "fallback"}
    assert modes["his"].reason == "primary DC power work" and modes["his"].actor == "ops:li"
    await store.delete_mode("his")
    assert await store.wait_for_change(1.0)
    assert set(await store.load_modes()) == {"insurance"}


async def test_a_mode_is_put_only_where_none_is_active(store: StateStore) -> None:
    await store.wait_for_change(0.01)  # settle anything announced at open
    ops = ForcedMode("his", "dr", "db migration", "ops-bob", NOW, NOW + 10)
    assert await store.put_mode_if_absent(ops, now=NOW) is None
    assert await store.wait_for_change(1.0)
    drill = ForcedMode("his", "fallback", "drill D-1: quarterly", "drill:D-1", NOW + 1, NOW + 61)
    # Refused while the ops mode is active, with the mode in the way (ends exactly at NOW + 10).
    assert await store.put_mode_if_absent(drill, now=NOW + 9.5) == ops
    assert await store.load_modes() == {"his": ops}
    assert await store.put_mode_if_absent(drill, now=NOW + 10) is None  # expired: replaced
    assert await store.wait_for_change(1.0)
    assert await store.load_modes() == {"his": drill}
    # A mode with no end blocks at any time; other targets are free.
    lasting = ForcedMode("insurance", "maintenance", "contract ended", "ops-ann", NOW)
    assert await store.put_mode_if_absent(lasting, now=NOW) is None
    assert await store.put_mode_if_absent(replace(lasting, actor="ops-li"), now=NOW + 1e9) == (
        lasting
    )
    assert await store.load_modes() == {"his": drill, "insurance": lasting}


async def test_a_mode_is_deleted_only_if_it_is_the_expected_one(store: StateStore) -> None:
    drill = ForcedMode("his", "fallback", "drill D-1: quarterly", "drill:D-1", NOW + 0.1, NOW + 30)
    await store.put_mode(drill)
    for other in (
        replace(drill, reason="drill D-1"),
        replace(drill, actor="drill:D-2"),
        replace(drill, mode="maintenance"),
        replace(drill, set_at=drill.set_at + 0.001),
        replace(drill, expires_at=None),
        replace(drill, expires_at=NOW + 31),
        replace(drill, target="insurance"),
    ):
        assert not await store.delete_mode_if(other), other
    assert await store.load_modes() == {"his": drill}
    # Ops forced another mode meanwhile: the drill's end leaves it alone.
    ops = ForcedMode("his", "primary", "DR site down", "ops-bob", NOW + 5)
    await store.put_mode(ops)
    assert not await store.delete_mode_if(drill)
    assert await store.load_modes() == {"his": ops}
    await store.wait_for_change(0.01)
    loaded = (await store.load_modes())["his"]  # as a caller holds it: read back
    assert await store.delete_mode_if(loaded)
    assert await store.wait_for_change(1.0)
    assert await store.load_modes() == {}
    assert not await store.delete_mode_if(loaded)  # gone already: one caller deletes it


async def test_verdicts_kept_per_replica(store: StateStore) -> None:
    now = time.time()
    await store.put_verdict(Verdict("his/primary", "gw-a", "open", now))
    await store.put_verdict(Verdict("his/primary", "gw-b", "closed", now))
    await store.put_verdict(Verdict("his/primary", "gw-a", "half_open", now + 1))
    verdicts = {(v.endpoint, v.replica): v.state for v in await store.load_verdicts()}
    assert verdicts == {("his/primary", "gw-a"): "half_open", ("his/primary", "gw-b"): "closed"}


async def test_counter_blocks_never_overlap(store: StateStore) -> None:
    blocks = await asyncio.gather(*(store.take_block("NEI:2026-11-24", 10) for _ in range(20)))
    numbers = [n for first in blocks for n in range(first, first + 10)]
    assert sorted(numbers) == list(range(1, 201))
    assert await store.take_block("WAI:2026-11-24", 1) == 1


async def test_a_lease_has_one_holder_until_it_runs_out(store: StateStore) -> None:
    assert await store.lease(LEASE, "gw-a", ttl_s=10, now=NOW)
    assert not await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 9.9)
    assert await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 10)  # gw-a's has run out
    assert not await store.lease(LEASE, "gw-a", ttl_s=10, now=NOW + 10)
    assert await store.lease("half-open:his/standby", "gw-a", ttl_s=10, now=NOW + 10)
    with pytest.raises(ValueError, match="positive"):
        await store.lease(LEASE, "gw-b", ttl_s=0, now=NOW + 10)


async def test_renewing_a_lease_extends_it(store: StateStore) -> None:
    assert await store.lease(LEASE, "gw-a", ttl_s=10, now=NOW)
    assert await store.lease(LEASE, "gw-a", ttl_s=10, now=NOW + 8)  # now held until NOW + 18
    assert not await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 12)
    assert await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 18)
    if store.backend == "redis":  # a lease nobody renews also goes from Redis by itself
        from redis.asyncio import Redis

        from resilgate.state.redis import RedisStore

        assert isinstance(store, RedisStore)
        raw = Redis.from_url(store.test_server.url)  # type: ignore[attr-defined]
        try:
            left_ms = await raw.pttl(f"{store.namespace}:lease:{LEASE}")
        finally:
            await raw.aclose()
        assert 0 < left_ms <= 10_000


async def test_only_the_holder_releases_a_lease_and_nobody_is_told(store: StateStore) -> None:
    await store.wait_for_change(0.01)  # settle anything announced at open
    assert await store.lease(LEASE, "gw-a", ttl_s=10, now=NOW)
    await store.release(LEASE, "gw-b")
    assert not await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 1)
    await store.release(LEASE, "gw-a")
    assert await store.lease(LEASE, "gw-b", ttl_s=10, now=NOW + 1)  # at once, not at NOW + 10
    await store.release("half-open:his/standby", "gw-a")  # never taken: nothing happens
    assert not await store.wait_for_change(0.05), "leases are not mode or verdict changes"


async def test_cache_entries_expire(store: StateStore, clock: FakeClock) -> None:
    await store.cache_put("u:d-77|p-10086|AllergyIntolerance", b"sealed", ttl_s=60)
    assert await store.cache_get("u:d-77|p-10086|AllergyIntolerance") == b"sealed"
    assert await store.cache_get("u:d-78|p-10086|AllergyIntolerance") is None
    if store.backend != "redis":  # Redis expires on its own clock; TTL is checked below
        clock.offset = 61
        assert await store.cache_get("u:d-77|p-10086|AllergyIntolerance") is None
    else:
        await store.cache_put("short", b"x", ttl_s=0.05)
        deadline = time.monotonic() + 2
        while await store.cache_get("short") is not None:
            assert time.monotonic() < deadline, "cache entry never expired"
            await asyncio.sleep(0.01)


async def cached(store: StateStore, *keys: str) -> list[str]:
    """Those of ``keys`` that cache_get finds."""
    return [key for key in keys if await store.cache_get(key) is not None]


async def test_the_cache_stays_within_its_bound(store: StateStore, clock: FakeClock) -> None:
    keys = [f"record-{n:02d}" for n in range(50)]
    for key in keys:
        clock.offset += 1  # a fixed ttl: the older an entry, the nearer its expiry
        await store.cache_put(key, b"r" * 100, ttl_s=3600, max_total_bytes=1000)
        assert await store.cache_bytes() <= 1000
    assert await store.cache_bytes() == 1000
    assert await cached(store, *keys) == keys[-10:]


async def test_the_entries_nearest_expiry_are_evicted_first(store: StateStore) -> None:
    for key, ttl_s in [("a", 3000), ("b", 1000), ("c", 2000)]:
        await store.cache_put(key, b"v" * 40, ttl_s, max_total_bytes=130)
    await store.cache_put("d", b"v" * 40, ttl_s=4000, max_total_bytes=130)
    assert await cached(store, "a", "b", "c", "d") == ["a", "c", "d"]
    await store.cache_put("e", b"v" * 60, ttl_s=4000, max_total_bytes=130)
    assert await cached(store, "a", "c", "d", "e") == ["d", "e"]  # c, then a: 140 was over
    # The entry just put stays, even when it expires first: the others make room.
    await store.cache_put("f", b"v" * 50, ttl_s=10, max_total_bytes=130)
    assert await cached(store, "d", "e", "f") == ["e", "f"]
    assert await store.cache_bytes() == 110


async def test_replacing_a_cache_entry_counts_its_new_size_only(store: StateStore) -> None:
    await store.cache_put("k", b"x" * 60, ttl_s=600, max_total_bytes=100)
    await store.cache_put("k", b"y" * 80, ttl_s=600, max_total_bytes=100)
    assert await store.cache_bytes() == 80
    await store.cache_put("other", b"z" * 20, ttl_s=900, max_total_bytes=100)
    assert await cached(store, "k", "other") == ["k", "other"]  # 100 fits: nothing evicted
    await store.cache_put("k", b"w" * 10, ttl_s=600)  # without a bound too
    assert (await store.cache_get("k"), await store.cache_bytes()) == (b"w" * 10, 30)


async def test_an_entry_bigger_than_the_bound_is_refused_and_evicts_nothing(
    store: StateStore,
) -> None:
    await store.cache_put("a", b"a" * 30, ttl_s=600, max_total_bytes=100)
    await store.cache_put("b", b"b" * 30, ttl_s=900, max_total_bytes=100)
    await store.cache_put("big", b"x" * 101, ttl_s=1200, max_total_bytes=100)
    assert await cached(store, "a", "b", "big") == ["a", "b"]
    assert await store.cache_bytes() == 60
    # A key whose new value is refused is left empty: its older value is not served instead.
    await store.cache_put("a", b"x" * 101, ttl_s=600, max_total_bytes=100)
    assert await cached(store, "a", "b") == ["b"]
    assert await store.cache_bytes() == 30
    await store.cache_put("c", b"c" * 70, ttl_s=300, max_total_bytes=100)  # exactly the bound
    assert await cached(store, "b", "c") == ["b", "c"]


async def test_expired_cache_entries_stop_counting(store: StateStore, clock: FakeClock) -> None:
    await store.cache_put("short", b"s" * 50, ttl_s=600)
    await store.cache_put("long", b"l" * 30, ttl_s=6000)
    assert await store.cache_bytes() == 80
    clock.offset = 601
    assert await store.cache_get("short") is None
    assert await store.cache_bytes() == 30  # expired, though not yet trimmed
    assert await store.trim(clock(), audit_keep_s=1e6, journal_keep_s=1e6, verdict_keep_s=1e6)
    assert await store.cache_bytes() == 30
    # Nothing of the trimmed entry is left to count: 60 fits without evicting "long".
    await store.cache_put("new", b"n" * 30, ttl_s=600, max_total_bytes=60)
    assert await cached(store, "short", "long", "new") == ["long", "new"]
    assert await store.cache_bytes() == 60


async def test_the_cache_bound_holds_under_concurrent_puts(store: StateStore) -> None:
    keys = [f"record-{n:02d}" for n in range(60)]
    await asyncio.gather(
        *(
            store.cache_put(key, b"v" * (20 + n % 5 * 10), ttl_s=600 + n, max_total_bytes=500)
            for n, key in enumerate(keys)
        ),
        *(store.cache_get(key) for key in keys),
    )
    present = [await store.cache_get(key) for key in keys]
    total = sum(len(value) for value in present if value is not None)
    assert total == await store.cache_bytes()
    assert 500 - 60 < total <= 500


async def test_journal_keeps_acceptance_order_and_refuses_duplicates(store: StateStore) -> None:
    stored = [await store.journal_append(entry(f"J-{n:03d}")) for n in range(5)]
    assert [e.seq for e in stored] == sorted(e.seq for e in stored)
    assert len({e.seq for e in stored}) == 5
    with pytest.raises(DuplicateTicket):
        await store.journal_append(entry("J-002"))
    listed = await store.journal_list()
    assert [e.ticket for e in listed] == [f"J-{n:03d}" for n in range(5)]
    got = await store.journal_get("J-003")
    assert got is not None and got.payload == entry("J-003").payload and got.queue == "his"
    assert await store.journal_get("J-999") is None


async def test_a_queue_is_worked_by_one_owner_at_a_time_in_order(
    store: StateStore, clock: FakeClock
) -> None:
    for n in range(4):
        await store.journal_append(entry(f"J-{n}"))
    assert tickets(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == ["J-0", "J-1"]
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []  # head of line
    assert await store.journal_finish("J-0", "gw-a", "applied", "201 Created")
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []  # gw-a has J-1
    assert await store.journal_finish("J-1", "gw-a", "accepted", "503, will retry")  # released
    third = await store.journal_claim("his", "gw-b", limit=5, lease_s=30)
    assert tickets(third) == ["J-1", "J-2", "J-3"]
    assert (third[0].state, third[0].detail, third[0].queue) == (
        "accepted",
        "503, will retry",
        "his",
    )
    assert await store.journal_claim("his", "gw-a", limit=5, lease_s=30) == []
    clock.offset = 31  # gw-b's leases ran out
    assert tickets(await store.journal_claim("his", "gw-a", limit=1, lease_s=30)) == ["J-1"]
    # J-2 and J-3 are free to take, but they queue behind J-1, which gw-a holds.
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []
    done = await store.journal_get("J-0")
    assert done is not None and (done.state, done.detail) == ("applied", "201 Created")
    unfinished = await store.journal_list(frozenset({"accepted", "replaying"}))
    assert tickets(unfinished) == ["J-1", "J-2", "J-3"]


async def test_a_claim_stops_before_an_entry_another_owner_holds(store: StateStore) -> None:
    for n in range(3):
        await store.journal_append(entry(f"J-{n}"))
    assert tickets(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == ["J-0", "J-1"]
    assert await store.journal_finish("J-0", "gw-a", "accepted", "handed back")
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["J-0"]
    assert await store.journal_claim("his", "gw-a", limit=0, lease_s=30) == []


async def test_claiming_again_renews_the_owners_lease(store: StateStore, clock: FakeClock) -> None:
    for n in range(2):
        await store.journal_append(entry(f"J-{n}"))
    assert tickets(await store.journal_claim("his", "gw-a", limit=1, lease_s=30)) == ["J-0"]
    clock.offset = 20
    assert tickets(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == ["J-0", "J-1"]
    clock.offset = 35  # past the first lease, within the renewed one
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []
    clock.offset = 51
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["J-0", "J-1"]
    assert not await store.journal_finish("J-0", "gw-a", "applied", "too late")


async def test_queues_are_claimed_and_listed_apart(store: StateStore) -> None:
    for n in range(2):
        await store.journal_append(entry(f"H-{n}", queue="his"))
        await store.journal_append(entry(f"I-{n}", queue="insurance"))
    await store.journal_append(JournalEntry("X-0", "legacy", b"{}", 0.0))  # the queue ""
    assert tickets(await store.journal_claim("his", "gw-a", limit=5, lease_s=30)) == ["H-0", "H-1"]
    insurance = await store.journal_claim("insurance", "gw-b", limit=5, lease_s=30)
    assert tickets(insurance) == ["I-0", "I-1"]
    assert {e.queue for e in insurance} == {"insurance"}
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []
    assert tickets(await store.journal_claim("", "gw-c", limit=5, lease_s=30)) == ["X-0"]
    assert await store.journal_claim("lab", "gw-c", limit=5, lease_s=30) == []
    assert await store.journal_finish("I-0", "gw-b", "applied", "200")
    assert await store.journal_finish("H-0", "gw-a", "applied", "201")  # untouched by gw-b

    assert tickets(await store.journal_list()) == ["H-0", "I-0", "H-1", "I-1", "X-0"]
    assert tickets(await store.journal_list(queue="his")) == ["H-0", "H-1"]
    assert tickets(await store.journal_list(queue="insurance", limit=1)) == ["I-0"]
    assert tickets(await store.journal_list(queue="")) == ["X-0"]
    assert await store.journal_list(queue="lab") == []
    unfinished = frozenset({"accepted", "replaying"})
    assert tickets(await store.journal_list(unfinished, queue="insurance")) == ["I-1"]
    assert tickets(await store.journal_list(frozenset({"applied"}), queue="his")) == ["H-0"]
    assert await store.journal_list(frozenset(), queue="his") == []


async def test_a_note_keeps_the_lease_and_only_its_holder_writes_one(
    store: StateStore, clock: FakeClock
) -> None:
    for n in range(2):
        await store.journal_append(entry(f"J-{n}"))
    assert tickets(await store.journal_claim("his", "gw-a", limit=1, lease_s=30)) == ["J-0"]
    assert await store.journal_note("J-0", "gw-a", "insurance msgid M-1")
    noted = await store.journal_get("J-0")
    assert noted is not None and (noted.state, noted.detail) == ("replaying", "insurance msgid M-1")
    assert await store.journal_claim("his", "gw-b", limit=5, lease_s=30) == []  # still gw-a's
    assert not await store.journal_note("J-0", "gw-b", "insurance msgid M-2")
    assert await store.journal_finish("J-0", "gw-a", "applied", "settled M-1")
    assert not await store.journal_note("J-0", "gw-a", "late")  # finished
    done = await store.journal_get("J-0")
    assert done is not None and (done.state, done.detail) == ("applied", "settled M-1")

    assert tickets(await store.journal_claim("his", "gw-a", limit=1, lease_s=30)) == ["J-1"]
    assert await store.journal_note("J-1", "gw-a", "insurance msgid M-3")
    clock.offset = 31  # gw-a's lease ran out: gw-b takes the entry over, and sees the note
    (taken,) = await store.journal_claim("his", "gw-b", limit=1, lease_s=30)
    assert (taken.ticket, taken.state, taken.detail) == ("J-1", "replaying", "insurance msgid M-3")
    assert not await store.journal_note("J-1", "gw-a", "insurance msgid M-4")
    assert await store.journal_note("J-1", "gw-b", "insurance msgid M-3, asked for its status")
    assert tickets(await store.journal_list(frozenset({"replaying"}), queue="his")) == ["J-1"]
    with pytest.raises(KeyError):
        await store.journal_note("J-9", "gw-a", "")


async def test_a_replayer_whose_lease_ran_out_cannot_overwrite_the_result(
    store: StateStore, clock: FakeClock
) -> None:
    await store.journal_append(entry("J-0"))
    assert tickets(await store.journal_claim("his", "gw-a", 1, lease_s=30)) == ["J-0"]
    clock.offset = 31
    assert tickets(await store.journal_claim("his", "gw-b", 1, lease_s=30)) == ["J-0"]
    assert await store.journal_finish("J-0", "gw-b", "applied", "201 Created")
    assert not await store.journal_finish("J-0", "gw-a", "accepted", "timeout, retry")
    assert not await store.journal_finish("J-0", "gw-b", "failed", "late second answer")
    done = await store.journal_get("J-0")
    assert done is not None and (done.state, done.detail) == ("applied", "201 Created")
    assert await store.journal_claim("his", "gw-c", 5, lease_s=30) == []
    with pytest.raises(KeyError):
        await store.journal_finish("J-9", "gw-a", "applied", "")


async def test_audit_newest_first(store: StateStore) -> None:
    for n in range(3):
        await store.audit_append(
            AuditRecord(time.time() + n, "ops:li", "mode.set", f"t{n}", "drill")
        )
    assert [r.target for r in await store.audit_list(limit=2)] == ["t2", "t1"]


async def test_trim_keeps_unfinished_journal_entries(store: StateStore) -> None:
    now = time.time()
    await store.audit_append(AuditRecord(now - 100, "ops", "mode.set", "old", "r"))
    await store.audit_append(AuditRecord(now, "ops", "mode.set", "new", "r"))
    await store.journal_append(entry("J-open", now - 100))
    await store.journal_append(entry("J-done", now - 100))
    await store.journal_claim("his", "gw-a", limit=5, lease_s=30)
    assert await store.journal_finish("J-done", "gw-a", "applied", "")
    await store.put_verdict(Verdict("his/primary", "gw-gone", "open", now - 100))
    await store.put_verdict(Verdict("his/primary", "gw-live", "closed", now + 50))
    removed = await store.trim(now + 60, audit_keep_s=100, journal_keep_s=50, verdict_keep_s=50)
    assert removed >= 3
    assert [v.replica for v in await store.load_verdicts()] == ["gw-live"]
    assert [r.target for r in await store.audit_list()] == ["new"]
    assert [e.ticket for e in await store.journal_list()] == ["J-open"]


async def test_journal_stats_count_open_and_dead_entries_per_queue(store: StateStore) -> None:
    assert await store.journal_stats() == []
    for n, created_at in enumerate([10.0, 20.0, 30.0]):
        await store.journal_append(entry(f"H-{n}", created_at))
    await store.journal_append(entry("I-0", 5.0, queue="insurance"))
    assert await store.journal_stats() == [
        QueueStats("his", open=3, oldest_open_at=10.0, dead=0),
        QueueStats("insurance", open=1, oldest_open_at=5.0, dead=0),
    ]
    assert len(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == 2
    assert await store.journal_finish("H-0", "gw-a", "applied", "201")
    assert await store.journal_note("H-1", "gw-a", "sent")  # replaying is still open
    assert tickets(await store.journal_claim("insurance", "gw-b", 1, lease_s=30)) == ["I-0"]
    assert await store.journal_finish("I-0", "gw-b", "conflict", "settled elsewhere")
    assert await store.journal_stats() == [
        QueueStats("his", open=2, oldest_open_at=20.0, dead=0),
        QueueStats("insurance", open=0, oldest_open_at=None, dead=1),
    ]
    assert await store.journal_finish("H-1", "gw-a", "failed", "422")
    assert await store.journal_stats() == [
        QueueStats("his", open=1, oldest_open_at=30.0, dead=1),
        QueueStats("insurance", open=0, oldest_open_at=None, dead=1),
    ]
    assert await store.journal_reopen("H-1", "ops: retry") is not None
    assert await store.journal_discard("I-0", "ops: paid at the desk", NOW) is not None
    assert await store.journal_stats() == [QueueStats("his", open=2, oldest_open_at=20.0, dead=0)]


async def test_a_reopened_dead_letter_is_the_next_one_replayed_in_its_queue(
    store: StateStore,
) -> None:
    for n in range(4):
        await store.journal_append(entry(f"J-{n}"))
    await store.journal_append(entry("X-0", queue="insurance"))
    assert len(await store.journal_claim("his", "gw-a", limit=3, lease_s=30)) == 3
    assert await store.journal_finish("J-0", "gw-a", "conflict", "409 version")
    assert await store.journal_finish("J-1", "gw-a", "failed", "422")
    assert await store.journal_finish("J-2", "gw-a", "applied", "201")
    before = await store.journal_get("J-1")
    reopened = await store.journal_reopen("J-1", "ops:li retried")
    assert reopened is not None and before is not None
    assert (reopened.ticket, reopened.state, reopened.detail, reopened.seq, reopened.queue) == (
        "J-1",
        "accepted",
        "ops:li retried",
        before.seq,
        "his",
    )
    assert await store.journal_get("J-1") == reopened
    # No lease is left on it: another owner claims it at once, ahead of J-3; J-0 stays dead.
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["J-1", "J-3"]
    assert not await store.journal_finish("J-1", "gw-a", "applied", "late answer")
    assert await store.journal_finish("J-1", "gw-b", "applied", "201")
    assert await store.journal_reopen("J-0", "") is not None
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["J-0", "J-3"]

    for ticket in ("J-0", "J-2", "J-3", "X-0"):  # replaying or accepted, applied, accepted
        state = (await store.journal_get(ticket)).state  # type: ignore[union-attr]
        assert await store.journal_reopen(ticket, "no") is None, state
    with pytest.raises(KeyError):
        await store.journal_reopen("J-9", "")


async def test_dead_letters_and_unleased_entries_can_be_discarded(store: StateStore) -> None:
    for ticket in ("F", "C", "A", "D"):
        await store.journal_append(entry(ticket))
    assert len(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == 2
    assert await store.journal_finish("F", "gw-a", "failed", "422")
    assert await store.journal_finish("C", "gw-a", "conflict", "409")
    for ticket in ("F", "C", "A"):  # A was never claimed
        discarded = await store.journal_discard(ticket, f"ops:li dropped {ticket}", NOW)
        assert discarded is not None
        assert (discarded.state, discarded.detail) == ("discarded", f"ops:li dropped {ticket}")
        assert await store.journal_get(ticket) == discarded
        assert await store.journal_discard(ticket, "again", NOW) is None  # finished now
        assert await store.journal_reopen(ticket, "retry") is None  # and for good
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["D"]
    assert await store.journal_finish("D", "gw-b", "applied", "201")
    assert await store.journal_discard("D", "too late", NOW) is None
    assert tickets(await store.journal_list(frozenset({"discarded"}))) == ["F", "C", "A"]
    with pytest.raises(KeyError):
        await store.journal_discard("J-9", "", NOW)


async def test_an_entry_someone_holds_is_discarded_only_once_the_lease_ran_out(
    store: StateStore, clock: FakeClock
) -> None:
    for n in range(3):
        await store.journal_append(entry(f"J-{n}"))
    claimed_at = clock()
    assert len(await store.journal_claim("his", "gw-a", limit=2, lease_s=30)) == 2
    assert await store.journal_note("J-1", "gw-a", "sent msgid M-1")  # replaying
    for ticket in ("J-0", "J-1"):
        assert await store.journal_discard(ticket, "ops", claimed_at + 29) is None
        held = await store.journal_get(ticket)
        assert held is not None and held.state in {"accepted", "replaying"}
    assert await store.journal_finish("J-0", "gw-a", "accepted", "503, handed back")
    assert await store.journal_discard("J-0", "ops: after hand-back", claimed_at + 29)
    gone = await store.journal_discard("J-1", "ops: replayer gone", claimed_at + 31)
    assert gone is not None and gone.state == "discarded"
    # The former owner's late answer changes nothing, and nobody replays a discarded entry.
    assert not await store.journal_note("J-1", "gw-a", "sent again")
    assert not await store.journal_finish("J-1", "gw-a", "applied", "201 late")
    clock.offset = 31
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == ["J-2"]
    after = await store.journal_get("J-1")
    assert after is not None and (after.state, after.detail) == ("discarded", "ops: replayer gone")
    # Discarded entries are finished: retention drops them like any other.
    await store.trim(clock() + 100, audit_keep_s=1e6, journal_keep_s=50, verdict_keep_s=1e6)
    assert tickets(await store.journal_list()) == ["J-2"]


async def test_documents_by_kind_and_key(store: StateStore) -> None:
    await store.doc_put("traffic", "gw-a/101", b'{"requests": 10}')
    await store.doc_put("traffic", "gw-b/202", b'{"requests": 20}', ttl_s=600)
    await store.doc_put("incident", "level", b"2")
    assert await store.doc_get("traffic", "gw-a/101") == b'{"requests": 10}'
    assert await store.doc_get("traffic", "gw-c/303") is None
    assert await store.doc_get("drill", "gw-a/101") is None  # the same key, another kind
    assert await store.doc_list("traffic") == {
        "gw-a/101": b'{"requests": 10}',
        "gw-b/202": b'{"requests": 20}',
    }
    assert await store.doc_list("drill") == {}
    await store.doc_put("traffic", "gw-a/101", b'{"requests": 11}')  # replaced
    assert await store.doc_get("traffic", "gw-a/101") == b'{"requests": 11}'
    await store.doc_delete("traffic", "gw-b/202")
    await store.doc_delete("traffic", "gw-b/202")  # nothing there: nothing happens
    await store.doc_delete("drill", "never")
    assert await store.doc_list("traffic") == {"gw-a/101": b'{"requests": 11}'}
    assert await store.doc_list("incident") == {"level": b"2"}
    # A ":" in a kind or key does not make two (kind, key) pairs meet.
    await store.doc_put("a:b", "c", b"first")
    await store.doc_put("a", "b:c", b"second")
    assert (await store.doc_get("a:b", "c"), await store.doc_get("a", "b:c")) == (
        b"first",
        b"second",
    )
    assert await store.doc_list("a:b") == {"c": b"first"}
    assert await store.doc_list("a") == {"b:c": b"second"}


async def test_documents_expire_after_their_time_to_live(
    store: StateStore, clock: FakeClock
) -> None:
    await store.doc_put("drill", "d-1", b"running", ttl_s=0.2)
    await store.doc_put("drill", "d-2", b"running", ttl_s=0.2)
    await store.doc_put("drill", "d-2", b"finished")  # replaced without a time to live
    await store.doc_put("drill", "d-3", b"long", ttl_s=3600)
    await store.doc_put("drill", "d-4", b"short again", ttl_s=3600)
    await store.doc_put("drill", "d-4", b"short again", ttl_s=0.2)  # and with a shorter one

    async def expired() -> bool:
        return await store.doc_get("drill", "d-1") is None

    await wait_until_async(expired, within_s=5, what="a document to expire")
    await wait_until_async(
        lambda: _has_no("drill", "d-4", store), within_s=5, what="the shortened one to expire"
    )
    assert await store.doc_list("drill") == {"d-2": b"finished", "d-3": b"long"}
    if store.backend != "redis":  # Redis expires on its own clock, checked in its own tests
        clock.offset = 1e6
        assert await store.doc_list("drill") == {"d-2": b"finished"}
        assert await store.doc_get("drill", "d-3") is None


async def _has_no(kind: str, key: str, store: StateStore) -> bool:
    return await store.doc_get(kind, key) is None


async def test_trim_counts_the_expired_documents_it_removes(store: StateStore) -> None:
    await store.doc_put("traffic", "gw-a/1", b"old", ttl_s=0.1)
    await store.doc_put("traffic", "gw-b/2", b"live", ttl_s=3600)
    await store.doc_put("incident", "level", b"0")
    await wait_until_async(
        lambda: _has_no("traffic", "gw-a/1", store), within_s=5, what="a document to expire"
    )
    keep = {"audit_keep_s": 1e6, "journal_keep_s": 1e6, "verdict_keep_s": 1e6}
    assert await store.trim(time.time(), **keep) == 1
    assert await store.trim(time.time(), **keep) == 0
    assert await store.doc_list("traffic") == {"gw-b/2": b"live"}
    assert await store.doc_get("incident", "level") == b"0"


async def test_a_state_file_from_before_documents_opens_with_them(tmp_path: Path) -> None:
    import sqlite3

    from resilgate.state.sqlite import SqliteStore

    path = tmp_path / "state.db"
    older = SqliteStore(path)
    await older.open()
    await older.journal_append(entry("J-0"))
    await older.close()
    with sqlite3.connect(path) as db:  # as the previous version left it
        db.executescript("DROP TABLE docs; DROP INDEX journal_queue_dead;")
    for _ in range(2):
        store = SqliteStore(path)
        await store.open()
        try:
            await store.doc_put("incident", "level", b"1")
            assert await store.doc_list("incident") == {"level": b"1"}
            assert [s.open for s in await store.journal_stats()] == [1]
        finally:
            await store.close()
