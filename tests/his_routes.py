"""HIS routes and a medication order shared by the journal, stale-cache and drill tests and the
degraded-path benchmark."""

from __future__ import annotations

from typing import Any

HIS_WRITE_ROUTE: dict[str, Any] = {
    "name": "his-orders-write",
    "upstream": "his",
    "criticality": "core",
    "fallback": "journal",
    "match": {"path_prefix": "/fhir/", "methods": ["POST", "PUT"]},
    "timeouts": {"connect_s": 0.5, "total_s": 1},
    "failure_body": {"format": "fhir"},
}
HIS_READ_ROUTE: dict[str, Any] = {
    "name": "his-clinical-read",
    "upstream": "his",
    "criticality": "core",
    "fallback": "stale-cache",
    "match": {"path_prefix": "/fhir/", "methods": ["GET", "HEAD"]},
    "timeouts": {"connect_s": 0.5, "total_s": 2},
    "failure_body": {"format": "fhir"},
}


def medication_order(n: int, patient: str = "p-10042") -> dict[str, Any]:
    """A FHIR MedicationRequest the HIS simulator accepts (for a patient it knows)."""
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "requester": {"reference": "Practitioner/d-77"},
        "medicationCodeableConcept": {"text": f"Amoxicillin 500 mg capsule, order {n}"},
        "dosageInstruction": [{"text": "500 mg po tid x 5 d"}],
    }
