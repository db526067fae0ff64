"""Reading upstream failures from answer bodies: platform errors count, business answers do not."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilgate.config import FailureBody
from resilgate.failure_body import body_failure

INSURANCE = FailureBody(format="insurance_envelope")
FHIR = FailureBody(format="fhir")


def envelope(infcode: Any, err_msg: str | None = None, **extra: Any) -> bytes:
    return orjson.dumps({"infcode": infcode, "err_msg": err_msg, "output": {}, **extra})


def outcome(*issues: tuple[str, str]) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": s, "code": c, "diagnostics": "x"} for s, c in issues],
        }
    )


def test_no_rule_reads_nothing() -> None:
    assert body_failure(None, 200, envelope("-1", "系统异常")) is None


@pytest.mark.parametrize("status", [199, 301, 404, 500, 503])
def test_only_2xx_answers_are_read(status: int) -> None:
    assert body_failure(INSURANCE, status, envelope("-1", "系统异常")) is None
    assert body_failure(FHIR, status, outcome(("error", "transient"))) is None


@pytest.mark.parametrize("body", [b"", b"<html>busy</html>", b"[1, 2]", b'"0"', b"null", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_no_failure(body: bytes) -> None:
    assert body_failure(INSURANCE, 200, body) is None
    assert body_failure(FHIR, 200, body) is None


@pytest.mark.parametrize("infcode", ["0", 0])
def test_insurance_success_is_no_failure(infcode: Any) -> None:
    assert body_failure(INSURANCE, 200, envelope(infcode, "系统异常 leftover text")) is None
    assert body_failure(INSURANCE, 200, orjson.dumps({"output": {}})) is None


@pytest.mark.parametrize(
    "err_msg",
    [
        "参保人待遇暂停 insurance of TEST0002 is suspended",
        "未查询到参保人 unknown psn_no P123",
        "缺少必填字段 missing field input.data.mdtrt_id",
        None,
    ],
)
def test_insurance_business_answers_are_no_failure(err_msg: str | None) -> None:
    assert body_failure(INSURANCE, 200, envelope("-1", err_msg)) is None


def test_insurance_platform_error_names_infcode_and_message_only() -> None:
    body = envelope(
        "-1",
        "系统异常，请稍后重试 platform error: simulated",
        inf_refmsgid="310000202503200912000000000001",
        output={"setlinfo": {"psn_name": "测试患者", "psn_no": "TEST0001"}},
    )
    reason = body_failure(INSURANCE, 200, body)
    assert reason == "infcode -1: 系统异常，请稍后重试 platform error: simulated"
    assert "TEST0001" not in reason and "测试患者" not in reason


@pytest.mark.parametrize(
    ("infcode", "err_msg"),
    [(-1, "System Error in settlement"), ("1", "Upstream TIMED OUT"), ("-1", "数据库连接失败")],
)
def test_insurance_markers_match_any_infcode_ignoring_ascii_case(
    infcode: Any, err_msg: str
) -> None:
    assert (
        body_failure(INSURANCE, 200, envelope(infcode, err_msg)) == f"infcode {infcode}: {err_msg}"
    )


def test_insurance_markers_come_from_the_rule() -> None:
    rule = FailureBody(format="insurance_envelope", platform_error_markers=["中心前置机"])
    assert body_failure(rule, 200, envelope("-1", "中心前置机无响应")) is not None
    assert body_failure(rule, 200, envelope("-1", "系统异常")) is None


def test_insurance_reason_is_short_and_on_one_line() -> None:
    reason = body_failure(INSURANCE, 200, envelope("-1", "系统异常\n" + "x" * 5000))
    assert reason is not None
    assert "\n" not in reason
    assert len(reason) <= len("infcode -1: ") + 80


@pytest.mark.parametrize(
    "code",
    ["transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled"],
)
@pytest.mark.parametrize("severity", ["fatal", "error"])
def test_fhir_transient_outcomes_are_failures(code: str, severity: str) -> None:
    body = outcome(("information", "informational"), (severity, code))
    assert body_failure(FHIR, 200, body) == f"OperationOutcome {code}"


@pytest.mark.parametrize(
    ("severity", "code"),
    [
        ("error", "not-found"),
        ("error", "business-rule"),
        ("error", "invalid"),
        ("fatal", "security"),
        ("warning", "transient"),
        ("information", "throttled"),
    ],
)
def test_fhir_other_outcomes_are_no_failure(severity: str, code: str) -> None:
    assert body_failure(FHIR, 200, outcome((severity, code))) is None


def test_fhir_resources_and_malformed_outcomes_are_no_failure() -> None:
    patient = {"resourceType": "Patient", "id": "test-0001", "text": "OperationOutcome"}
    assert body_failure(FHIR, 200, orjson.dumps(patient)) is None
    for issues in (None, "error", [None, "x", {"severity": ["error"], "code": {"a": 1}}]):
        body = orjson.dumps({"resourceType": "OperationOutcome", "issue": issues})
        assert body_failure(FHIR, 200, body) is None


@given(body=st.binary(max_size=512), status=st.integers(100, 599))
def test_arbitrary_bytes_never_raise(body: bytes, status: int) -> None:
    for rule in (INSURANCE, FHIR):
        reason = body_failure(rule, status, body)
        assert reason is None or isinstance(reason, str)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    infcode=json_values,
    err_msg=json_values,
    issue=st.dictionaries(st.sampled_from(["severity", "code"]), json_values),
)
def test_arbitrary_json_shapes_never_raise(infcode: Any, err_msg: Any, issue: Any) -> None:
    body = orjson.dumps({"infcode": infcode, "err_msg": err_msg})
    body_failure(INSURANCE, 200, body)
    body = orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]})
    body_failure(FHIR, 200, body)
