"""The HIS as a FHIR R4 server (base ``/fhir``, ``application/fhir+json``).

Seeded patients ``p-10000``... and the probe patient ``test-0001`` (allergic to penicillin)
come with allergies, medications, conditions, labs and encounters. ``MedicationRequest`` and
``ServiceRequest`` can be created (conditional create through ``If-None-Exist:
identifier=system|value``: no match 201, one match 200 and nothing created, several 412) and
updated with ``If-Match`` (stale version 412). A create or update whose ``subject`` (or
``patient``) references a ``Patient/{id}`` that does not exist breaks a business rule: 422
with an ``OperationOutcome`` (error, business-rule), nothing applied (a conditional create
that matches answers 200 first). The ``conditional_create`` switch of
``PUT /_sim/options`` turns conditional create off: requests carrying ``If-None-Exist`` then
get 412, like a server without the feature. Writes are logged as ``<Type>.create`` (key: the
first identifier as ``system|value``, else ``Type/id``) and ``<Type>.update`` (key ``Type/id``).
The ``platform_error`` fault answers HTTP 200 with an ``OperationOutcome`` (severity error, code
transient) and applies nothing.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from resilgate.simulators import SimulatorOptions
from resilgate.simulators.common import CN_TZ, BadRequest, json_response, now_cn, read_json_object
from resilgate.simulators.faults import CONTROL, WriteLog, install_faults
from resilgate.simulators.seed_data import ANCHOR_DAY, TEST_PERSON, Person, seed_people

FHIR_JSON = "application/fhir+json"
MRN_SYSTEM = "urn:resilgate:mrn"
NATIONAL_ID_SYSTEM = "urn:resilgate:national-id"
INSURANCE_SYSTEM = "urn:resilgate:insurance-psn"
SEARCHABLE = (
    "Patient",
    "AllergyIntolerance",
    "MedicationRequest",
    "Condition",
    "Observation",
    "Encounter",
    "ServiceRequest",
)
WRITABLE = ("MedicationRequest", "ServiceRequest")
# Elements a create or update must carry, per writable type.
REQUIRED = {
    "MedicationRequest": ("status", "intent", "subject"),
    "ServiceRequest": ("status", "intent", "subject"),
}
SORT_DATE = {
    "AllergyIntolerance": "recordedDate",
    "MedicationRequest": "authoredOn",
    "Condition": "recordedDate",
    "Observation": "effectiveDateTime",
    "Encounter": "period.start",
    "ServiceRequest": "authoredOn",
}
_ETAG = re.compile(r'^(?:W/)?"(\d+)"$')
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([^/]+)$")

ALLERGENS = (
    ("青霉素 Penicillin", "medication", "high", "皮疹、呼吸困难"),
    ("磺胺类 Sulfonamide", "medication", "high", "荨麻疹"),
    ("头孢类 Cephalosporin", "medication", "low", "皮疹"),
    ("海鲜 Seafood", "food", "low", "腹泻"),
    ("花粉 Pollen", "environment", "low", "鼻炎"),
)
CONDITIONS = (
    ("I10", "原发性高血压"),
    ("E11.9", "2型糖尿病"),
    ("I25.1", "冠状动脉粥样硬化性心脏病"),
    ("J45.9", "支气管哮喘"),
    ("K29.7", "慢性胃炎"),
    ("N18.3", "慢性肾脏病3期"),
    ("E78.5", "高脂血症"),
)
MEDICATIONS = (
    ("苯磺酸氨氯地平片 5mg", "5mg 口服 每日一次"),
    ("盐酸二甲双胍缓释片 0.5g", "0.5g 口服 每日两次"),
    ("阿托伐他汀钙片 20mg", "20mg 口服 每晚一次"),
    ("阿司匹林肠溶片 100mg", "100mg 口服 每日一次"),
    ("奥美拉唑肠溶胶囊 20mg", "20mg 口服 每日一次 早餐前"),
    ("沙美特罗替卡松吸入粉雾剂", "1吸 吸入 每日两次"),
)
LABS = (
    ("718-7", "血红蛋白 Hemoglobin", "g/L", 115, 160),
    ("2345-7", "葡萄糖 Glucose", "mmol/L", 3.9, 9.5),
    ("2160-0", "肌酐 Creatinine", "umol/L", 45, 140),
    ("2823-3", "钾 Potassium", "mmol/L", 3.3, 5.4),
    ("6690-2", "白细胞 WBC", "10*9/L", 3.5, 11.0),
    ("1742-6", "丙氨酸氨基转移酶 ALT", "U/L", 8, 60),
)
ENCOUNTER_DEPTS = ("内科门诊", "外科门诊", "急诊科", "心内科病区", "内分泌科门诊")


def _iso(day: date, hour: int = 9) -> str:
    return datetime(day.year, day.month, day.day, hour, tzinfo=CN_TZ).isoformat()


def _coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return {"coding": [coding]}


def outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def _patient_resource(person: Person) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": person.patient_id,
        "active": True,
        "identifier": [
            {"system": MRN_SYSTEM, "value": person.mrn, "type": {"text": "MRN"}},
            {"system": NATIONAL_ID_SYSTEM, "value": person.certno},
            {"system": INSURANCE_SYSTEM, "value": person.psn_no},
        ],
        "name": [{"text": person.name, "family": person.name[0], "given": [person.name[1:]]}],
        "gender": person.gender,
        "birthDate": person.birth_date.isoformat(),
    }


def _clinical_records(person: Person, rng: random.Random) -> list[dict[str, Any]]:
    """Allergies, medications, conditions, observations and encounters of one patient."""
    pid = person.patient_id
    ref = {"reference": f"Patient/{pid}", "display": person.name}
    is_test = person is TEST_PERSON
    records: list[dict[str, Any]] = []

    allergens = [ALLERGENS[0]] if is_test else rng.sample(ALLERGENS, rng.choice((0, 1, 1, 2)))
    for n, (text, category, criticality, reaction) in enumerate(allergens, 1):
        records.append(
            {
                "resourceType": "AllergyIntolerance",
                "id": f"al-{pid}-{n}",
                "clinicalStatus": _coded(
                    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active"
                ),
                "verificationStatus": _coded(
                    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "confirmed",
                ),
                "category": [category],
                "criticality": criticality,
                "code": {"text": text},
                "patient": ref,
                "recordedDate": _iso(ANCHOR_DAY - timedelta(days=400 + 30 * n)),
                "reaction": [{"manifestation": [{"text": reaction}]}],
            }
        )

    conditions = [CONDITIONS[0]] if is_test else rng.sample(CONDITIONS, rng.randint(0, 3))
    for n, (code, text) in enumerate(conditions, 1):
        status = "active" if is_test or rng.random() < 0.8 else "resolved"
        records.append(
            {
                "resourceType": "Condition",
                "id": f"cd-{pid}-{n}",
                "clinicalStatus": _coded(
                    "http://terminology.hl7.org/CodeSystem/condition-clinical", status
                ),
                "code": {**_coded("http://hl7.org/fhir/sid/icd-10", code, text), "text": text},
                "subject": ref,
                "recordedDate": _iso(ANCHOR_DAY - timedelta(days=rng.randint(30, 2000))),
            }
        )

    medications = [MEDICATIONS[0]] if is_test else rng.sample(MEDICATIONS, rng.randint(0, 3))
    for n, (text, dosage) in enumerate(medications, 1):
        status = "active" if is_test or rng.random() < 0.75 else "completed"
        records.append(
            {
                "resourceType": "MedicationRequest",
                "id": f"mr-{pid}-{n}",
                "status": status,
                "intent": "order",
                "medicationCodeableConcept": {"text": text},
                "subject": ref,
                "authoredOn": _iso(ANCHOR_DAY - timedelta(days=rng.randint(1, 180))),
                "dosageInstruction": [{"text": dosage}],
            }
        )

    for n in range(1, (4 if is_test else rng.randint(2, 8)) + 1):
        loinc, text, unit, low, high = LABS[(n - 1) % len(LABS)] if is_test else rng.choice(LABS)
        value = round(rng.uniform(low * 0.9, high * 1.1), 1)
        records.append(
            {
                "resourceType": "Observation",
                "id": f"ob-{pid}-{n}",
                "status": "final",
                "category": [
                    _coded(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "laboratory",
                    )
                ],
                "code": {**_coded("http://loinc.org", loinc, text), "text": text},
                "subject": ref,
                "effectiveDateTime": _iso(ANCHOR_DAY - timedelta(days=n * 7 + rng.randint(0, 6))),
                "valueQuantity": {"value": value, "unit": unit},
                "referenceRange": [{"low": {"value": low}, "high": {"value": high}}],
            }
        )
    records.append(
        {
            "resourceType": "Observation",
            "id": f"ob-{pid}-vs",
            "status": "final",
            "category": [
                _coded("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
            ],
            "code": {**_coded("http://loinc.org", "8867-4", "心率 Heart rate"), "text": "心率"},
            "subject": ref,
            "effectiveDateTime": _iso(ANCHOR_DAY - timedelta(days=2)),
            "valueQuantity": {"value": rng.randint(58, 96), "unit": "/min"},
        }
    )

    for n in range(1, (2 if is_test else rng.randint(1, 7)) + 1):
        start = ANCHOR_DAY - timedelta(days=n * 30 + rng.randint(0, 20))
        inpatient = rng.random() < 0.15
        end = start + timedelta(days=rng.randint(3, 10)) if inpatient else start
        records.append(
            {
                "resourceType": "Encounter",
                "id": f"en-{pid}-{n}",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP" if inpatient else "AMB",
                },
                "serviceType": {"text": rng.choice(ENCOUNTER_DEPTS)},
                "subject": ref,
                "period": {"start": _iso(start), "end": _iso(end, 11)},
            }
        )
    return records


def _get_path(resource: Mapping[str, Any], dotted: str) -> Any:
    value: Any = resource
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _codes(concepts: Any) -> Iterable[str]:
    if isinstance(concepts, Mapping):
        concepts = [concepts]
    for concept in concepts or ():
        if isinstance(concept, Mapping):
            for coding in concept.get("coding") or ():
                if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                    yield coding["code"]
        elif isinstance(concept, str):
            yield concept


def _identifier_matches(resource: Mapping[str, Any], token: str) -> bool:
    system, bar, value = token.rpartition("|")
    for identifier in resource.get("identifier") or ():
        if not isinstance(identifier, Mapping) or identifier.get("value") != value:
            continue
        if not bar or identifier.get("system", "") == system:
            return True
    return False


def _reference_id(value: str) -> str:
    return value.rpartition("/")[2]


class ConditionalCreateError(Exception):
    """A conditional create that must answer 412 (several matches, or not supported)."""


class PreconditionFailed(Exception):
    """An ``If-Match`` naming a version that is no longer current."""


class BusinessRuleViolation(Exception):
    """A well-formed resource the HIS will not take (422), e.g. an order for nobody."""


class FhirStore:
    """All resources of the simulated HIS, with their version history."""

    def __init__(self, seed: int, writes: WriteLog) -> None:
        self._writes = writes
        self._resources: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in SEARCHABLE}
        self._history: dict[tuple[str, str], list[dict[str, Any]]] = {}
        # (type, identifier value) -> ids of resources that carried it, checked on lookup.
        self._by_identifier: dict[tuple[str, str], set[str]] = {}
        self._next_id = 0
        rng = random.Random(seed)
        stamp = _iso(ANCHOR_DAY, 6)
        for person in seed_people(seed):
            for resource in [_patient_resource(person), *_clinical_records(person, rng)]:
                self._store(resource, version=1, stamp=stamp)

    def __repr__(self) -> str:
        counts = ", ".join(f"{t}={len(r)}" for t, r in self._resources.items())
        return f"<FhirStore {counts}>"

    def _store(self, resource: dict[str, Any], version: int, stamp: str) -> dict[str, Any]:
        resource["meta"] = {"versionId": str(version), "lastUpdated": stamp}
        kind, rid = resource["resourceType"], resource["id"]
        self._resources[kind][rid] = resource
        for identifier in resource.get("identifier") or ():
            if isinstance(identifier, Mapping) and isinstance(identifier.get("value"), str):
                self._by_identifier.setdefault((kind, identifier["value"]), set()).add(rid)
        self._history.setdefault((kind, rid), []).append(copy.deepcopy(resource))
        return resource

    def read(self, kind: str, rid: str) -> dict[str, Any] | None:
        return self._resources.get(kind, {}).get(rid)

    def vread(self, kind: str, rid: str, version: str) -> dict[str, Any] | None:
        for resource in self._history.get((kind, rid), ()):
            if resource["meta"]["versionId"] == version:
                return resource
        return None

    def search(self, kind: str, params: Mapping[str, str]) -> tuple[int, list[dict[str, Any]]]:
        """Matching resources (total, page) for the supported search parameters."""
        found = [r for r in self._resources[kind].values() if self._matches(r, params)]
        sort = params.get("_sort")
        if sort in ("date", "-date") and kind in SORT_DATE:
            found.sort(key=lambda r: str(_get_path(r, SORT_DATE[kind]) or ""))
            if sort == "-date":
                found.reverse()
        total = len(found)
        count = params.get("_count")
        if count is not None:
            if not count.isdigit():
                raise BadRequest("_count must be a non-negative integer")
            found = found[: int(count)]
        return total, found

    @staticmethod
    def _matches(resource: Mapping[str, Any], params: Mapping[str, str]) -> bool:
        for name, wanted in params.items():
            if name in ("patient", "subject"):
                ref = _get_path(resource, "patient.reference") or _get_path(
                    resource, "subject.reference"
                )
                if not isinstance(ref, str) or _reference_id(ref) != _reference_id(wanted):
                    return False
            elif name == "identifier":
                if not _identifier_matches(resource, wanted):
                    return False
            elif name == "status":
                if resource.get("status") not in wanted.split(","):
                    return False
            elif name == "clinical-status":
                if not set(_codes(resource.get("clinicalStatus"))) & set(wanted.split(",")):
                    return False
            elif name == "category" and not set(_codes(resource.get("category"))) & set(
                wanted.split(",")
            ):
                return False
        return True

    def find_identifier(self, kind: str, token: str) -> list[dict[str, Any]]:
        ids = self._by_identifier.get((kind, token.rpartition("|")[2]), ())
        resources = (self._resources[kind][rid] for rid in sorted(ids))
        return [r for r in resources if _identifier_matches(r, token)]

    def create(
        self, kind: str, body: dict[str, Any], if_none_exist: str | None, supported: bool
    ) -> tuple[bool, dict[str, Any]]:
        """Create ``body`` unless ``if_none_exist`` finds it; (created, resource)."""
        _check_body(kind, body)
        if if_none_exist is not None:
            if not supported:
                raise ConditionalCreateError("conditional create is not supported")
            token = _parse_if_none_exist(if_none_exist)
            matches = self.find_identifier(kind, token)
            if len(matches) > 1:
                raise ConditionalCreateError(f"{len(matches)} resources match {token}")
            if matches:
                existing = matches[0]
                self._writes.duplicate(f"{kind}.create", token, id=existing["id"])
                return False, existing
        self._check_subject(body)
        self._next_id += 1
        resource = {**body, "resourceType": kind, "id": f"{kind[:2].lower()}-n{self._next_id:06d}"}
        self._store(resource, version=1, stamp=now_cn().isoformat(timespec="seconds"))
        self._writes.applied(
            f"{kind}.create", _business_key(resource), id=resource["id"], version=1
        )
        return True, resource

    def update(
        self, kind: str, rid: str, body: dict[str, Any], if_match: str | None
    ) -> dict[str, Any] | None:
        """Replace resource ``rid``; None if unknown, ``PreconditionFailed`` if stale."""
        _check_body(kind, body)
        if body.get("id") != rid:
            raise BadRequest(f"body id must equal the id in the URL ({rid})")
        current = self.read(kind, rid)
        if current is None:
            return None
        version = int(current["meta"]["versionId"])
        if if_match is not None:
            match = _ETAG.match(if_match.strip())
            if match is None:
                raise BadRequest('If-Match must look like W/"3"')
            if int(match.group(1)) != version:
                raise PreconditionFailed(
                    f"If-Match names version {match.group(1)}, current is {version}"
                )
        self._check_subject(body)
        resource = {**body, "resourceType": kind, "id": rid}
        self._store(resource, version=version + 1, stamp=now_cn().isoformat(timespec="seconds"))
        self._writes.applied(f"{kind}.update", f"{kind}/{rid}", id=rid, version=version + 1)
        return resource

    def _check_subject(self, body: Mapping[str, Any]) -> None:
        """``BusinessRuleViolation`` when the resource is about a Patient the HIS does not know."""
        for element in ("subject", "patient"):
            reference = _get_path(body, f"{element}.reference")
            found = _PATIENT_REF.search(reference) if isinstance(reference, str) else None
            if found is not None and self.read("Patient", found.group(1)) is None:
                raise BusinessRuleViolation(f"{element} {reference} does not exist")


def _check_body(kind: str, body: Mapping[str, Any]) -> None:
    if body.get("resourceType") != kind:
        raise BadRequest(f"resourceType must be {kind}")
    missing = [name for name in REQUIRED[kind] if name not in body]
    if missing:
        raise BadRequest(f"{kind} is missing required element(s): {', '.join(missing)}")


def _parse_if_none_exist(header: str) -> str:
    params = parse_qsl(header.lstrip("?"), keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "identifier" or not params[0][1]:
        raise BadRequest("If-None-Exist supports exactly one identifier=system|value")
    return params[0][1]


def _business_key(resource: Mapping[str, Any]) -> str:
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, Mapping) and "value" in identifier:
            return f"{identifier.get('system', '')}|{identifier['value']}"
    return f"{resource['resourceType']}/{resource['id']}"


STORE = web.AppKey("fhir_store", FhirStore)


def fhir_response(
    data: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response(data, status=status, content_type=FHIR_JSON, headers=headers)


def _version_headers(request: web.Request, resource: Mapping[str, Any]) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    path = f"/fhir/{resource['resourceType']}/{resource['id']}/_history/{version}"
    return {"ETag": f'W/"{version}"', "Location": str(request.url.origin().with_path(path))}


def _known_type(request: web.Request, writable: bool = False) -> str:
    kind = request.match_info["type"]
    allowed = WRITABLE if writable else SEARCHABLE
    if kind not in allowed:
        diagnostics = outcome("not-supported", f"{kind} is not supported here")
        raise web.HTTPNotFound(text=orjson.dumps(diagnostics).decode(), content_type=FHIR_JSON)
    return kind


async def metadata(request: web.Request) -> web.Response:
    conditional = request.app[CONTROL].flags["conditional_create"]
    resources = [
        {
            "type": kind,
            "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "search-type"}]
            + ([{"code": "create"}, {"code": "update"}] if kind in WRITABLE else []),
            "versioning": "versioned",
            "conditionalCreate": conditional and kind in WRITABLE,
            "conditionalUpdate": False,
        }
        for kind in SEARCHABLE
    ]
    return fhir_response(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": ANCHOR_DAY.isoformat(),
            "kind": "instance",
            "software": {"name": "resilgate HIS simulator"},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json"],
            "rest": [{"mode": "server", "resource": resources}],
        }
    )


async def read(request: web.Request) -> web.Response:
    kind = _known_type(request)
    rid = request.match_info["id"]
    resource = request.app[STORE].read(kind, rid)
    if resource is None:
        return fhir_response(outcome("not-found", f"{kind}/{rid} is not known"), 404)
    return fhir_response(resource, headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'})


async def vread(request: web.Request) -> web.Response:
    kind = _known_type(request)
    rid, version = request.match_info["id"], request.match_info["vid"]
    resource = request.app[STORE].vread(kind, rid, version)
    if resource is None:
        return fhir_response(outcome("not-found", f"{kind}/{rid} has no version {version}"), 404)
    return fhir_response(resource, headers={"ETag": f'W/"{version}"'})


async def search(request: web.Request) -> web.Response:
    kind = _known_type(request)
    try:
        total, page = request.app[STORE].search(kind, dict(request.query))
    except BadRequest as exc:
        return fhir_response(outcome("invalid", str(exc)), 400)
    base = str(request.url.origin()) + "/fhir"
    return fhir_response(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": [
                {
                    "fullUrl": f"{base}/{kind}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in page
            ],
        }
    )


async def create(request: web.Request) -> web.Response:
    kind = _known_type(request, writable=True)
    supported = request.app[CONTROL].flags["conditional_create"]
    try:
        body = await read_json_object(request)
        created, resource = request.app[STORE].create(
            kind, body, request.headers.get("If-None-Exist"), supported
        )
    except BadRequest as exc:
        return fhir_response(outcome("invalid", str(exc)), 400)
    except ConditionalCreateError as exc:
        return fhir_response(outcome("duplicate", str(exc)), 412)
    except BusinessRuleViolation as exc:
        return fhir_response(outcome("business-rule", str(exc)), 422)
    return fhir_response(
        resource, 201 if created else 200, headers=_version_headers(request, resource)
    )


async def update(request: web.Request) -> web.Response:
    kind = _known_type(request, writable=True)
    rid = request.match_info["id"]
    try:
        body = await read_json_object(request)
        resource = request.app[STORE].update(kind, rid, body, request.headers.get("If-Match"))
    except BadRequest as exc:
        return fhir_response(outcome("invalid", str(exc)), 400)
    except PreconditionFailed as exc:
        return fhir_response(outcome("conflict", str(exc)), 412)
    except BusinessRuleViolation as exc:
        return fhir_response(outcome("business-rule", str(exc)), 422)
    if resource is None:
        return fhir_response(outcome("not-found", f"{kind}/{rid} is not known"), 404)
    return fhir_response(resource, headers=_version_headers(request, resource))


async def platform_error(request: web.Request) -> web.Response:
    """The server's own failure reported in FHIR: 200 with a transient OperationOutcome."""
    return fhir_response(outcome("transient", "platform error: simulated, try again later"))


def build_app(options: SimulatorOptions) -> web.Application:
    app = web.Application()
    control = install_faults(
        app,
        options,
        flags={"conditional_create": True},
        platform_error=platform_error,
    )
    app[STORE] = FhirStore(options.seed, control.writes)
    app.router.add_get("/fhir/metadata", metadata)
    app.router.add_get("/fhir/{type}", search)
    app.router.add_post("/fhir/{type}", create)
    app.router.add_get("/fhir/{type}/{id}", read)
    app.router.add_put("/fhir/{type}/{id}", update)
    app.router.add_get("/fhir/{type}/{id}/_history/{vid}", vread)
    return app
