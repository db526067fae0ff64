"""Telling a failure of the upstream from an answer's body (DOMAIN.md sections 3.1, 7, 10.3).

The insurance platform and FHIR servers report some of their own failures as HTTP 200; a
breaker that reads only the status misses them. Business answers (not insured, suspended, not
found, invalid input) are the client's concern and never count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from resilgate.config import FailureBody

# The "transient" branch of the FHIR issue-type hierarchy (hl7.org/fhir/R4/valueset-issue-type).
FHIR_TRANSIENT_CODES = frozenset(
    {"transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled"}
)
_FHIR_FAILING_SEVERITIES = frozenset({"fatal", "error"})
ERR_MSG_CHARS = 80


def body_failure(rule: FailureBody | None, status: int, body: bytes) -> str | None:
    """Why an answer counts as a failure of the upstream, read from its body; None if it does not.

    Only 2xx answers are read. The reason quotes at most the ``infcode`` and ``ERR_MSG_CHARS``
    characters of ``err_msg`` (or the FHIR issue code), never any other field of the body.
    """
    if rule is None or not 200 <= status <= 299:
        return None
    if rule.format == "fhir" and b"OperationOutcome" not in body:
        return None  # skips parsing the common answer: a resource or a Bundle
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    if rule.format == "insurance_envelope":
        return _platform_error(document, rule.platform_error_markers)
    return _transient_outcome(document)


def infcode_is_success(infcode: Any) -> bool:
    """True for the platform's success code, "0" (some platforms send the number 0)."""
    return infcode == "0" or (type(infcode) is int and infcode == 0)


def short_text(value: str, limit: int = ERR_MSG_CHARS) -> str:
    """``value`` on one line, cut to ``limit`` characters."""
    text = " ".join(value[: limit * 2].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _platform_error(envelope: Mapping[str, Any], markers: list[str]) -> str | None:
    infcode = envelope.get("infcode")
    if infcode is None or infcode_is_success(infcode):
        return None
    err_msg = envelope.get("err_msg")
    if not isinstance(err_msg, str):
        return None
    folded = err_msg.lower()
    if not any(marker.lower() in folded for marker in markers):
        return None  # a business answer
    code = short_text(str(infcode), 16) if isinstance(infcode, str | int) else "?"
    return f"infcode {code}: {short_text(err_msg)}"


def _transient_outcome(resource: Mapping[str, Any]) -> str | None:
    if resource.get("resourceType") != "OperationOutcome":
        return None
    issues = resource.get("issue")
    if not isinstance(issues, list):
        return None
    for issue in issues:
        if not isinstance(issue, dict):
            continue
        code, severity = issue.get("code"), issue.get("severity")
        if not isinstance(code, str) or not isinstance(severity, str):
            continue  # also keeps unhashable values out of the set look-ups
        if severity in _FHIR_FAILING_SEVERITIES and code in FHIR_TRANSIENT_CODES:
            return f"OperationOutcome {code}"
    return None
