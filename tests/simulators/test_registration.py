"""The registration and queue simulator, over real HTTP."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

import aiohttp


def today_cn() -> date:
    """The simulator's day (Asia/Shanghai), read when a test runs, not when it is collected:
    a constant taken at import time is yesterday for a test that runs after midnight there."""
    return datetime.now(timezone(timedelta(hours=8))).date()


def registration(patient: str = "test-0001", dept: str = "TEST", **extra: str) -> dict[str, str]:
    doctor = "d-test" if dept == "TEST" else "d-01"
    return {
        "patientId": patient,
        "dept": dept,
        "doctorId": doctor,
        "slotId": "walk-in",
        "payType": "insured",
        "channel": "kiosk",
        **extra,
    }


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    key: str | None = None,
) -> tuple[int, Any, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def writes(http: aiohttp.ClientSession, url: str) -> dict[str, list[dict[str, Any]]]:
    async with http.get(f"{url}/_sim/writes") as response:
        log: dict[str, list[dict[str, Any]]] = await response.json()
        return log


async def test_departments_and_schedules_include_the_probe_department(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    base = f"{sim.url()}/reg/v1"
    async with aiohttp.ClientSession() as http:
        _, departments, _ = await call(http, "GET", f"{base}/departments")
        codes = {d["code"]: d for d in departments}
        assert codes["TEST"]["doctors"][0]["doctorId"] == "d-test"
        assert {"NEI", "WAI", "ERK"} <= set(codes)
        status, slots, _ = await call(http, "GET", f"{base}/schedules?dept=TEST&date=2025-03-20")
        assert status == 200
        assert [s["slotId"] for s in slots] == [
            "TEST-20250320-d-test-AM",
            "TEST-20250320-d-test-PM",
        ]
        _, again, _ = await call(http, "GET", f"{base}/schedules?dept=NEI&date=2025-03-21")
        _, same, _ = await call(http, "GET", f"{base}/schedules?dept=NEI&date=2025-03-21")
        assert again == same
        assert all(s["available"] == s["capacity"] for s in same)
        status, error, _ = await call(http, "GET", f"{base}/schedules?dept=XYZ")
        assert (status, error["code"]) == (404, "unknown_dept")
        status, _, _ = await call(http, "GET", f"{base}/schedules?dept=NEI&date=20-03-2025")
        assert status == 400


async def test_registration_numbers_and_queue_numbers_restart_per_dept_and_day(
    spawn: Any,
) -> None:
    sim = spawn.simulator("registration")
    url = f"{sim.url()}/reg/v1/registrations"
    tomorrow = today_cn() + timedelta(days=1)
    async with aiohttp.ClientSession() as http:
        _, first, _ = await call(http, "POST", url, registration())
        _, second, _ = await call(http, "POST", url, registration("p-10001"))
        _, other_dept, _ = await call(http, "POST", url, registration("p-10002", "NEI"))
        slot = f"TEST-{tomorrow:%Y%m%d}-d-test-AM"
        status, next_day, _ = await call(http, "POST", url, registration(slotId=slot))
    assert status == 201
    day = date.fromisoformat(first["date"])  # the simulator's day when it took the first
    assert day in (tomorrow - timedelta(days=1), tomorrow)  # (midnight may fall in between)
    assert re.fullmatch(rf"TEST{day:%Y%m%d}\d{{5}}", first["regNo"])
    assert (first["queueNo"], second["queueNo"], other_dept["queueNo"]) == ("T001", "T002", "A001")
    assert second["regNo"] == f"TEST{day:%Y%m%d}00002"
    assert (next_day["queueNo"], next_day["date"]) == ("T001", tomorrow.isoformat())
    assert len({first["visitNo"], second["visitNo"], other_dept["visitNo"]}) == 3


async def test_idempotency_key_replays_the_stored_answer(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    url = f"{sim.url()}/reg/v1/registrations"
    async with aiohttp.ClientSession() as http:
        status, first, headers = await call(http, "POST", url, registration(), key="k-1")
        assert status == 201
        assert "Idempotent-Replayed" not in headers
        status, replay, headers = await call(http, "POST", url, registration(), key="k-1")
        assert (status, replay) == (201, first)
        assert headers["Idempotent-Replayed"] == "true"
        status, error, _ = await call(http, "POST", url, registration("p-10003"), key="k-1")
        assert (status, error["code"]) == (422, "idempotency_key_reused")
        _, fresh, _ = await call(http, "POST", url, registration(), key="k-2")
        assert fresh["queueNo"] == "T002"
        log = await writes(http, sim.url())
    assert [(w["kind"], w["key"]) for w in log["writes"]] == [
        ("registration.create", "k-1"),
        ("registration.create", "k-2"),
    ]
    assert [d["key"] for d in log["duplicates"]] == ["k-1"]


async def test_invalid_registrations_are_refused_and_not_applied(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    url = f"{sim.url()}/reg/v1/registrations"
    async with aiohttp.ClientSession() as http:
        body = registration()
        del body["slotId"], body["channel"]
        status, error, _ = await call(http, "POST", url, body)
        assert status == 400
        assert error["message"] == "missing field(s): slotId, channel"
        status, error, _ = await call(http, "POST", url, registration(payType="cash"))
        assert (status, error["code"]) == (400, "invalid_pay_type")
        status, error, _ = await call(http, "POST", url, registration("p-99999"))
        assert (status, error["code"]) == (422, "unknown_patient")
        async with http.post(url, data=b"not json") as response:
            assert response.status == 400
        assert (await writes(http, sim.url()))["writes"] == []


async def test_queue_board_masks_names_and_calls_in_check_in_order(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    base = f"{sim.url()}/reg/v1"
    async with aiohttp.ClientSession() as http:
        regs = []
        for patient in ("test-0001", "p-10004", "p-10005"):
            _, reg, _ = await call(http, "POST", f"{base}/registrations", registration(patient))
            regs.append(reg)
        for reg in (regs[1], regs[0]):
            status, checked, _ = await call(
                http, "POST", f"{base}/registrations/{reg['regNo']}/check-in"
            )
            assert (status, checked["queueStatus"]) == (200, "WAITING")
        _, board, _ = await call(http, "GET", f"{base}/queues/TEST")
        assert board == [
            {"queueNo": "T002", "maskedName": regs[1]["maskedName"], "status": "WAITING"},
            {"queueNo": "T001", "maskedName": "测**者", "status": "WAITING"},
        ]
        assert "*" in regs[1]["maskedName"]

        _, called, _ = await call(http, "POST", f"{base}/queues/TEST/call-next", key="c-1")
        assert called == {"called": {**board[0], "status": "CALLED"}, "waiting": 1}
        _, replay, headers = await call(http, "POST", f"{base}/queues/TEST/call-next", key="c-1")
        assert replay == called
        assert headers["Idempotent-Replayed"] == "true"
        _, board, _ = await call(http, "GET", f"{base}/queues/TEST")
        assert [e["status"] for e in board] == ["CALLED", "WAITING"]
        _, second, _ = await call(http, "POST", f"{base}/queues/TEST/call-next", key="c-2")
        assert second["called"]["queueNo"] == "T001"
        _, empty, _ = await call(http, "POST", f"{base}/queues/TEST/call-next", key="c-3")
        assert empty == {"called": None, "waiting": 0}
        _, other_day, _ = await call(http, "GET", f"{base}/queues/TEST?date=2020-01-01")
        assert other_day == []
        log = await writes(http, sim.url())
    assert [w["key"] for w in log["writes"] if w["kind"] == "queue.call"] == ["c-1", "c-2"]


async def test_recall_skip_arrive_and_complete_move_an_entry(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    base = f"{sim.url()}/reg/v1"
    entry = f"{base}/queues/TEST/entries/T001"
    async with aiohttp.ClientSession() as http:
        _, reg, _ = await call(http, "POST", f"{base}/registrations", registration())
        await call(http, "POST", f"{base}/registrations/{reg['regNo']}/check-in")
        status, error, _ = await call(http, "POST", f"{entry}/recall")
        assert (status, error["code"]) == (409, "bad_transition")  # still WAITING
        await call(http, "POST", f"{base}/queues/TEST/call-next")
        _, skipped, _ = await call(http, "POST", f"{entry}/skip")
        assert skipped["status"] == "ABSENT"
        _, skipped_again, _ = await call(http, "POST", f"{entry}/skip")
        assert skipped_again["status"] == "ABSENT"
        _, recalled, _ = await call(http, "POST", f"{entry}/recall")
        assert (recalled["status"], recalled["recalls"]) == ("CALLED", 1)
        _, arrived, _ = await call(http, "POST", f"{entry}/arrive")
        assert arrived["status"] == "ARRIVED"
        _, done, _ = await call(http, "POST", f"{entry}/complete")
        assert done["status"] == "COMPLETED"
        _, board, _ = await call(http, "GET", f"{base}/queues/TEST")
        assert board[0]["status"] == "COMPLETED"
        status, _, _ = await call(http, "POST", f"{base}/queues/TEST/entries/T099/skip")
        assert status == 404
        log = await writes(http, sim.url())
    kinds = [w["kind"] for w in log["writes"]]
    assert kinds.count("queue.skip") == 1
    assert [d["kind"] for d in log["duplicates"]] == ["queue.skip"]


async def test_cancel_twice_is_a_no_op_and_leaves_the_board(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    base = f"{sim.url()}/reg/v1"
    async with aiohttp.ClientSession() as http:
        _, reg, _ = await call(http, "POST", f"{base}/registrations", registration())
        await call(http, "POST", f"{base}/registrations/{reg['regNo']}/check-in")
        for _ in range(2):
            status, cancelled, _ = await call(
                http, "POST", f"{base}/registrations/{reg['regNo']}/cancel"
            )
            assert (status, cancelled["status"]) == (200, "CANCELLED")
        _, board, _ = await call(http, "GET", f"{base}/queues/TEST")
        assert board == []
        status, _, _ = await call(http, "POST", f"{base}/registrations/{reg['regNo']}/check-in")
        assert status == 409
        status, _, _ = await call(http, "POST", f"{base}/registrations/TEST2099010100001/cancel")
        assert status == 404
        log = await writes(http, sim.url())
    assert [w["kind"] for w in log["writes"]].count("registration.cancel") == 1
    assert [d["kind"] for d in log["duplicates"]] == ["registration.cancel"]


async def test_external_ticket_upsert_never_duplicates(spawn: Any) -> None:
    sim = spawn.simulator("registration")
    url = f"{sim.url()}/reg/v1/registrations/external/L-T001"
    body = registration(queueNo="L-T001", date=date(2025, 3, 20).isoformat(), payType="self-pay")
    async with aiohttp.ClientSession() as http:
        status, first, _ = await call(http, "PUT", url, body)
        assert status == 201
        assert (first["queueNo"], first["date"], first["externalTicket"]) == (
            "L-T001",
            "2025-03-20",
            "L-T001",
        )
        assert first["regNo"] == "TEST2025032000001"
        status, again, _ = await call(http, "PUT", url, body)
        assert (status, again) == (200, first)
        status, updated, _ = await call(http, "PUT", url, {**body, "payType": "insured"})
        assert (status, updated["regNo"], updated["payType"]) == (200, first["regNo"], "insured")
        status, error, _ = await call(http, "PUT", url, {**body, "dept": "NEI", "doctorId": "d-01"})
        assert (status, error["code"]) == (409, "immutable_fields")
        _, read_back, _ = await call(http, "GET", url)
        assert read_back["payType"] == "insured"
        log = await writes(http, sim.url())
    assert [w["kind"] for w in log["writes"]] == ["registration.external"] * 2
    assert [d["key"] for d in log["duplicates"]] == ["L-T001"]
