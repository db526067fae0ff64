"""What only the Redis backend promises: surviving Redis outages, replicas, failing fast."""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from resilgate.state.records import AuditRecord, ForcedMode, JournalEntry, Verdict
from resilgate.state.redis import RedisStore
from resilgate.state.store import DuplicateTicket, StoreUnavailable
from tests.conftest import wait_until_async
from tests.redis_server import DURABLE, RedisServer, redis_factory, redis_server

__all__ = ["redis_factory", "redis_server"]  # fixtures used here

OpenStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def open_store(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> AsyncIterator[OpenStore]:
    """Open RedisStores (each its own spool); all are closed before the servers go."""
    opened: list[RedisStore] = []

    async def make(url: str, name: str = "gw-a", **options: Any) -> RedisStore:
        store = RedisStore(url, spool_path=tmp_path / f"spool-{name}.db", **options)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def entry(ticket: str, queue: str = "his") -> JournalEntry:
    payload = b'{"resourceType":"ServiceRequest"}'
    return JournalEntry(ticket, f"{queue}-orders-write", payload, 0.0, queue=queue)


def tickets(entries: list[JournalEntry]) -> list[str]:
    return [e.ticket for e in entries]


async def test_sigkill_while_appending_500_loses_no_acknowledged_entry(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(redis_server.url)
    acknowledged: list[str] = []
    spooled_on_append = 0
    hundred, three_hundred, restarted = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def append_500() -> None:
        nonlocal spooled_on_append
        for n in range(500):
            if n == 100:
                hundred.set()  # Redis is killed while the next append is in flight
            if n == 300:
                three_hundred.set()
                await restarted.wait()  # the rest are appended while the spool drains
            stored = await store.journal_append(entry(f"J-{n:04d}"))
            acknowledged.append(stored.ticket)
            spooled_on_append += stored.seq == 0

    appender = asyncio.create_task(append_500())
    await hundred.wait()
    redis_server.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    await three_hundred.wait()
    assert await store.spooled() > 0
    await asyncio.to_thread(redis_server.restart)
    restarted_at = time.monotonic()
    restarted.set()
    await appender
    spooled_at_end = await store.spooled()
    await wait_until_async(lambda: _spool_empty(store), 15, "the spool to drain")
    drained_at = time.monotonic()

    stored = await store.journal_list(limit=10_000)
    assert len(acknowledged) == 500
    assert [e.ticket for e in stored] == acknowledged  # each once, in acceptance order
    assert all(a.seq < b.seq for a, b in itertools.pairwise(stored))
    other = await open_store(redis_server.url, "gw-b")  # what another replica sees
    assert [e.ticket for e in await other.journal_list(limit=10_000)] == acknowledged
    print(
        f"{spooled_on_append} of 500 acknowledged from the spool; outage "
        f"{restarted_at - killed_at:.3f}s; {spooled_at_end} still spooled when the appends "
        f"ended; spool empty {drained_at - restarted_at:.3f}s after the restart"
    )


async def _spool_empty(store: RedisStore) -> bool:
    return await store.spooled() == 0


async def test_a_change_reaches_another_replica_well_within_a_second(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    writer = await open_store(redis_server.url, "gw-a")
    reader = await open_store(redis_server.url, "gw-b")
    lags = []
    for n in range(10):
        target = f"his-{n}"
        await reader.wait_for_change(0)  # forget earlier announcements
        started = time.perf_counter()
        await writer.put_mode(ForcedMode(target, "dr", "drill", "ops:li", time.time()))
        while target not in await reader.load_modes():
            assert await reader.wait_for_change(1.0), f"{target} never announced"
        lags.append(time.perf_counter() - started)
    await writer.put_verdict(Verdict("his/primary", "gw-a", "open", time.time()))
    assert await reader.wait_for_change(1.0)
    assert [v.state for v in await reader.load_verdicts()] == ["open"]
    await writer.delete_mode("his-0")
    assert await reader.wait_for_change(1.0)
    assert "his-0" not in await reader.load_modes()
    print(
        f"mode seen by the other replica after {statistics.median(lags) * 1000:.1f} ms "
        f"(median), {max(lags) * 1000:.1f} ms (max) of {len(lags)}"
    )
    assert max(lags) < 1.0


async def test_conditional_mode_changes_reach_another_replica_and_keep_unknown_fields(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    writer = await open_store(redis_server.url, "gw-a")
    reader = await open_store(redis_server.url, "gw-b")
    now = time.time()
    drill = ForcedMode("his", "fallback", "drill D-1", "drill:D-1", now, now + 30)
    await reader.wait_for_change(0)  # forget earlier announcements
    assert await writer.put_mode_if_absent(drill, now) is None
    assert await reader.wait_for_change(1.0), "a conditional put was not announced"
    assert await reader.load_modes() == {"his": drill}
    assert await reader.delete_mode_if(drill)
    assert await writer.wait_for_change(1.0), "a conditional delete was not announced"
    assert await writer.load_modes() == {}

    # A newer replica's mode, with a field this version does not know: read as the fields it
    # knows, so deleting the mode as read still matches it.
    raw = Redis.from_url(redis_server.url)
    try:
        newer = (
            b'{"target":"his","mode":"dr","reason":"r","actor":"ops","set_at":5,'
            b'"expires_at":null,"scope":"fleet"}'
        )
        await raw.hset(f"{writer.namespace}:modes", "his", newer)
    finally:
        await raw.aclose()
    [read] = (await writer.load_modes()).values()
    assert await writer.put_mode_if_absent(drill, now) == read
    assert not await writer.delete_mode_if(ForcedMode("his", "dr", "r", "ops", 5.0, 6.0))
    assert await writer.delete_mode_if(read)
    assert await writer.load_modes() == {}


async def test_operations_fail_fast_while_redis_is_stopped_or_down(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    op_timeout = 0.2
    store = await open_store(redis_server.url, op_timeout_s=op_timeout)
    now = time.time()
    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "ping": store.ping,
        "load_modes": store.load_modes,
        "put_mode": lambda: store.put_mode(ForcedMode("his", "dr", "r", "ops", now)),
        "put_mode_if_absent": lambda: store.put_mode_if_absent(
            ForcedMode("his", "dr", "r", "ops", now), now
        ),
        "delete_mode_if": lambda: store.delete_mode_if(ForcedMode("his", "dr", "r", "ops", now)),
        "put_verdict": lambda: store.put_verdict(Verdict("his/a", "gw-a", "open", now)),
        "take_block": lambda: store.take_block("NEI", 1),
        "cache_get": lambda: store.cache_get("k"),
        "cache_put": lambda: store.cache_put("k", b"v", 60, max_total_bytes=100),
        "cache_bytes": store.cache_bytes,
        "journal_list": store.journal_list,
        "journal_claim": lambda: store.journal_claim("his", "gw-a", 10, 30),
        "journal_note": lambda: store.journal_note("J-stopped", "gw-a", "msgid M-1"),
        "audit_append": lambda: store.audit_append(AuditRecord(now, "ops", "a", "t", "r")),
        "trim": lambda: store.trim(now, 60, 60, 60),
    }

    async def all_fail_fast(state: str) -> float:
        slowest = 0.0
        for name, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await operation()
            took = time.monotonic() - started
            assert took < op_timeout + 0.3, f"{name} took {took:.2f}s while Redis is {state}"
            slowest = max(slowest, took)
        return slowest

    with redis_server.paused():
        started = time.monotonic()
        spooled = await store.journal_append(entry("J-stopped"))
        append_took = time.monotonic() - started
        assert spooled.seq == 0 and await store.spooled() == 1
        stopped = await all_fail_fast("stopped")
        assert "UNREACHABLE" in repr(store)
    await wait_until_async(lambda: _spool_empty(store), 10, "the spool to drain after SIGCONT")
    assert await store.journal_get("J-stopped") is not None
    assert "reachable, 0 journal entries spooled" in repr(store)

    redis_server.kill(signal.SIGKILL)
    down = await all_fail_fast("down")
    print(
        f"op timeout {op_timeout}s: slowest failure {stopped:.3f}s stopped, {down:.3f}s down; "
        f"append spooled after {append_took:.3f}s"
    )
    assert append_took < op_timeout + 0.3


@pytest.mark.parametrize(
    ("persistence", "warning"),
    [
        (DURABLE, None),
        (("--appendonly", "no", "--save", ""), "appendonly is 'no'"),
        (("--appendonly", "yes", "--appendfsync", "everysec"), "appendfsync is 'everysec'"),
        ((*DURABLE, "--rename-command", "CONFIG", ""), "cannot verify"),
    ],
)
async def test_durability_warning(
    redis_factory: Callable[..., RedisServer],
    open_store: OpenStore,
    persistence: tuple[str, ...],
    warning: str | None,
) -> None:
    server = redis_factory(persistence)
    server.start()
    store = await open_store(server.url)
    found = await store.durability_warning()
    if warning is None:
        assert found is None
    else:
        assert found is not None and warning in found and "\n" not in found
        print(found)


async def test_starts_with_redis_down_spools_across_a_restart_and_drains(
    redis_factory: Callable[..., RedisServer], open_store: OpenStore
) -> None:
    server = redis_factory()
    first = await open_store(server.url, "gw-a")  # Redis is not running yet
    assert "UNREACHABLE" in repr(first)
    assert "cannot verify" in (await first.durability_warning() or "")
    for n in range(10):
        assert (await first.journal_append(entry(f"J-{n:02d}"))).seq == 0
    with pytest.raises(DuplicateTicket):
        await first.journal_append(entry("J-03"))
    await first.close()  # the gateway restarts during the outage, on the same spool

    second = await open_store(server.url, "gw-a")
    assert await second.spooled() == 10
    for n in range(10, 20):
        await second.journal_append(entry(f"J-{n:02d}"))
    await asyncio.to_thread(server.start)
    assert await second.wait_for_change(5.0), "a reconnect must report possibly missed changes"
    await wait_until_async(lambda: _spool_empty(second), 10, "the spool to drain")
    listed = await second.journal_list()
    assert [e.ticket for e in listed] == [f"J-{n:02d}" for n in range(20)]
    assert [e.seq for e in listed] == list(range(1, 21))
    fresh = await second.journal_append(entry("J-20"))
    assert fresh.seq == 21  # straight to Redis once the spool is empty


async def test_spooled_entries_keep_their_queue(
    redis_factory: Callable[..., RedisServer], open_store: OpenStore
) -> None:
    server = redis_factory()  # down: every append is spooled
    store = await open_store(server.url)
    for n in range(3):
        assert (await store.journal_append(entry(f"H-{n}", "his"))).seq == 0
        assert (await store.journal_append(entry(f"I-{n}", "insurance"))).seq == 0
    spooled = await store.journal_get("I-1")
    assert spooled is not None and (spooled.queue, spooled.seq) == ("insurance", 0)
    await asyncio.to_thread(server.start)
    await wait_until_async(lambda: _spool_empty(store), 10, "the spool to drain")

    moved = await store.journal_get("I-1")
    assert moved is not None and moved.queue == "insurance" and moved.seq > 0
    assert tickets(await store.journal_list(queue="his")) == ["H-0", "H-1", "H-2"]
    insurance = await store.journal_claim("insurance", "gw-a", limit=5, lease_s=30)
    assert tickets(insurance) == ["I-0", "I-1", "I-2"]
    assert {e.queue for e in insurance} == {"insurance"}
    assert tickets(await store.journal_claim("his", "gw-b", limit=5, lease_s=30)) == [
        "H-0",
        "H-1",
        "H-2",
    ]


async def test_leases_expire_and_finished_entries_are_trimmed(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    now = [1_000_000.0]
    store = await open_store(redis_server.url, clock=lambda: now[0])
    for n in range(3):
        await store.journal_append(entry(f"J-{n}"))
    assert tickets(await store.journal_claim("his", "gw-a", 2, lease_s=30)) == ["J-0", "J-1"]
    assert await store.journal_claim("his", "gw-b", 5, lease_s=30) == []
    now[0] += 31
    assert tickets(await store.journal_claim("his", "gw-b", 5, lease_s=30)) == [
        "J-0",
        "J-1",
        "J-2",
    ]
    await store.journal_finish("J-0", "gw-b", "applied", "201")
    await store.journal_note("J-1", "gw-b", "sent msgid M-1")
    await store.journal_finish("J-1", "gw-b", "failed", "409")
    with pytest.raises(KeyError):
        await store.journal_finish("J-9", "gw-b", "applied", "")
    await store.cache_put("allergies", b"x", ttl_s=60)
    now[0] += 10
    assert await store.trim(now[0], audit_keep_s=3600, journal_keep_s=20, verdict_keep_s=3600) == 0
    now[0] += 11
    assert await store.trim(now[0], audit_keep_s=3600, journal_keep_s=20, verdict_keep_s=3600) == 2
    assert [e.ticket for e in await store.journal_list()] == ["J-2"]
    # What a claim reads (the queue's open set) and the queue by ticket went with the entries.
    raw = Redis.from_url(redis_server.url)
    try:
        assert await raw.zrange(f"{store.namespace}:journal:open:his", 0, -1) == [b"J-2"]
        assert await raw.hkeys(f"{store.namespace}:journal:queue") == [b"J-2"]
    finally:
        await raw.aclose()
    now[0] += 60
    assert await store.cache_get("allergies") is None
    assert await store.trim(now[0], audit_keep_s=3600, journal_keep_s=20, verdict_keep_s=3600) == 1


async def test_cache_entries_redis_expired_itself_stop_counting_once_trimmed(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    now = [1_000_000.0]
    store = await open_store(redis_server.url, clock=lambda: now[0])
    names = [f"{store.namespace}:cache:record-{n}" for n in range(5)]
    raw = Redis.from_url(redis_server.url)

    async def gone() -> bool:
        return await raw.exists(*names) == 0

    try:
        await store.cache_put("kept", b"k" * 10, ttl_s=3600)
        for _ in range(3):
            for n in range(5):
                await store.cache_put(f"record-{n}", b"r" * 100, ttl_s=0.02)
            await wait_until_async(gone, 5, "Redis to expire the values (PX)")
            now[0] += 1  # and the caller's clock agrees
            assert await store.cache_bytes() == 10
            assert await store.trim(now[0], 3600, 3600, 3600) == 5
            assert await raw.get(f"{store.namespace}:cache-bytes") == b"10"
            assert await raw.hkeys(f"{store.namespace}:cache-size") == [
                f"{store.namespace}:cache:kept".encode()
            ]
        await store.cache_put("new", b"n" * 100, ttl_s=3600, max_total_bytes=110)
        assert await store.cache_get("kept") == b"k" * 10
    finally:
        await raw.aclose()


async def test_spool_of_a_worker_that_does_not_come_back_is_drained(
    redis_factory: Callable[..., RedisServer], open_store: OpenStore
) -> None:
    server = redis_factory()  # down while both workers spool
    first = await open_store(server.url, "node")
    second = await open_store(server.url, "node")  # same spool_path: takes the next slot
    for n in range(3):
        await first.journal_append(entry(f"A-{n}"))
        await second.journal_append(entry(f"B-{n}"))
    spooled = await second.journal_get("B-1")  # findable while Redis is down
    assert spooled is not None and spooled.state == "accepted"
    await first.close()
    await second.close()

    only = await open_store(server.url, "node")  # the node comes back with one worker
    assert await only.spooled() == 6
    await asyncio.to_thread(server.start)
    await wait_until_async(lambda: _spool_empty(only), 10, "the spool to drain")
    listed = [e.ticket for e in await only.journal_list()]
    assert sorted(listed) == ["A-0", "A-1", "A-2", "B-0", "B-1", "B-2"]
    assert listed.index("B-0") < listed.index("B-1") < listed.index("B-2")


async def test_documents_expire_in_redis_and_their_index_is_pruned(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(redis_server.url)
    ns = store.namespace
    raw = Redis.from_url(redis_server.url)
    try:
        await store.doc_put("traffic", "gw-a/1", b"a", ttl_s=30)
        await store.doc_put("traffic", "gw-b/2", b"b")
        await store.doc_put("drill", "d-1", b"d", ttl_s=0.05)
        assert 0 < await raw.pttl(f"{ns}:doc:traffic:gw-a/1") <= 30_000
        assert await raw.pttl(f"{ns}:doc:traffic:gw-b/2") == -1  # no time to live: kept
        assert await raw.smembers(f"{ns}:docs") == {b"traffic", b"drill"}

        async def expired() -> bool:
            return await raw.exists(f"{ns}:doc:drill:d-1") == 0

        await wait_until_async(expired, 5, "Redis to expire the document (PX)")
        assert await raw.smembers(f"{ns}:docs:drill") == {b"d-1"}  # until someone prunes it
        assert await store.doc_list("drill") == {}
        assert await raw.exists(f"{ns}:docs:drill") == 0
        assert await raw.smembers(f"{ns}:docs") == {b"traffic"}  # no keys left: kind dropped
        await store.doc_put("traffic", "gw-a/1", b"a2", ttl_s=0.05)
        await wait_until_async(
            lambda: _gone(raw, f"{ns}:doc:traffic:gw-a/1"), 5, "the second expiry"
        )
        assert await store.trim(time.time(), 3600, 3600, 3600) == 1  # trim prunes every kind
        assert await raw.smembers(f"{ns}:docs:traffic") == {b"gw-b/2"}
        assert await store.doc_list("traffic") == {"gw-b/2": b"b"}
    finally:
        await raw.aclose()


async def _gone(raw: Redis, name: str) -> bool:
    return await raw.exists(name) == 0


async def _stats(store: RedisStore) -> dict[str, tuple[int, int]]:
    return {s.queue: (s.open, s.dead) for s in await store.journal_stats()}


async def test_the_queue_stats_index_is_built_for_an_older_journal_and_kept_by_trim(
    redis_server: RedisServer, open_store: OpenStore
) -> None:
    first = await open_store(redis_server.url, "gw-a")
    for ticket, queue in [("H-0", "his"), ("H-1", "his"), ("I-0", "insurance"), ("L-0", "lab")]:
        await first.journal_append(entry(ticket, queue))
    for queue in ("his", "insurance"):
        await first.journal_claim(queue, "gw-a", limit=1, lease_s=30)
    assert await first.journal_finish("H-0", "gw-a", "failed", "422")
    assert await first.journal_finish("I-0", "gw-a", "conflict", "409")
    ns = first.namespace
    raw = Redis.from_url(redis_server.url)
    try:
        # What the previous version left: no queue names, dead sets or mark.
        index = [f"{ns}:journal:{name}" for name in ("queues", "indexed", "dead:his")]
        await raw.delete(*index, f"{ns}:journal:dead:insurance")
        second = await open_store(redis_server.url, "gw-b")  # builds it on open
        expected = {"his": (1, 1), "insurance": (0, 1), "lab": (1, 0)}
        assert await _stats(second) == expected
        # An older replica still running finishes a dead letter without indexing it, and its
        # trim drops an entry without taking it from the dead set.
        await first.journal_claim("his", "gw-a", limit=1, lease_s=30)
        assert await first.journal_finish("H-1", "gw-a", "failed", "500")
        await raw.zrem(f"{ns}:journal:dead:his", "H-1")
        await raw.zadd(f"{ns}:journal:dead:lab", {"L-gone": 99})
        assert await _stats(second) == {"his": (0, 1), "insurance": (0, 1), "lab": (1, 1)}
        await second.trim(time.time(), 3600, 3600, 3600)
        assert await _stats(second) == {"his": (0, 2), "insurance": (0, 1), "lab": (1, 0)}
        assert await second.journal_discard("I-0", "ops", time.time()) is not None
        await second.trim(time.time(), 3600, 3600, 3600)  # a queue with nothing left goes
        assert await raw.smembers(f"{ns}:journal:queues") == {b"his", b"lab"}
    finally:
        await raw.aclose()


async def test_a_spooled_entry_is_discarded_once_it_reached_redis(
    redis_factory: Callable[..., RedisServer], open_store: OpenStore
) -> None:
    server = redis_factory()  # down: the append is spooled
    store = await open_store(server.url)
    await store.journal_append(entry("J-0"))
    with pytest.raises(StoreUnavailable):  # not KeyError: the entry exists
        await store.journal_discard("J-0", "ops", time.time())
    await asyncio.to_thread(server.start)
    await wait_until_async(lambda: _spool_empty(store), 10, "the spool to drain")
    assert await _stats(store) == {"his": (1, 0)}  # the move indexed its queue
    discarded = await store.journal_discard("J-0", "ops", time.time())
    assert discarded is not None and discarded.state == "discarded"
    assert await _stats(store) == {}
    with pytest.raises(KeyError):
        await store.journal_reopen("J-9", "")
