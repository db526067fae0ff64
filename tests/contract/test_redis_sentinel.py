"""The Redis store behind Sentinel: it finds the master, takes passwords from the environment
only, and follows a failover to the promoted replica."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from resilgate.config import StateConfig
from resilgate.state.records import ForcedMode, JournalEntry
from resilgate.state.redis import RedisStore
from resilgate.state.redis_target import RedisTarget
from resilgate.state.store import StoreUnavailable
from tests.conftest import wait_until_async
from tests.redis_sentinel import (
    MASTER_NAME,
    REDIS_PASSWORD,
    SENTINEL_PASSWORD,
    SentinelSet,
    sentinel_set,
)

__all__ = ["sentinel_set"]  # fixture used here

PASSWORDS = {
    "RESILGATE_REDIS_PASSWORD": REDIS_PASSWORD,
    "RESILGATE_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
}
OpenStore = Callable[..., Awaitable[RedisStore]]


def state(sentinels: SentinelSet, first: tuple[str, ...] = ()) -> StateConfig:
    return StateConfig.model_validate(
        {
            "backend": "redis",
            "redis_sentinel": {
                "hosts": [*first, f"127.0.0.1:{sentinels.sentinel.port}"],
                "master": MASTER_NAME,
            },
        }
    )


@pytest.fixture
async def open_store(tmp_path: Path, sentinel_set: SentinelSet) -> AsyncIterator[OpenStore]:
    opened: list[RedisStore] = []

    async def make(
        name: str,
        environ: dict[str, str] = PASSWORDS,
        first: tuple[str, ...] = (),
        op_timeout_s: float = 1.0,
    ) -> RedisStore:
        target = RedisTarget.from_config(state(sentinel_set, first), environ)
        spool = tmp_path / f"spool-{name}.db"
        store = RedisStore(target, spool_path=spool, op_timeout_s=op_timeout_s)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_the_store_finds_the_master_through_sentinel(
    sentinel_set: SentinelSet, open_store: OpenStore
) -> None:
    store = await open_store("gw-a")
    assert store.reachable, store.last_error
    entry = JournalEntry("T-1", "his-orders-write", b"{}", time.time(), queue="his")
    await store.journal_append(entry)
    assert await store.spooled() == 0  # in Redis, not in the local spool
    got = await store.journal_get("T-1")
    assert got is not None and got.route == "his-orders-write"
    with sentinel_set.data_client(sentinel_set.master) as master:
        assert master.keys("resilgate:*"), "the write went to the master"
    assert store.url.startswith("sentinel://127.0.0.1:")
    assert REDIS_PASSWORD not in repr(store) and SENTINEL_PASSWORD not in repr(store)


@pytest.mark.parametrize("first", ["refused", "silent"])
async def test_a_dead_first_sentinel_does_not_cut_the_store_off(
    open_store: OpenStore, first: str
) -> None:
    """The node that dies in a failover often takes its sentinel along: the next sentinel
    must still be asked within one operation's time."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        if first == "silent":
            dead.listen()  # connects, never answers: a stopped process or a lost node
        address = f"127.0.0.1:{dead.getsockname()[1]}"
        store = await open_store("gw-a", first=(address,), op_timeout_s=0.5)
        for n in range(5):
            mode = ForcedMode(f"route-{n}", "dr", "test", "ops:li", time.time())
            await store.put_mode(mode)  # StoreUnavailable would fail the test
        assert len(await store.load_modes()) == 5


async def test_without_the_redis_password_the_store_says_why(open_store: OpenStore) -> None:
    store = await open_store("gw-a", {"RESILGATE_SENTINEL_PASSWORD": SENTINEL_PASSWORD})
    assert not store.reachable
    assert "auth" in store.last_error.lower(), store.last_error
    with pytest.raises(StoreUnavailable):
        await store.load_modes()


async def test_after_a_failover_the_store_writes_to_the_promoted_replica(
    sentinel_set: SentinelSet, open_store: OpenStore
) -> None:
    writer, reader = await open_store("gw-a"), await open_store("gw-b")
    before = ForcedMode("his", "dr", "before the failover", "ops:li", time.time())
    await writer.put_mode(before)
    with sentinel_set.data_client(sentinel_set.master) as master:
        offset = master.info("replication")["master_repl_offset"]
    with sentinel_set.data_client(sentinel_set.replica) as replica:
        await wait_until_async(
            lambda: replica.info("replication")["slave_repl_offset"] >= offset,
            10,
            "the replica to hold the mode",
        )
    with sentinel_set.sentinel.client() as sentinel:
        assert sentinel.sentinel_failover(MASTER_NAME)
    started = time.monotonic()
    await wait_until_async(
        lambda: sentinel_set.master_port() == sentinel_set.replica.port, 20, "the promotion"
    )

    after = ForcedMode("insurance", "fallback", "after the failover", "ops:li", time.time())

    async def written() -> bool:
        try:
            await writer.put_mode(after)
        except StoreUnavailable:
            return False
        return True

    await wait_until_async(written, 20, "a write to succeed after the failover")
    print(f"\nwrites succeed {time.monotonic() - started:.2f}s after SENTINEL FAILOVER")
    with sentinel_set.data_client(sentinel_set.replica) as promoted:
        assert promoted.info("replication")["role"] == "master"
    modes = await wait_until_async(
        lambda: _both(reader), 10, "the other gateway to read both modes"
    )
    assert modes["his"].reason == "before the failover"
    assert modes["insurance"].reason == "after the failover"


async def _both(store: RedisStore) -> dict[str, ForcedMode] | None:
    try:
        modes = await store.load_modes()
    except StoreUnavailable:
        return None
    return modes if {"his", "insurance"} <= modes.keys() else None
