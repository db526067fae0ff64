"""Two gateway replicas sharing Redis: breaker verdicts travel through the store, and a
replica with a bad link moves the fleet only when a quorum agrees."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from resilgate.fleet import DEMAND_S, LEASE_RETRY_S
from tests.conftest import Spawner, wait_until, wait_until_async
from tests.failover_stack import FAST_HEALTH, Stack, set_fault, start_stack
from tests.load import steady
from tests.redis_server import RedisServer

ROUTES = [
    {
        "name": "his-read",
        "upstream": "his",
        "match": {"path_prefix": "/fhir/", "methods": ["GET"]},
        "timeouts": {"connect_s": 0.5, "total_s": 2.0},
    }
]


def dead_port() -> int:
    """A loopback port nobody listens on: connecting is refused (a replica's bad link)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def replicas(
    spawn: Spawner,
    tmp_path: Path,
    redis: RedisServer,
    health: dict[str, Any],
    cut_link: bool = False,
) -> tuple[Stack, Stack]:
    """Replicas A and B sharing Redis and the simulators; with ``cut_link`` A's link to the
    primary is cut (refused), B's is fine."""
    state = {"backend": "redis", "redis_url": redis.url}
    b = start_stack(
        spawn,
        "his",
        ROUTES,
        dr_read_only=True,
        health=health,
        name="replica-b",
        state={**state, "spool_path": str(tmp_path / "b-spool.db")},
    )
    a = start_stack(
        spawn,
        "his",
        ROUTES,
        dr_read_only=True,
        health=health,
        name="replica-a",
        primary=b.primary,
        dr=b.dr,
        primary_url=f"http://127.0.0.1:{dead_port()}" if cut_link else None,
        state={**state, "spool_path": str(tmp_path / "a-spool.db")},
    )
    return a, b


def reads(stack: Stack) -> Callable[[Any], Any]:
    url = f"{stack.url}/fhir/Patient/test-0001"
    return lambda http: http.get(url)


@pytest.mark.parametrize("quorum", [1, 2])
async def test_an_open_verdict_reaches_the_other_replica_within_a_second(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer, quorum: int
) -> None:
    health = {**FAST_HEALTH, "breaker": {**FAST_HEALTH["breaker"], "quorum": quorum}}
    cut_off, healthy = replicas(spawn, tmp_path, redis_server, health, cut_link=True)
    # Replica A cannot reach the primary; its own traffic opens its breaker.
    await steady(reads(cut_off), 50, 0.5)
    opened = wait_until(lambda: cut_off.events("breaker_opened"), 5, "A's breaker to open")[0]
    seen = wait_until(
        lambda: [
            r
            for r in healthy.events("remote_verdict_seen")
            if r["endpoint"] == "his/primary" and r["state"] == "open"
        ],
        5,
        "B to see A's verdict",
    )[0]
    lag_s = at(seen) - at(opened)
    stream = await steady(reads(healthy), 50, 1)
    adopted = healthy.events("quorum_open_adopted")
    print(
        f"\n[verdicts quorum={quorum}] seen after {lag_s * 1000:.0f} ms, "
        f"B served by {sorted({s.served_by for s in stream.samples})}"
    )
    assert lag_s < 1.0
    assert not stream.failures()
    if quorum == 1:
        assert adopted
        assert {s.served_by for s in stream.samples} == {"his/dr"}
    else:
        # One replica with a bad link does not move the fleet.
        assert not adopted
        assert {s.served_by for s in stream.samples} == {"his/primary"}


async def test_one_replica_holds_the_trial_lease_and_its_trials_close_both(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    first, second = replicas(spawn, tmp_path, redis_server, FAST_HEALTH)
    set_fault(first.primary, mode="error_rate", rate=1.0, status=503, path_prefix="/fhir/")
    await asyncio.gather(steady(reads(first), 50, 1), steady(reads(second), 50, 1))
    assert all(stack.events("breaker_opened") for stack in (first, second))
    set_fault(first.primary, mode="none")
    streams = await asyncio.gather(steady(reads(first), 50, 6), steady(reads(second), 50, 6))

    def how_closed(stack: Stack) -> list[str]:
        return [r["reason"] for r in stack.events("breaker_closed")]

    reasons = [how_closed(first), how_closed(second)]
    print(f"\n[trial lease] closed by: {reasons}")
    assert not any(stream.failures() for stream in streams)
    assert all(len(r) == 1 for r in reasons), reasons
    own = [r[0] for r in reasons if not r[0].startswith("trials passed at")]
    assert len(own) == 1, reasons  # one replica ran the trials, the other took its word
    assert all(stream.samples[-1].served_by == "his/primary" for stream in streams)


async def test_the_trial_lease_follows_the_traffic_to_another_replica(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    # Without jitter, the replica whose own traffic opened its breaker goes half-open first.
    health = {**FAST_HEALTH, "breaker": {**FAST_HEALTH["breaker"], "open_jitter": 0}}
    first, second = replicas(spawn, tmp_path, redis_server, health)
    primary = first.primary

    def kill() -> None:
        os.kill(primary.pid, signal.SIGKILL)
        primary.proc.wait()

    # Only the first replica has traffic while the primary is down: it takes the trial lease.
    await steady(reads(first), 50, 2.5, events={0.3: kill})
    await wait_until_async(
        lambda: all(stack.events("breaker_half_open") for stack in (first, second)),
        5,
        "both replicas to go half-open",
    )
    port = str(primary.port())
    await asyncio.to_thread(
        spawn.start, "sim-his-primary-again", ["simulate", "his", "--port", port]
    )
    back = time.monotonic()
    # Then the traffic moves to the second replica: the lease must follow it.
    stream = await steady(reads(second), 50, 8)
    on_primary = stream.served("his/primary")
    assert on_primary, (
        "the second replica never got the trial lease: no request reached the primary"
    )
    back_after_s = on_primary[0].sent_at - back
    left, taken = first.events("trial_lease_left"), second.events("trial_lease_taken")
    print(
        f"\n[lease handover] the second replica's traffic reached the primary "
        f"{back_after_s:.2f}s after its restart; lease left by the first at "
        f"{left[0]['timestamp'] if left else None}, taken by the second at "
        f"{taken[0]['timestamp'] if taken else None}"
    )
    failback = health["failback"]
    bound = DEMAND_S + 2 * LEASE_RETRY_S + failback["hold_down_s"] + failback["ramp_s"] + 2.0
    assert back_after_s < bound
    assert stream.samples[-1].served_by == "his/primary"
    assert first.events("trial_lease_taken") and left and taken
    assert at(left[0]) <= at(taken[0])  # handed over, never held by both
    closed = wait_until(lambda: first.events("breaker_closed"), 5, "the first replica to close")
    assert closed[0]["reason"].startswith("trials passed at"), closed
