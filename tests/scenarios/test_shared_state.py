"""Gateways sharing state: mode changes propagate, and a Redis outage does not stop routing."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from resilgate.state.records import JournalEntry
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.gateway import admin_cli_ok, primary, start_gateway
from tests.redis_server import RedisServer

ROUTES = [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}}]


def seen_lags(gateway: ServerProcess, target: str) -> dict[int, float]:
    """Per worker pid, how long after it was set the worker saw the mode (ms)."""
    return {
        record["pid"]: record["lag_ms"]
        for record in gateway.log_records()
        if record.get("event") == "mode_seen" and record.get("target") == target
    }


def resilgate_mode(gateway: ServerProcess, *args: str) -> str:
    """Run ``resilgate mode ...`` the way ops would, against a gateway's admin API."""
    return admin_cli_ok("mode", *args, admin=gateway)


async def set_mode_and_measure(
    through: ServerProcess, gateways: list[ServerProcess], workers_each: int
) -> list[float]:
    target = "all"  # the route: each test has its own store, so no earlier mode lingers
    await asyncio.to_thread(
        resilgate_mode, through, "set", target, "dr", "--reason", "drill: primary DC switch"
    )
    await asyncio.to_thread(
        wait_until,
        lambda: all(len(seen_lags(g, target)) == workers_each for g in gateways),
        5,
        "every worker to see the mode",
    )
    return [lag for g in gateways for lag in seen_lags(g, target).values()]


async def test_mode_reaches_every_sqlite_worker_within_a_second(
    spawn: Spawner, tmp_path: Path
) -> None:
    from resilgate.state.sqlite import SqliteStore

    echo = spawn.simulator("echo")
    db = tmp_path / "state.db"
    gateway = start_gateway(
        spawn,
        {"echo": primary(echo.url())},
        ROUTES,
        workers=2,
        state={"backend": "sqlite", "path": str(db)},
    )
    lags = await set_mode_and_measure(gateway, [gateway], workers_each=2)
    print(f"sqlite, 2 workers: mode seen after {sorted(lags)} ms")
    assert max(lags) < 1000

    listed = json.loads(await asyncio.to_thread(resilgate_mode, gateway, "list", "--json"))
    assert [(m["mode"], m["expires_at"], m["actor"]) for m in listed["modes"]] == [
        ("dr", None, "test-operator")
    ]
    target = listed["modes"][0]["target"]
    await asyncio.to_thread(resilgate_mode, gateway, "clear", target, "--reason", "drill over")
    await asyncio.to_thread(
        wait_until,
        lambda: (
            sum(
                r.get("event") == "mode_cleared_seen" and r.get("target") == target
                for r in gateway.log_records()
            )
            == 2
        ),
        5,
        "both workers to see the mode cleared",
    )
    store = SqliteStore(db)
    await store.open()
    try:
        audit = await store.audit_list()
    finally:
        await store.close()
    assert [(a.action, a.target, a.reason) for a in audit[:2]] == [
        ("mode.clear", target, "drill over"),
        ("mode.set", target, "drill: primary DC switch"),
    ]


async def test_mode_reaches_every_redis_replica_within_a_second(
    spawn: Spawner, tmp_path: Path
) -> None:

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        echo = spawn.simulator("echo")
        state = {"backend": "redis", "redis_url": redis.url, "spool_path": str(tmp_path / "s.db")}
        replicas = [
            start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES, name=f"gw-{n}", state=state)
            for n in range(2)
        ]
        # through replica gw-0's admin API; seen by gw-0 and gw-1
        lags = await set_mode_and_measure(replicas[0], replicas, workers_each=1)
    finally:
        redis.stop()
    print(f"redis, 2 replicas: mode seen after {sorted(lags)} ms")
    assert max(lags) < 1000


async def test_redis_outage_keeps_routing_and_loses_no_acknowledged_entry(
    spawn: Spawner, tmp_path: Path
) -> None:
    from resilgate.state.redis import RedisStore

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    echo = spawn.simulator("echo")
    state = {"backend": "redis", "redis_url": redis.url, "spool_path": str(tmp_path / "gw.db")}
    gateway = start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES, state=state)
    journal = RedisStore(redis.url, spool_path=tmp_path / "spool.db")
    await journal.open()
    acknowledged: list[str] = []
    routed: dict[str, int] = {"ok": 0, "failed": 0, "during_outage": 0}
    outage = asyncio.Event()
    done = asyncio.Event()

    async def append_500() -> None:
        for n in range(500):
            ticket = f"J-{n:04d}"
            await journal.journal_append(
                JournalEntry(ticket, "his-orders-write", b"{}", time.time())
            )
            acknowledged.append(ticket)
            if n == 100:
                redis.kill(signal.SIGKILL)
                outage.set()
            await asyncio.sleep(0.002)  # pacing, so the outage spans many appends

    async def route_requests(client: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with client.get(gateway.url() + "/echo/during") as resp:
                routed["ok" if resp.status == 200 else "failed"] += 1
                if outage.is_set() and not redis.running:
                    routed["during_outage"] += 1

    try:
        async with aiohttp.ClientSession() as client:
            router = asyncio.create_task(route_requests(client))
            await append_500()
            await asyncio.to_thread(
                wait_until,
                lambda: any(
                    r.get("event") == "state_store_unreachable" for r in gateway.log_records()
                ),
                5,
                "the gateway to notice the outage",
            )
            redis.restart()
            deadline = time.monotonic() + 20
            while await journal.spooled():
                assert time.monotonic() < deadline, "spool never drained"
                await asyncio.sleep(0.02)
            done.set()
            await router
        stored = [e.ticket for e in await journal.journal_list(limit=10_000)]

        def recovered() -> bool:
            events = [r.get("event") for r in gateway.log_records()]
            lost = max(i for i, event in enumerate(events) if event == "state_store_unreachable")
            return "state_store_ok" in events[lost:]

        await asyncio.to_thread(wait_until, recovered, 5, "the gateway to see the store again")
    finally:
        await journal.close()
        redis.stop()
    assert stored == acknowledged  # each acknowledged entry exactly once, in acceptance order
    assert len(acknowledged) == 500
    assert routed["failed"] == 0
    assert routed["during_outage"] > 0
    print(f"routed during the Redis outage: {routed}")


def test_gateway_warns_when_redis_would_lose_acknowledged_writes(
    spawn: Spawner, tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    redis = redis_factory(persistence=("--appendonly", "no", "--save", ""))
    redis.start()
    echo = spawn.simulator("echo")
    state = {"backend": "redis", "redis_url": redis.url, "spool_path": str(tmp_path / "s.db")}
    gateway = start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES, state=state)
    warning = wait_until(
        lambda: [r for r in gateway.log_records() if r.get("event") == "state_store_not_durable"],
        5,
        "the durability warning",
    )
    assert "appendonly" in warning[0]["detail"]
