"""The HIS simulator as a FHIR R4 server, over real HTTP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

FHIR = "application/fhir+json"
TICKET = "urn:resilgate:ticket"


def medication_request(ticket: str, patient: str = "p-10042") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": TICKET, "value": ticket}],
        "subject": {"reference": f"Patient/{patient}"},
        "requester": {"reference": "Practitioner/d-77"},
        "medicationCodeableConcept": {"text": "Amoxicillin 500 mg capsule"},
        "dosageInstruction": [{"text": "500 mg po tid x 5 d"}],
        "authoredOn": "2025-03-20T09:12:00+08:00",
    }


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        if response.status < 400:
            assert response.content_type == FHIR
        return response.status, await response.json(content_type=None)


async def create(
    http: aiohttp.ClientSession, url: str, body: Any, if_none_exist: str | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Content-Type": FHIR}
    if if_none_exist is not None:
        headers["If-None-Exist"] = if_none_exist
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(url, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_capability_statement_declares_conditional_create(spawn: Any) -> None:
    sim = spawn.simulator("his")
    async with aiohttp.ClientSession() as http:
        status, body = await get(http, f"{sim.url()}/fhir/metadata")
    assert status == 200
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in body["rest"][0]["resource"]}
    assert resources["MedicationRequest"]["conditionalCreate"] is True
    assert resources["ServiceRequest"]["conditionalCreate"] is True


async def test_probe_patient_has_demographics_and_a_penicillin_allergy(spawn: Any) -> None:
    sim = spawn.simulator("his")
    base = f"{sim.url()}/fhir"
    async with aiohttp.ClientSession() as http:
        status, patient = await get(http, f"{base}/Patient/test-0001")
        assert status == 200
        assert patient["name"][0]["text"] == "测试患者"
        status, allergies = await get(http, f"{base}/AllergyIntolerance?patient=test-0001")
        assert allergies["type"] == "searchset"
        assert allergies["total"] >= 1
        assert "Penicillin" in allergies["entry"][0]["resource"]["code"]["text"]
        status, missing = await get(http, f"{base}/Patient/p-99999")
        assert status == 404
        assert missing["resourceType"] == "OperationOutcome"
        assert missing["issue"][0]["code"] == "not-found"


async def test_patient_search_by_identifier(spawn: Any) -> None:
    sim = spawn.simulator("his")
    base = f"{sim.url()}/fhir"
    async with aiohttp.ClientSession() as http:
        _, by_mrn = await get(http, f"{base}/Patient?identifier=urn:resilgate:mrn%7CM0010042")
        assert [e["resource"]["id"] for e in by_mrn["entry"]] == ["p-10042"]
        _, by_card = await get(http, f"{base}/Patient?identifier=TEST0001")
        assert [e["resource"]["id"] for e in by_card["entry"]] == ["test-0001"]
        _, nobody = await get(http, f"{base}/Patient?identifier=urn:resilgate:mrn%7CM9")
        assert nobody["total"] == 0
        assert nobody["entry"] == []


async def test_clinical_searchsets_filter_sort_and_limit(spawn: Any) -> None:
    sim = spawn.simulator("his")
    base = f"{sim.url()}/fhir"
    async with aiohttp.ClientSession() as http:
        _, meds = await get(http, f"{base}/MedicationRequest?patient=test-0001&status=active")
        assert meds["total"] >= 1
        assert {e["resource"]["status"] for e in meds["entry"]} == {"active"}
        _, conditions = await get(
            http, f"{base}/Condition?patient=Patient/test-0001&clinical-status=active"
        )
        assert conditions["entry"][0]["resource"]["code"]["coding"][0]["code"] == "I10"
        _, labs = await get(
            http,
            f"{base}/Observation?patient=test-0001&category=laboratory&_sort=-date&_count=2",
        )
        dates = [e["resource"]["effectiveDateTime"] for e in labs["entry"]]
        assert len(dates) == 2
        assert labs["total"] == 4  # the vital-signs observation is filtered out
        assert dates == sorted(dates, reverse=True)
        _, visits = await get(http, f"{base}/Encounter?patient=test-0001&_sort=-date&_count=5")
        starts = [e["resource"]["period"]["start"] for e in visits["entry"]]
        assert starts == sorted(starts, reverse=True)
        assert all(
            e["resource"]["subject"]["reference"] == "Patient/test-0001" for e in visits["entry"]
        )


async def test_primary_and_dr_serve_the_same_seeded_patients(spawn: Any) -> None:
    primary, dr = spawn.simulator("his", "primary"), spawn.simulator("his", "dr")
    async with aiohttp.ClientSession() as http:
        for pid in ("p-10000", "p-10049"):
            _, a = await get(http, f"{primary.url()}/fhir/Patient/{pid}")
            _, b = await get(http, f"{dr.url()}/fhir/Patient/{pid}")
            assert a == b
            assert a["name"][0]["text"]
        _, a = await get(http, f"{primary.url()}/fhir/Observation?patient=p-10007")
        _, b = await get(http, f"{dr.url()}/fhir/Observation?patient=p-10007")
        assert [e["resource"] for e in a["entry"]] == [e["resource"] for e in b["entry"]]
        status, _ = await get(http, f"{primary.url()}/fhir/Patient/p-10050")
        assert status == 404


async def test_conditional_create_applies_once(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/MedicationRequest"
    condition = f"identifier={TICKET}|J-20250320-000042"
    async with aiohttp.ClientSession() as http:
        status, created, headers = await create(
            http, url, medication_request("J-20250320-000042"), condition
        )
        assert status == 201
        assert headers["ETag"] == 'W/"1"'
        assert headers["Location"].endswith(f"/fhir/MedicationRequest/{created['id']}/_history/1")
        _, read_back = await get(http, f"{url}/{created['id']}")
        assert read_back["identifier"][0]["value"] == "J-20250320-000042"

        status, again, _ = await create(
            http, url, medication_request("J-20250320-000042"), condition
        )
        assert status == 200
        assert again["id"] == created["id"]
        _, active = await get(http, f"{url}?patient=p-10042&status=active")
        assert [e["resource"]["id"] for e in active["entry"]].count(created["id"]) == 1

        async with http.get(f"{sim.url()}/_sim/writes") as response:
            log = await response.json()
        assert [(w["kind"], w["key"]) for w in log["writes"]] == [
            ("MedicationRequest.create", f"{TICKET}|J-20250320-000042")
        ]
        assert len(log["duplicates"]) == 1


async def test_conditional_create_with_several_matches_is_412(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/ServiceRequest"
    order = {**medication_request("J-7"), "resourceType": "ServiceRequest"}
    del order["medicationCodeableConcept"]
    async with aiohttp.ClientSession() as http:
        assert (await create(http, url, order))[0] == 201
        assert (await create(http, url, order, f"identifier={TICKET}|J-7"))[0] == 200
        assert (await create(http, url, order))[0] == 201  # no condition: a second copy
        status, outcome, _ = await create(http, url, order, f"identifier={TICKET}|J-7")
        assert status == 412
        assert outcome["resourceType"] == "OperationOutcome"
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert len((await response.json())["writes"]) == 2


async def test_server_without_conditional_create_answers_412(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/MedicationRequest"
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{sim.url()}/_sim/options", json={"conditional_create": False}
        ) as response:
            assert response.status == 200
        _, capability = await get(http, f"{sim.url()}/fhir/metadata")
        resources = {r["type"]: r for r in capability["rest"][0]["resource"]}
        assert resources["MedicationRequest"]["conditionalCreate"] is False
        status, _, _ = await create(
            http, url, medication_request("J-1"), f"identifier={TICKET}|J-1"
        )
        assert status == 412
        status, _, _ = await create(http, url, medication_request("J-1"))
        assert status == 201
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert len((await response.json())["writes"]) == 1


async def test_update_with_if_match_detects_a_stale_version(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/MedicationRequest"
    async with aiohttp.ClientSession() as http:
        _, created, _ = await create(http, url, medication_request("J-9"))
        rid = created["id"]
        stopped = {**created, "status": "stopped"}
        async with http.put(f"{url}/{rid}", json=stopped, headers={"If-Match": 'W/"1"'}) as r:
            assert r.status == 200
            assert r.headers["ETag"] == 'W/"2"'
        async with http.put(f"{url}/{rid}", json=created, headers={"If-Match": 'W/"1"'}) as r:
            assert r.status == 412
            assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
        _, current = await get(http, f"{url}/{rid}")
        assert current["status"] == "stopped"
        assert current["meta"]["versionId"] == "2"
        _, first = await get(http, f"{url}/{rid}/_history/1")
        assert first["status"] == "active"
        async with http.put(f"{url}/mr-nope", json={**stopped, "id": "mr-nope"}) as r:
            assert r.status == 404


async def test_bad_writes_get_400_operation_outcome(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/MedicationRequest"
    async with aiohttp.ClientSession() as http:
        for body in (
            b'{"resourceType": "MedicationRequest",',
            b"[]",
            {**medication_request("J-2"), "resourceType": "Patient"},
            {k: v for k, v in medication_request("J-3").items() if k != "subject"},
        ):
            status, outcome, _ = await create(http, url, body)
            assert status == 400
            assert outcome["resourceType"] == "OperationOutcome"
        status, _, _ = await create(http, url, medication_request("J-4"), "name=smith")
        assert status == 400
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            assert (await response.json())["writes"] == []


async def test_an_order_for_a_patient_the_his_does_not_know_is_422(spawn: Any) -> None:
    sim = spawn.simulator("his")
    url = f"{sim.url()}/fhir/MedicationRequest"
    condition = f"identifier={TICKET}|J-5"
    async with aiohttp.ClientSession() as http:
        status, outcome, _ = await create(
            http, url, medication_request("J-5", "p-99999"), condition
        )
        assert status == 422
        assert outcome["resourceType"] == "OperationOutcome"
        issue = outcome["issue"][0]
        assert (issue["severity"], issue["code"]) == ("error", "business-rule")
        assert "Patient/p-99999 does not exist" in issue["diagnostics"]
        status, created, _ = await create(
            http, url, medication_request("J-6"), condition[:-1] + "6"
        )
        assert status == 201
        moved = {**created, "subject": {"reference": "Patient/p-99999"}}
        async with http.put(f"{url}/{created['id']}", json=moved) as response:
            assert response.status == 422
        async with http.get(f"{sim.url()}/_sim/writes") as response:
            log = await response.json()
        assert [w["key"] for w in log["writes"]] == [f"{TICKET}|J-6"]
        assert log["duplicates"] == []
