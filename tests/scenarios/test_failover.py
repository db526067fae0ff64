"""Failover to the DR site under a steady stream of requests, with real processes failing for
real (SIGKILL, SIGSTOP, fault modes). Each test prints what it measured."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

import aiohttp
import orjson

from tests.conftest import ServerProcess, Spawner, wait_until
from tests.failover_stack import (
    FAST_HEALTH,
    Stack,
    set_fault,
    set_mode,
    sim_call,
    start_stack,
    traffic,
)
from tests.insurance_calls import FIXMEDINS, envelope, settle_input
from tests.load import Sample, steady

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


async def test_writes_never_reach_a_read_only_endpoint(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    set_fault(stack.primary, mode="hang", path_prefix="/fhir/MedicationRequest")
    order = {"resourceType": "MedicationRequest", "status": "active", "intent": "order"}
    url = f"{stack.url}/fhir/MedicationRequest"
    try:
        stream = await steady(lambda http: http.post(url, json=order), 20, 3)
    finally:
        set_fault(stack.primary, mode="none")
    statuses = sorted({s.status for s in stream.samples})
    report("read-only", posts=len(stream), statuses=statuses, dr_requests=traffic(stack.dr))
    assert traffic(stack.dr) == 0  # its only other endpoint is a read-only replica
    assert set(statuses) <= {503, 504}  # timed out, then no endpoint may take a write
    assert 503 in statuses


def restart_on_same_port(spawn: Spawner, server: ServerProcess, kind: str) -> ServerProcess:
    port = str(server.port())
    return spawn.start(f"{server.name}-again", ["simulate", kind, "--port", port])


def majority_by_bucket(samples: list[Sample], bucket_s: float) -> list[tuple[str, float]]:
    """(endpoint serving most, primary share) per time bucket, in time order."""
    buckets: dict[int, list[str]] = {}
    for sample in samples:
        buckets.setdefault(int(sample.sent_at / bucket_s), []).append(sample.served_by)
    result = []
    for key in sorted(buckets):
        labels = buckets[key]
        top = max(set(labels), key=labels.count)
        result.append((top, labels.count("his/primary") / len(labels)))
    return result


async def test_failback_waits_for_the_hold_down_then_ramps_and_switches_once(
    spawn: Spawner,
) -> None:
    health = {
        **FAST_HEALTH,
        "failback": {"hold_down_s": 2.0, "ramp_s": 2.0, "ramp_start": 0.1},
    }
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True, health=health)
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}
    restarted: list[asyncio.Future[None]] = []

    def kill() -> None:
        marks["killed"] = time.monotonic()
        os.kill(stack.primary.pid, signal.SIGKILL)
        stack.primary.proc.wait()

    def restart() -> None:
        restart_on_same_port(spawn, stack.primary, "his")
        marks["back"] = time.monotonic()

    events = {1.0: kill, 3.0: lambda: restarted.append(loop.run_in_executor(None, restart))}
    stream = await steady(read_patient(stack), 100, 11, events=events)
    await asyncio.gather(*restarted)
    after_kill = stream.sent_after(marks["killed"] + 0.05)
    first_back = min(s.sent_at for s in after_kill if s.served_by == "his/primary")
    shape = majority_by_bucket(after_kill, 0.5)
    switches = sum(1 for a, b in itertools.pairwise(shape) if a[0] != b[0])
    ramping = [round(share, 2) for _, share in shape if 0 < share < 1]
    report(
        "failback",
        requests=len(stream),
        failures=len(stream.failures()),
        primary_back_after_s=round(first_back - marks["back"], 2),
        ramp_buckets=ramping,
        switches=switches,
    )
    assert not stream.failures()
    assert first_back - marks["back"] >= 2.0  # the hold-down
    assert ramping, "traffic came back at once instead of ramping"
    assert switches == 1, shape
    assert shape[0][0] == "his/dr" and shape[-1] == ("his/primary", 1.0)


async def test_a_fenced_primary_gets_no_traffic_until_ops_lift_the_fence(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    loop = asyncio.get_running_loop()
    done: list[asyncio.Future[Any]] = []
    counts: dict[str, int] = {}

    def fence() -> None:
        set_mode(stack, "set", "his/primary", "maintenance", "--reason", "security investigation")
        wait_until(lambda: stack.events("endpoint_fenced"), 5, "the fence to be seen")
        counts["fenced"] = traffic(stack.primary)

    def lift() -> None:
        counts["before_lift"] = traffic(stack.primary)
        set_mode(stack, "clear", "his/primary", "--reason", "investigation closed")

    events = {
        0.5: lambda: done.append(loop.run_in_executor(None, fence)),
        2.5: lambda: os.kill(stack.primary.pid, signal.SIGSTOP),
        3.5: lambda: os.kill(stack.primary.pid, signal.SIGCONT),
        7.0: lambda: done.append(loop.run_in_executor(None, lift)),
    }
    try:
        stream = await steady(read_patient(stack), 50, 11, events=events)
    finally:
        os.kill(stack.primary.pid, signal.SIGCONT)
    await asyncio.gather(*done)
    lifted = stack.events("endpoint_fence_lifted")
    report(
        "fence",
        requests=len(stream),
        failures=len(stream.failures()),
        primary_while_fenced=counts["before_lift"] - counts["fenced"],
        served_by_primary_at_end=len(stream.served("his/primary")),
    )
    assert not stream.failures()
    assert counts["before_lift"] == counts["fenced"]
    assert lifted
    assert stream.samples[-1].served_by == "his/primary"


INSURANCE_ROUTES = [
    {
        "name": "insurance-settlement",
        "upstream": "insurance",
        "match": {
            "path": "/fsi/api/callService",
            "methods": ["POST"],
            "body": {"field": "infno", "values": ["2207", "2208", "2601"]},
        },
        "retries": "never",
        "timeouts": {"connect_s": 0.5, "total_s": 1.0},
        "failure_body": {"format": "insurance_envelope"},
    },
    {
        "name": "insurance-trial",
        "upstream": "insurance",
        "match": {
            "path": "/fsi/api/callService",
            "methods": ["POST"],
            "body": {"field": "infno", "values": ["1101", "2206", "5203"]},
        },
        "retries": "safe",
        "timeouts": {"connect_s": 0.5, "total_s": 2.0},
        "failure_body": {"format": "insurance_envelope"},
    },
]


class Envelopes:
    """Insurance calls with a fresh msgid each."""

    def __init__(self, url: str) -> None:
        self.url = f"{url}/fsi/api/callService"
        self.seq = itertools.count(1)

    def envelope(self, infno: str, psn_no: str, **data: Any) -> dict[str, Any]:
        msgid = f"{FIXMEDINS}{time.strftime('%Y%m%d%H%M%S')}{next(self.seq) % 10000:04d}"
        return envelope(infno, msgid, {**settle_input(236.50, "CB0001", psn_no=psn_no), **data})

    def call(self, infno: str, psn_no: str) -> Any:
        return lambda http: http.post(self.url, json=self.envelope(infno, psn_no))


async def test_insurance_platform_errors_open_the_breaker_and_business_rejections_do_not(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", INSURANCE_ROUTES)
    calls = Envelopes(stack.url)
    rejected = await steady(calls.call("2206", "TEST0002"), 100, 2, keep_body=True)
    answers = [orjson.loads(s.body) for s in rejected.samples]
    assert {a["infcode"] for a in answers} == {"-1"}  # suspended: a business answer
    assert {s.served_by for s in rejected.samples} == {"insurance/primary"}
    assert not stack.events("breaker_opened")

    set_fault(stack.primary, mode="platform_error")
    trials = await steady(calls.call("2206", "TEST0001"), 100, 3, keep_body=True)
    answers = [orjson.loads(s.body) for s in trials.samples]
    opened = stack.events("breaker_opened")
    report(
        "insurance",
        business_rejections=len(rejected),
        trial_calls=len(trials),
        platform_errors_seen_by_clients=sum(1 for a in answers if a["infcode"] != "0"),
        served_by_dr=len(trials.served("insurance/dr")),
    )
    assert opened and opened[0]["endpoint"] == "insurance/primary"
    assert all(a["infcode"] == "0" for a in answers)  # trial calls commit nothing: retried
    assert trials.samples[-1].served_by == "insurance/dr"


async def test_a_settlement_whose_primary_commits_then_hangs_is_never_sent_again(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", INSURANCE_ROUTES)
    set_fault(stack.primary, mode="commit_then_hang")
    calls = Envelopes(stack.url)
    batches = itertools.count(1)

    def settle(http: aiohttp.ClientSession) -> Any:
        envelope = calls.envelope("2207", "TEST0001", chrg_bchno=f"CB{next(batches):04d}")
        return http.post(calls.url, json=envelope)

    try:
        stream = await steady(settle, 10, 3, keep_body=True)
    finally:
        set_fault(stack.primary, mode="none")
    at_primary = {w["key"] for w in sim_call(stack.primary, "GET", "/_sim/writes")["writes"]}
    at_dr = {w["key"] for w in sim_call(stack.dr, "GET", "/_sim/writes")["writes"]}
    unknown = [orjson.loads(s.body) for s in stream.samples if s.status == 504]
    settled_at_dr = [s for s in stream.samples if s.status == 200]
    report(
        "settlement",
        settlements=len(stream),
        outcome_unknown=len(unknown),
        committed_at_primary=len(at_primary),
        settled_at_dr_after_breaker_opened=len(settled_at_dr),
    )
    assert not at_primary & at_dr  # no settlement was sent to both sites
    assert len(unknown) == len(at_primary) > 0
    assert all(u["error"] == "upstream_timeout" and u["outcome"] == "unknown" for u in unknown)
    assert all("5203" in u["advice"] and "2601" in u["advice"] for u in unknown)
    assert len(settled_at_dr) == len(at_dr) == len(stream) - len(unknown)
    assert {s.served_by for s in settled_at_dr} <= {"insurance/dr"}


async def test_with_every_endpoint_down_tries_stay_within_the_retry_budget(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    for server in (stack.primary, stack.dr):
        set_fault(server, mode="error_rate", rate=1.0, status=503, path_prefix="/fhir/")
    stream = await steady(read_patient(stack), 100, 4)
    tries = traffic(stack.primary) + traffic(stack.dr)
    budget = 0.2 * len(stream) + 3 * 10  # ratio of requests, plus the floor per second
    fast = [s for s in stream.samples[-100:] if s.latency_s < 0.05]
    report(
        "all-down-503",
        requests=len(stream),
        tries=tries,
        allowed=len(stream) + budget,
        statuses=sorted({s.status for s in stream.samples}),
    )
    assert tries <= len(stream) + budget
    assert tries < len(stream)  # open breakers stop most tries altogether
    assert len(fast) == 100  # the last second: answered at once, no tries


async def test_with_every_endpoint_hanging_clients_get_the_error_quickly(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    for server in (stack.primary, stack.dr):
        set_fault(server, mode="hang")
    try:
        stream = await steady(read_patient(stack), 50, 6)
    finally:
        for server in (stack.primary, stack.dr):
            set_fault(server, mode="none")
    start = stream.samples[0].sent_at
    late = stream.sent_after(start + 3.0)
    two_timeouts = stream.slower_than(READ_TIMEOUT_S + 0.25)
    report(
        "all-down-hang",
        requests=len(stream),
        slowest_ms=round(max(s.latency_s for s in stream.samples) * 1000),
        over_one_timeout=len(two_timeouts),
        late_slowest_ms=round(max(s.latency_s for s in late) * 1000, 1),
    )
    assert {s.status for s in late} == {503}
    assert max(s.latency_s for s in late) < 0.1
    # Only retries and hedges take longer than one try, and the budget bounds them.
    assert len(two_timeouts) <= max(0.2 * len(stream), 3 * 10)


REGISTRATION_ROUTES = [
    {
        "name": "registration-register",
        "upstream": "registration",
        "match": {"path_prefix": "/reg/v1/registrations", "methods": ["POST", "PUT"]},
        "timeouts": {"connect_s": 0.5, "total_s": 1.0},
    }
]


async def test_a_post_is_sent_again_only_with_an_idempotency_key(spawn: Spawner) -> None:
    # The primary's breaker and stall detection are kept out of the way: every POST meets the
    # hanging primary first, so what happens after its timeout is the retry rule alone.
    patient = {
        **FAST_HEALTH,
        "breaker": {"consecutive_failures": 1000, "min_calls": 1000},
        "stall": {"enabled": False},
        "retry_budget": {"min_per_s": 10},  # room for every keyed POST to be re-sent
    }
    stack = start_stack(spawn, "registration", REGISTRATION_ROUTES, health=patient)
    url = f"{stack.url}/reg/v1/registrations"
    keys = itertools.count(1)
    booking = {
        "patientId": "test-0001",
        "dept": "NEI",
        "doctorId": "D001",
        "slotId": "NEI-AM-01",
        "payType": "self-pay",
        "channel": "kiosk",
    }

    def plain(http: aiohttp.ClientSession) -> Any:
        return http.post(url, json=booking)

    def keyed(http: aiohttp.ClientSession) -> Any:
        headers = {"Idempotency-Key": f"kiosk-07-{next(keys):05d}"}
        return http.post(url, json=booking, headers=headers)

    set_fault(stack.primary, mode="hang", path_prefix="/reg/v1/registrations")
    try:
        without_key = await steady(plain, 20, 2)
        plain_at = (traffic(stack.primary), traffic(stack.dr))
        with_key = await steady(keyed, 20, 2)
        keyed_at = (traffic(stack.primary) - plain_at[0], traffic(stack.dr) - plain_at[1])
    finally:
        set_fault(stack.primary, mode="none")
    report(
        "post",
        posts_without_key=len(without_key),
        their_statuses=sorted({s.status for s in without_key.samples}),
        their_deliveries_primary_dr=plain_at,
        posts_with_key=len(with_key),
        their_statuses_=sorted({s.status for s in with_key.samples}),
        their_deliveries_primary_dr_=keyed_at,
    )
    # Without a key, a POST that timed out after it was sent is not sent again.
    assert {s.status for s in without_key.samples} == {504}
    assert plain_at == (len(without_key), 0)
    # With a key, the DR site gets it after the primary's timeout; the client sees no error.
    assert not with_key.failures()
    assert {s.served_by for s in with_key.samples} == {"registration/dr"}
    assert keyed_at == (len(with_key), len(with_key))


async def test_ops_modes_narrow_or_stop_the_endpoint_choice(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", HIS_READS, dr_read_only=True)
    url = f"{stack.url}/fhir/Patient/test-0001"

    async def served_by(http: aiohttp.ClientSession) -> tuple[int, str, str]:
        async with http.get(url) as response:
            await response.read()
            return (
                response.status,
                response.headers.get("X-Resilgate-Upstream", ""),
                response.headers.get("Retry-After", ""),
            )

    async with aiohttp.ClientSession() as http:
        assert (await served_by(http))[1] == "his/primary"
        set_mode(stack, "set", "his", "dr", "--reason", "drill: run on the DR site")
        await wait_for(lambda: served_by(http), lambda r: r[1] == "his/dr")
        set_mode(stack, "set", "his", "maintenance", "--reason", "planned upgrade 22:00-04:00")
        _, upstream, retry_after = await wait_for(lambda: served_by(http), lambda r: r[0] == 503)
        assert (upstream, retry_after) == ("", "60")
        set_mode(stack, "clear", "his", "--reason", "upgrade done")
        await wait_for(lambda: served_by(http), lambda r: r[1] == "his/primary")


async def wait_for(call: Any, done: Any, within_s: float = 5.0) -> Any:
    """Repeat an async ``call`` until ``done(result)``, within a deadline."""
    deadline = time.monotonic() + within_s
    while True:
        result = await call()
        if done(result):
            return result
        assert time.monotonic() < deadline, f"still {result} after {within_s}s"
        await asyncio.sleep(0.02)


async def test_a_full_bulkhead_sends_the_overflow_to_the_next_endpoint_at_once(
    spawn: Spawner,
) -> None:
    stack = start_stack(
        spawn, "his", HIS_READS, dr_read_only=True, health={**FAST_HEALTH, "max_in_flight": 5}
    )
    set_fault(stack.primary, mode="slow", latency_ms=500, path_prefix="/fhir/")
    try:
        stream = await steady(read_patient(stack), 100, 1)
    finally:
        set_fault(stack.primary, mode="none")
    on_primary = stream.served("his/primary")
    on_dr = stream.served("his/dr")
    report(
        "bulkhead",
        requests=len(stream),
        on_primary=len(on_primary),
        on_dr=len(on_dr),
        dr_slowest_ms=round(max(s.latency_s for s in on_dr) * 1000, 1),
    )
    assert not stream.failures()
    # 1 s at 100/s against a primary taking 0.5 s: at most 5 at a time there, so about 10.
    assert 5 <= len(on_primary) <= 15
    assert max(s.latency_s for s in on_dr) < 0.25  # the overflow did not queue behind it
