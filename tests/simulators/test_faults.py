"""The fault-injection control API, against real simulator processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
import orjson
import pytest

from resilgate.config import FailureBody
from resilgate.failure_body import body_failure
from resilgate.simulators import SimulatorOptions
from resilgate.simulators.faults import Action, SimControl, parse_fault
from tests.conftest import wait_until_async
from tests.insurance_calls import envelope, settle_input

SHORT = aiohttp.ClientTimeout(total=0.5)
INSURANCE_RULE = FailureBody(format="insurance_envelope")
FHIR_RULE = FailureBody(format="fhir")


async def set_fault(http: aiohttp.ClientSession, url: str, **fault: Any) -> dict[str, Any]:
    async with http.put(f"{url}/_sim/fault", json=fault) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def in_flight(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/_sim/stats") as response:
        count: int = (await response.json())["in_flight"]
        return count


@pytest.mark.parametrize(
    ("kind", "site"), [("his", "primary"), ("registration", "dr"), ("insurance", "dr")]
)
async def test_every_response_names_the_site_that_served_it(
    spawn: Any, kind: str, site: str
) -> None:
    sim = spawn.simulator(kind, site)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "kind": kind, "site": site}
            assert response.headers["X-Sim-Site"] == site
        async with http.get(f"{sim.url()}/no/such/path") as response:
            assert response.status == 404
            assert response.headers["X-Sim-Site"] == site
        await set_fault(http, sim.url(), mode="error_rate", rate=1.0)
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 503
            assert response.headers["X-Sim-Site"] == site


async def test_fault_can_be_set_read_and_cleared(spawn: Any) -> None:
    sim = spawn.simulator("his")
    async with aiohttp.ClientSession() as http:
        active = await set_fault(http, sim.url(), mode="slow", latency_ms=50, path_prefix="/fhir")
        assert active == {
            "mode": "slow",
            "latency_ms": 50,
            "rate": 0.0,
            "period_s": 0.0,
            "status": 503,
            "path_prefix": "/fhir",
        }
        async with http.get(f"{sim.url()}/_sim/fault") as response:
            assert await response.json() == active
        async with http.delete(f"{sim.url()}/_sim/fault") as response:
            assert (await response.json())["mode"] == "none"
        async with http.get(f"{sim.url()}/_sim/fault") as response:
            assert (await response.json())["mode"] == "none"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"mode": "explode"}, "mode must be one of"),
        ({"mode": "error_rate"}, "error_rate needs rate"),
        ({"mode": "error_rate", "rate": 1.5}, "rate must be between 0 and 1"),
        ({"mode": "flap"}, "flap needs period_s"),
        ({"mode": "slow"}, "slow needs latency_ms"),
        ({"mode": "hang", "status": 200}, "status must be"),
        ({"mode": "hang", "colour": "red"}, "unknown field(s): colour"),
        ({"mode": "commit_then_hang"}, "only applies to the insurance"),
    ],
)
async def test_bad_fault_bodies_are_refused_with_a_reason(
    spawn: Any, body: dict[str, Any], reason: str
) -> None:
    sim = spawn.simulator("his")
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{sim.url()}/_sim/fault", json=body) as response:
            assert response.status == 400
            assert reason in (await response.json())["error"]
        async with http.put(f"{sim.url()}/_sim/fault", data=b"{not json") as response:
            assert response.status == 400
        async with http.get(f"{sim.url()}/_sim/fault") as response:
            assert (await response.json())["mode"] == "none"


async def test_refuse_drops_connections_but_control_still_answers(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="refuse")
        for path in ("/health", "/reg/v1/departments"):
            with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                async with http.get(f"{sim.url()}{path}") as response:
                    await response.read()
        async with http.delete(f"{sim.url()}/_sim/fault") as response:
            assert response.status == 200
        async with http.get(f"{sim.url()}/reg/v1/departments") as response:
            assert response.status == 200


async def test_hang_never_answers_until_the_fault_is_cleared(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/Patient/test-0001"
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="hang")
        with pytest.raises(TimeoutError):
            async with http.get(url, timeout=SHORT) as response:
                await response.read()

        async def patient() -> int:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status

        waiting = asyncio.create_task(patient())
        await wait_until_async(lambda: in_flight(http, sim.url()), what="the request to hang")
        assert not waiting.done()
        async with http.delete(f"{sim.url()}/_sim/fault"):
            pass
        assert await asyncio.wait_for(waiting, 5) == 200


async def test_stats_count_requests_in_flight_and_forget_clients_that_left(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="hang", path_prefix="/reg")

        async def departments() -> None:
            async with http.get(f"{sim.url()}/reg/v1/departments") as response:
                await response.read()

        clients = [asyncio.create_task(departments()) for _ in range(3)]
        await wait_until_async(
            lambda: _equals(in_flight(http, sim.url()), 3), what="3 requests in flight"
        )
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200  # outside path_prefix
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await wait_until_async(
            lambda: _equals(in_flight(http, sim.url()), 0), what="hung requests to end"
        )
        async with http.get(f"{sim.url()}/_sim/stats") as response:
            assert (await response.json())["requests"] == 4  # control routes not counted


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_slow_delays_answers_by_latency_ms_but_not_control_routes(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="slow", latency_ms=300)
        started = time.monotonic()
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200
        assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        async with http.get(f"{sim.url()}/_sim/stats") as response:
            assert response.status == 200
        assert time.monotonic() - started < 0.3


async def test_error_rate_fails_the_configured_share_reproducibly(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/metadata"

    async def statuses(n: int) -> list[int]:
        seen = []
        for _ in range(n):
            async with http.get(url) as response:
                seen.append(response.status)
        return seen

    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="error_rate", rate=1.0)
        assert await statuses(20) == [503] * 20
        async with http.get(url) as response:
            assert await response.json() == {
                "error": "simulated fault",
                "mode": "error_rate",
                "status": 503,
            }
        await set_fault(http, sim.url(), mode="error_rate", rate=0.0)
        assert await statuses(20) == [200] * 20
        await set_fault(http, sim.url(), mode="error_rate", rate=0.5, status=502)
        first = await statuses(30)
        await set_fault(http, sim.url(), mode="error_rate", rate=0.5, status=502)
        assert await statuses(30) == first
        assert set(first) == {200, 502}


async def test_flap_alternates_between_failing_and_healthy(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    seen: list[int] = []
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="flap", period_s=0.5, status=500)

        async def both_seen() -> bool:
            async with http.get(f"{sim.url()}/health") as response:
                seen.append(response.status)
            return 500 in seen and 200 in seen and seen[-1] != seen[0]

        await wait_until_async(both_seen, within_s=5, what="flap to fail and recover")
        assert seen[0] == 500  # flapping starts in the failing phase


async def test_path_prefix_limits_a_fault_to_matching_paths(spawn: Any) -> None:
    sim = spawn.simulator("his")
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="error_rate", rate=1.0, path_prefix="/fhir/Patient")
        async with http.get(f"{sim.url()}/fhir/Patient/test-0001") as response:
            assert response.status == 503
        async with http.get(f"{sim.url()}/fhir/AllergyIntolerance?patient=test-0001") as response:
            assert response.status == 200
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200


async def test_reset_clears_writes_faults_and_options(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    async with aiohttp.ClientSession() as http:
        body = {
            "patientId": "test-0001",
            "dept": "TEST",
            "doctorId": "d-test",
            "slotId": "walk-in",
            "payType": "self-pay",
            "channel": "window",
        }
        async with http.post(f"{sim.url()}/reg/v1/registrations", json=body) as response:
            assert response.status == 201
        await set_fault(http, sim.url(), mode="error_rate", rate=1.0)
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert len((await response.json())["writes"]) == 1
        async with http.post(f"{sim.url()}/_sim/reset") as response:
            assert response.status == 200
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert await response.json() == {"writes": [], "duplicates": []}
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200


async def test_options_accept_only_declared_boolean_switches(spawn: Any) -> None:
    sim = spawn.simulator("his")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.url()}/_sim/options") as response:
            assert await response.json() == {"conditional_create": True}
        async with http.put(f"{sim.url()}/_sim/options", json={"turbo": True}) as response:
            assert response.status == 400
            assert "unknown option turbo" in (await response.json())["error"]
        async with http.put(
            f"{sim.url()}/_sim/options", json={"conditional_create": "no"}
        ) as response:
            assert response.status == 400
        async with http.put(
            f"{sim.url()}/_sim/options", json={"conditional_create": False}
        ) as response:
            assert await response.json() == {"conditional_create": False}
        async with http.post(f"{sim.url()}/_sim/reset") as response:
            assert (await response.json())["options"] == {"conditional_create": True}


def test_flap_switches_phase_every_period_on_the_monotonic_clock() -> None:
    control = SimControl(SimulatorOptions("his", "primary", 1))
    control.set_fault(parse_fault({"mode": "flap", "period_s": 2.0}, "his"))
    start = time.monotonic()
    phases = [control.decide("/health", start + t) for t in (0.1, 1.9, 2.1, 3.9, 4.1)]
    assert phases == [Action.FAIL, Action.FAIL, Action.SERVE, Action.SERVE, Action.FAIL]


def trial_envelope(msgid: str, psn_no: str = "TEST0001", infno: str = "2206") -> dict[str, Any]:
    data = settle_input(10.00, "CB-FAULT-1", psn_no=psn_no, acct_used_flag="0")
    return envelope(infno, msgid, data)


async def test_platform_error_on_insurance_is_an_error_envelope_that_applies_nothing(
    spawn: Any,
) -> None:
    sim = spawn.simulator("insurance")
    url = f"{sim.url()}/fsi/api/callService"
    msgid = "H3101040000120250320091200" + "0001"
    async with aiohttp.ClientSession() as http:
        active = await set_fault(http, sim.url(), mode="platform_error")
        assert active["rate"] == 1.0  # every request unless told otherwise
        for infno in ("2206", "2207"):
            async with http.post(url, json=trial_envelope(msgid, infno=infno)) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                body = await response.read()
            assert orjson.loads(body) == {
                "infcode": "-1",
                "err_msg": "系统异常，请稍后重试 platform error: simulated",
                "inf_refmsgid": msgid,
                "output": {},
            }
            assert body_failure(INSURANCE_RULE, 200, body) is not None
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200  # the web tier is up; the platform behind it is not
            assert (await response.json())["status"] == "ok"
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert await response.json() == {"writes": [], "duplicates": []}

        async with http.delete(f"{sim.url()}/_sim/fault"):
            pass
        async with http.post(url, json=trial_envelope(msgid)) as response:
            answer = await response.json()
        assert answer["infcode"] == "0"  # the msgid was not remembered by the failed call
        suspended = trial_envelope("H3101040000120250320091200" + "0002", psn_no="TEST0002")
        async with http.post(url, json=suspended) as response:
            body = await response.read()
        assert "suspended" in orjson.loads(body)["err_msg"]
        assert body_failure(INSURANCE_RULE, 200, body) is None  # a business answer


async def test_platform_error_on_his_is_a_transient_operation_outcome(spawn: Any) -> None:
    sim = spawn.simulator("his")
    order = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/test-0001"},
    }
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="platform_error", path_prefix="/fhir/")
        async with http.get(f"{sim.url()}/fhir/Patient/test-0001") as response:
            assert response.status == 200
            assert response.content_type == "application/fhir+json"
            body = await response.read()
        issue = orjson.loads(body)["issue"][0]
        assert (issue["severity"], issue["code"]) == ("error", "transient")
        assert body_failure(FHIR_RULE, 200, body) == "OperationOutcome transient"
        async with http.post(f"{sim.url()}/fhir/MedicationRequest", json=order) as response:
            assert response.status == 200
            assert (await response.json())["resourceType"] == "OperationOutcome"
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert (await response.json())["writes"] == []

        await set_fault(http, sim.url(), mode="platform_error", rate=0.0)
        async with http.get(f"{sim.url()}/fhir/Patient/test-0001") as response:
            assert (await response.json())["resourceType"] == "Patient"


async def test_platform_error_without_a_platform_format_answers_status(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    async with aiohttp.ClientSession() as http:
        await set_fault(http, sim.url(), mode="platform_error", status=502)
        async with http.get(f"{sim.url()}/reg/v1/departments") as response:
            assert response.status == 502
            assert (await response.json())["mode"] == "platform_error"
        async with http.get(f"{sim.url()}/health") as response:
            assert response.status == 200


async def test_stats_count_probes_among_requests(spawn: Any) -> None:
    sim = spawn.simulator("his")
    probe = {"User-Agent": "resilgate-probe/1", "X-Request-ID": "probe-1"}
    async with aiohttp.ClientSession() as http:
        for headers in (probe, probe, {"User-Agent": "HIS-workstation/5.1"}, {}):
            async with http.get(f"{sim.url()}/fhir/Patient/test-0001", headers=headers) as r:
                assert r.status == 200
        async with http.get(f"{sim.url()}/_sim/fault", headers=probe) as response:
            assert response.status == 200  # control routes are not counted
        async with http.get(f"{sim.url()}/_sim/stats") as response:
            assert await response.json() == {"in_flight": 0, "requests": 4, "probes": 2}
