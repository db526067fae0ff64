"""Probe decisions without I/O: rise/fall counting, body templates, judging one answer."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilgate.config import HttpCheck, Probes, SyntheticCheck
from resilgate.probes import CheckState, EndpointProbes, ProbeVerdict, judge, render_body
from resilgate.upstream import Endpoint

ENDPOINT = Endpoint("his", "primary", 0, False, "http://127.0.0.1:9")


def test_a_check_is_unknown_until_rise_passes_in_a_row() -> None:
    state = CheckState("http", rise=2, fall=3)
    assert (state.verdict, state.suspect) == ("unknown", False)
    assert state.record(True, "status 200") is None
    assert (state.verdict, state.passed_in_row) == ("unknown", 1)
    assert state.record(True, "status 200") == "up"
    assert state.record(True, "status 200") is None
    assert (state.verdict, state.passed_in_row) == ("up", 3)


def test_failures_make_a_check_suspect_then_down_after_fall_in_a_row() -> None:
    state = CheckState("http", rise=1, fall=3, endpoint="his/primary")
    state.record(True, "status 200")
    assert state.record(False, "status 503") is None
    assert (state.verdict, state.suspect) == ("up", True)
    assert repr(state) == "<CheckState his/primary http UP suspect 1 failed in a row: status 503>"
    assert state.record(True, "status 200") is None  # a pass ends the run of failures
    assert not state.suspect
    for _ in range(2):
        assert state.record(False, "TimeoutError") is None
    assert state.record(False, "status 503") == "down"
    assert (state.verdict, state.suspect, state.last_detail) == ("down", False, "status 503")
    assert repr(state) == "<CheckState his/primary http DOWN 3 failed in a row: status 503>"
    assert state.record(False, "status 503") is None


def test_a_down_check_needs_rise_passes_in_a_row_to_come_back() -> None:
    state = CheckState("synthetic", rise=2, fall=1)
    assert state.record(False, "status 500") == "down"
    assert state.record(True, "status 200") is None
    assert state.record(False, "status 500") is None
    assert state.record(True, "status 200") is None
    assert state.verdict == "down"
    assert repr(state) == "<CheckState synthetic DOWN 1 passed in a row: status 200>"
    assert state.record(True, "status 200") == "up"


def test_a_check_can_go_from_unknown_straight_to_down() -> None:
    state = CheckState("http", rise=2, fall=2)
    assert repr(state) == "<CheckState http UNKNOWN no result yet>"
    assert state.record(False, "ClientConnectorError: refused") is None
    assert state.suspect
    assert state.record(False, "ClientConnectorError: refused") == "down"


def test_rise_and_fall_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CheckState("http", rise=0, fall=1)


@given(
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    results=st.lists(st.booleans(), max_size=40),
)
def test_verdict_follows_the_last_completed_run(rise: int, fall: int, results: list[bool]) -> None:
    state = CheckState("http", rise, fall)
    expected: ProbeVerdict = "unknown"
    run_of, run = None, 0
    for passed in results:
        run = run + 1 if passed == run_of else 1
        run_of = passed
        before = expected
        if passed and run >= rise:
            expected = "up"
        elif not passed and run >= fall:
            expected = "down"
        changed = state.record(passed, "x")
        assert state.verdict == expected
        assert changed == (expected if expected != before else None)
        assert state.suspect == (not passed and expected != "down")


def test_endpoint_verdict_combines_its_checks() -> None:
    probes = EndpointProbes(ENDPOINT, Probes(synthetic=SyntheticCheck(path="/fhir/metadata")))
    http, synthetic = probes.checks
    assert (http.name, synthetic.name) == ("http", "synthetic")
    verdicts = [probes.verdict]
    http.record(True, "status 200")
    http.record(True, "status 200")
    verdicts.append(probes.verdict)  # synthetic has no verdict yet
    synthetic.record(True, "status 200")
    verdicts.append(probes.verdict)
    assert verdicts == ["unknown", "unknown", "up"]
    assert repr(probes) == "<EndpointProbes his/primary UP (http UP, synthetic UP)>"
    for _ in range(3):
        synthetic.record(False, "OperationOutcome transient")
    assert probes.verdict == "down"  # the web tier answers, the business does not
    assert repr(probes) == "<EndpointProbes his/primary DOWN (http UP, synthetic DOWN)>"
    assert repr(synthetic).startswith("<CheckState his/primary synthetic DOWN")


def test_an_endpoint_without_checks_stays_unknown() -> None:
    probes = EndpointProbes(ENDPOINT, Probes(http=None))
    assert probes.checks == ()
    assert probes.verdict == "unknown"
    assert repr(probes) == "<EndpointProbes his/primary UNKNOWN (no checks)>"


ENVELOPE = (
    '{"infno":"2206","msgid":"H31010400001{msgid_time}{seq4}","inf_time":"{inf_time}",'
    '"input":{"data":{"psn_no":"TEST0001"}}}'
)


def test_body_template_gets_time_and_sequence_and_keeps_json_braces() -> None:
    now = datetime(2025, 3, 20, 9, 12, 0, tzinfo=timezone(timedelta(hours=8)))
    envelope = json.loads(render_body(ENVELOPE, now, 7))
    assert envelope["msgid"] == "H31010400001202503200912000007"
    assert len(envelope["msgid"]) == 30
    assert envelope["inf_time"] == "2025-03-20 09:12:00"
    assert envelope["input"] == {"data": {"psn_no": "TEST0001"}}
    assert json.loads(render_body(ENVELOPE, now, 10_003))["msgid"].endswith("0003")
    assert render_body("no placeholders {here}", now, 1) == "no placeholders {here}"


INSURANCE_PROBE = SyntheticCheck.model_validate(
    {
        "method": "POST",
        "path": "/fsi/api/callService",
        "body": ENVELOPE,
        "failure_body": {"format": "insurance_envelope"},
    }
)
FHIR_PROBE = SyntheticCheck.model_validate(
    {"path": "/fhir/Patient/test-0001", "failure_body": {"format": "fhir"}}
)


def answer(infcode: Any, err_msg: str | None = None) -> bytes:
    return orjson.dumps({"infcode": infcode, "err_msg": err_msg, "output": {}})


def test_http_check_passes_on_the_expected_status_only() -> None:
    check = HttpCheck()
    assert judge(check, 200, b"anything") is None
    assert judge(check, 503, b"") == "status 503"
    assert judge(HttpCheck(expect_status=204), 200, b"") == "status 200"


def test_insurance_probe_needs_the_test_patient_to_succeed() -> None:
    assert judge(INSURANCE_PROBE, 200, answer("0")) is None
    assert judge(INSURANCE_PROBE, 200, answer(0)) is None
    suspended = answer("-1", "参保人待遇暂停 insurance of TEST0001 is suspended")
    assert judge(INSURANCE_PROBE, 200, suspended) == (
        "infcode -1: 参保人待遇暂停 insurance of TEST0001 is suspended"
    )
    platform = answer("-1", "系统异常，请稍后重试")
    assert judge(INSURANCE_PROBE, 200, platform) == "infcode -1: 系统异常，请稍后重试"
    assert judge(INSURANCE_PROBE, 200, orjson.dumps({"output": {}})) == "infcode missing"
    assert judge(INSURANCE_PROBE, 200, b"<html>maintenance</html>") == "not an insurance envelope"
    assert judge(INSURANCE_PROBE, 502, answer("0")) == "status 502"


def test_fhir_probe_fails_on_a_transient_outcome_only() -> None:
    patient = orjson.dumps({"resourceType": "Patient", "id": "test-0001"})
    assert judge(FHIR_PROBE, 200, patient) is None
    transient = orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    )
    assert judge(FHIR_PROBE, 200, transient) == "OperationOutcome timeout"
    assert judge(FHIR_PROBE, 404, b"{}") == "status 404"
