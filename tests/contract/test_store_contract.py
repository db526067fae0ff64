"""One behavioural suite for every state backend: memory, SQLite, and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from resilgate.state.records import AuditRecord, ForcedMode, JournalEntry, Verdict
from resilgate.state.store import DuplicateTicket, StateStore

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


def entry(ticket: str, created_at: float = 0.0) -> JournalEntry:
    return JournalEntry(
        ticket, "his-orders-write", b'{"resourceType":"MedicationRequest"}', created_at
    )


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


async def test_journal_keeps_acceptance_order_and_refuses_duplicates(store: StateStore) -> None:
    stored = [await store.journal_append(entry(f"J-{n:03d}")) for n in range(5)]
    assert [e.seq for e in stored] == sorted(e.seq for e in stored)
    assert len({e.seq for e in stored}) == 5
    with pytest.raises(DuplicateTicket):
        await store.journal_append(entry("J-002"))
    listed = await store.journal_list()
    assert [e.ticket for e in listed] == [f"J-{n:03d}" for n in range(5)]
    got = await store.journal_get("J-003")
    assert got is not None and got.payload == entry("J-003").payload
    assert await store.journal_get("J-999") is None


async def test_journal_claims_are_exclusive_until_the_lease_ends(
    store: StateStore, clock: FakeClock
) -> None:
    for n in range(4):
        await store.journal_append(entry(f"J-{n}"))
    first = await store.journal_claim("gw-a", limit=3, lease_s=30)
    assert [e.ticket for e in first] == ["J-0", "J-1", "J-2"]
    second = await store.journal_claim("gw-b", limit=3, lease_s=30)
    assert [e.ticket for e in second] == ["J-3"]
    assert await store.journal_finish("J-0", "gw-a", "applied", "201 Created")
    assert await store.journal_finish("J-1", "gw-a", "accepted", "503, will retry")  # released
    third = await store.journal_claim("gw-b", limit=5, lease_s=30)
    assert [e.ticket for e in third] == ["J-1", "J-3"]
    clock.offset = 31  # gw-a's lease on J-2 ran out
    fourth = await store.journal_claim("gw-b", limit=5, lease_s=30)
    assert "J-2" in [e.ticket for e in fourth]
    done = await store.journal_get("J-0")
    assert done is not None and (done.state, done.detail) == ("applied", "201 Created")
    unfinished = await store.journal_list(frozenset({"accepted", "replaying"}))
    assert "J-0" not in [e.ticket for e in unfinished]


async def test_a_replayer_whose_lease_ran_out_cannot_overwrite_the_result(
    store: StateStore, clock: FakeClock
) -> None:
    await store.journal_append(entry("J-0"))
    assert [e.ticket for e in await store.journal_claim("gw-a", 1, lease_s=30)] == ["J-0"]
    clock.offset = 31
    assert [e.ticket for e in await store.journal_claim("gw-b", 1, lease_s=30)] == ["J-0"]
    assert await store.journal_finish("J-0", "gw-b", "applied", "201 Created")
    assert not await store.journal_finish("J-0", "gw-a", "accepted", "timeout, retry")
    assert not await store.journal_finish("J-0", "gw-b", "failed", "late second answer")
    done = await store.journal_get("J-0")
    assert done is not None and (done.state, done.detail) == ("applied", "201 Created")
    assert await store.journal_claim("gw-c", 5, lease_s=30) == []
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
    await store.journal_claim("gw-a", limit=5, lease_s=30)
    await store.journal_finish("J-done", "gw-a", "applied", "")
    await store.put_verdict(Verdict("his/primary", "gw-gone", "open", now - 100))
    await store.put_verdict(Verdict("his/primary", "gw-live", "closed", now + 50))
    removed = await store.trim(now + 60, audit_keep_s=100, journal_keep_s=50, verdict_keep_s=50)
    assert removed >= 3
    assert [v.replica for v in await store.load_verdicts()] == ["gw-live"]
    assert [r.target for r in await store.audit_list()] == ["new"]
    assert [e.ticket for e in await store.journal_list()] == ["J-open"]
