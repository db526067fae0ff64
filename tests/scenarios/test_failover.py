"""Failover to the DR site under a steady stream of requests, with real processes failing for
real (SIGKILL, SIGSTOP, fault modes). Each test prints what it measured."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import aiohttp

from tests.conftest import Spawner, wait_until
from tests.failover_stack import Stack, set_fault, start_stack, traffic
from tests.load import steady

READ_TIMEOUT_S = 2.0
HIS_READS = [
    {
        "name": "his-read",
        "upstream": "his",
        "criticality": "core",
        "match": {"path_prefix": "/fhir/", "methods": ["GET", "HEAD"]},
        "timeouts": {"connect_s": 0.5, "total_s": READ_TIMEOUT_S},
    },
    {
        "name": "his-write",
        "upstream": "his",
        "criticality": "core",
        "match": {"path_prefix": "/fhir/", "methods": ["POST", "PUT"]},
        "timeouts": {"connect_s": 0.5, "total_s": 1.0},
    },
]


def read_patient(stack: Stack, patient: str = "test-0001") -> Any:
    url = f"{stack.url}/fhir/Patient/{patient}"
    return lambda http: http.get(url)


def report(name: str, **figures: Any) -> None:
    print(f"\n[{name}] " + ", ".join(f"{key}={value}" for key, value in figures.items()))


async def test_sigkill_of_the_primary_under_200_reads_per_second(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(stack.primary.pid, signal.SIGKILL)

    stream = await steady(read_patient(stack), 200, 10, events={3.0: kill})
    after = stream.sent_after(killed_at[0])
    report(
        "sigkill",
        requests=len(stream),
        failures=len(stream.failures()),
        after_kill=len(after),
        slowest_ms=round(max(s.latency_s for s in stream.samples) * 1000, 1),
        retries=len(stack.events("endpoint_failed")),
    )
    assert not stream.failures()
    assert len(stream.served("his/primary")) > 0
    assert {s.served_by for s in after} == {"his/dr"}


async def test_sigstop_of_the_primary_under_500_reads_per_second(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    try:
        stream = await steady(
            read_patient(stack),
            500,
            6,
            events={2.0: lambda: os.kill(stack.primary.pid, signal.SIGSTOP)},
        )
    finally:
        os.kill(stack.primary.pid, signal.SIGCONT)
    slow = stream.slower_than(0.1)
    slowest = max(s.latency_s for s in stream.samples)
    report(
        "sigstop",
        requests=len(stream),
        failures=len(stream.failures()),
        over_100ms=len(slow),
        slowest_ms=round(slowest * 1000, 1),
        hedged=sum(1 for r in stack.events("access") if r.get("outcome") == "hedged"),
    )
    assert not stream.failures()
    assert slowest < READ_TIMEOUT_S + 0.25
    assert len(slow) < 50


async def test_503_opens_the_breaker_and_only_trials_and_probes_reach_the_primary(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    set_fault(stack.primary, mode="error_rate", rate=1.0, status=503, path_prefix="/fhir/")
    stream = await steady(read_patient(stack), 200, 5)
    opened = stack.events("breaker_opened")
    half_opened = stack.events("breaker_half_open")
    reached = traffic(stack.primary)
    trials_allowed = 5 + 2 * len(half_opened) + 5  # before opening, trials, in flight at opening
    report(
        "503",
        requests=len(stream),
        failures=len(stream.failures()),
        primary_requests=reached,
        openings=len(opened),
        half_opens=len(half_opened),
    )
    assert opened and opened[0]["endpoint"] == "his/primary"
    assert not stream.failures()  # reads that met a 503 were retried at the DR site
    assert reached <= trials_allowed


async def test_404_passes_through_and_keeps_the_breaker_closed(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    stream = await steady(read_patient(stack, "no-such-patient"), 100, 2)
    assert {s.status for s in stream.samples} == {404}
    assert {s.served_by for s in stream.samples} == {"his/primary"}
    assert not stack.events("breaker_opened")
    assert traffic(stack.dr) == 0


async def test_post_without_key_is_not_retried_and_writes_skip_read_only(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    set_fault(stack.primary, mode="hang", path_prefix="/fhir/MedicationRequest")
    order = {"resourceType": "MedicationRequest", "status": "active", "intent": "order"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.url}/fhir/MedicationRequest", json=order) as response:
            body = await response.json()
        assert response.status == 504
        assert body["error"] == "upstream_timeout"
        os.kill(stack.primary.pid, signal.SIGKILL)
        async with http.post(f"{stack.url}/fhir/MedicationRequest", json=order) as response:
            assert response.status in (502, 503)
    assert traffic(stack.dr) == 0
    wait_until(lambda: stack.events("access"), 5, "access lines")
