"""The journal: HIS writes while the HIS is down are acknowledged with a ticket, then applied
upstream exactly once and in acceptance order when it is back; what the HIS rejects becomes a
dead letter for a person. Real gateway and HIS simulator processes; the HIS DR site is a
read-only replica, so writes have only the primary."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest

from fallbacks.journal import replay_state, same_resource, write_kind
from resilgate.fallback import TICKETS_PATH
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.failover_stack import FAST_HEALTH, Stack, set_mode, sim_call, start_stack, traffic
from tests.gateway import OPERATOR_TOKEN, VIEWER_TOKEN, admin_cli, admin_cli_ok
from tests.his_routes import HIS_WRITE_ROUTE, medication_order

FHIR = "application/fhir+json"
SYSTEM = "urn:resilgate:ticket"
ROUTES = [
    HIS_WRITE_ROUTE,
    {
        "name": "his-read",
        "upstream": "his",
        "criticality": "core",
        "match": {"path_prefix": "/fhir/"},
        "timeouts": {"connect_s": 0.5, "total_s": 2},
    },
]


def journal_options(**options: Any) -> dict[str, Any]:
    return {"journal": {"claim_lease_s": 2, "retry_after_s": 0.5, **options}}


def order(n: int, patient: str = "p-10042") -> dict[str, Any]:
    return medication_order(n, patient)


def report(name: str, **figures: Any) -> None:
    print(f"\n[{name}] " + ", ".join(f"{key}={value}" for key, value in figures.items()))


def primary_down(stack: Stack, endpoint: str = "his/primary") -> None:
    stack.primary.signal(signal.SIGKILL)
    wait_until(
        lambda: [r for r in stack.events("probe_down") if r["endpoint"] == endpoint],
        10,
        "the probes to see the primary down",
    )


def his_back(spawn: Spawner, stack: Stack) -> ServerProcess:
    port = str(stack.primary.port())
    return spawn.start("his-back", ["simulate", "his", "--port", port, "--site", "primary"])


def writes(his: ServerProcess) -> dict[str, Any]:
    log: dict[str, Any] = sim_call(his, "GET", "/_sim/writes")
    return log


def created_keys(his: ServerProcess) -> list[str]:
    return [w["key"] for w in writes(his)["writes"] if w["kind"] == "MedicationRequest.create"]


async def post_orders(http: aiohttp.ClientSession, url: str, orders: list[Any]) -> list[str]:
    """POST the orders one after the other; each must be journaled. Their tickets, in order."""
    tickets = []
    for body in orders:
        async with http.post(
            f"{url}/fhir/MedicationRequest",
            data=orjson.dumps(body),
            headers={"Content-Type": FHIR, "Authorization": "Bearer doctor-77"},
        ) as response:
            answer = await response.json()
            assert response.status == 202, answer
            assert response.headers["X-Resilgate-Degraded"] == "journal"
            assert "X-Resilgate-Upstream" not in response.headers
        assert answer["state"] == "accepted"
        assert answer["status_url"] == TICKETS_PATH + answer["ticket"]
        assert response.headers["Location"] == answer["status_url"]
        assert answer["notice"]["zh"] and answer["notice"]["en"]
        tickets.append(answer["ticket"])
    assert len(set(tickets)) == len(tickets)
    return tickets


def ticket_of(url: str, ticket: str) -> dict[str, Any]:
    """What the gateway's ticket URL says (synchronous, for wait_until)."""
    with urllib.request.urlopen(f"{url}{TICKETS_PATH}{ticket}", timeout=5) as response:
        status: dict[str, Any] = json.loads(response.read())
        return status


def all_finished(url: str, tickets: list[str]) -> list[dict[str, Any]] | None:
    """Every ticket's status once none is left to replay, else None."""
    found = [ticket_of(url, ticket) for ticket in tickets]
    return found if all(s["state"] not in ("accepted", "replaying") for s in found) else None


def journal_cli(
    gateway: ServerProcess, *args: str, token: str = VIEWER_TOKEN, check: bool = True
) -> str:
    """``resilgate journal ...`` against the gateway's admin API, as ops would run it; its
    output (and, unchecked, its errors)."""
    if check:
        return admin_cli_ok("journal", *args, admin=gateway, token=token)
    done = admin_cli("journal", *args, admin=gateway, token=token)
    return done.stdout + done.stderr


def journal_entries(gateway: ServerProcess, *args: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(journal_cli(gateway, *args, "--json"))["entries"]
    return entries


async def test_300_writes_during_an_outage_are_applied_once_each_in_acceptance_order(
    spawn: Spawner,
) -> None:
    options = journal_options(replay_rate_per_s=200)
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=options)
    primary_down(stack)
    async with aiohttp.ClientSession() as http:
        tickets = await post_orders(http, stack.url, [order(n) for n in range(300)])
    first = ticket_of(stack.url, tickets[0])
    assert (first["state"], first["queue"], first["route"]) == (
        "accepted",
        "his",
        "his-orders-write",
    )
    assert writes(stack.dr)["writes"] == []  # the read-only replica took none

    back_at = time.monotonic()
    his = his_back(spawn, stack)
    wait_until(lambda: len(created_keys(his)) >= 300, 25, "300 writes at the HIS")
    replay_s = time.monotonic() - back_at
    assert created_keys(his) == [f"{SYSTEM}|{ticket}" for ticket in tickets]
    assert writes(his)["duplicates"] == []
    ended = wait_until(lambda: all_finished(stack.url, tickets), 10, "every ticket finished")
    assert [s["state"] for s in ended] == ["applied"] * 300
    assert {s["detail"]["status"] for s in ended} == {201}
    assert all(s["detail"]["resource"].startswith("MedicationRequest/") for s in ended)
    stamps = [datetime.fromisoformat(w["at"]) for w in writes(his)["writes"]]
    pace_s = (stamps[-1] - stamps[0]).total_seconds()
    report(
        "journal-300",
        back_to_all_written_s=round(replay_s, 2),
        first_to_last_write_s=round(pace_s, 2),
        writes_per_s=round(299 / pace_s, 1),
    )


async def test_a_gateway_killed_mid_replay_leaves_no_write_lost_doubled_or_reordered(
    spawn: Spawner,
) -> None:
    options = journal_options(replay_rate_per_s=50)
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=options)
    primary_down(stack)
    async with aiohttp.ClientSession() as http:
        tickets = await post_orders(http, stack.url, [order(n) for n in range(300)])

    his = his_back(spawn, stack)
    # The ward enters the last paper order by hand, with its ticket, before its replay.
    by_hand = {**order(299), "identifier": [{"system": SYSTEM, "value": tickets[-1]}]}
    assert sim_call(his, "POST", "/fhir/MedicationRequest", by_hand)["id"]
    wait_until(lambda: len(created_keys(his)) >= 60, 15, "the replay to be under way")
    stack.gateway.signal(signal.SIGKILL)
    stack.gateway.proc.wait(timeout=5)
    at_kill = len(created_keys(his))
    assert at_kill < 300, "the kill must land mid-replay"

    config = str(spawn.tmp_path / "gateway.yaml")  # same config, same state file
    gateway = spawn.start("gateway-again", ["serve", "--config", config, "--workers", "1"])
    ended = wait_until(lambda: all_finished(gateway.url(), tickets), 25, "every ticket finished")
    keys = [f"{SYSTEM}|{ticket}" for ticket in tickets]
    assert created_keys(his) == keys[-1:] + keys[:-1]
    by_state = {s["ticket"]: s["state"] for s in ended}
    assert by_state[tickets[-1]] == "duplicate"
    assert set(by_state.values()) <= {"applied", "duplicate"}
    # An entry sent again (the gateway died before recording its answer) is recognised too.
    recognised = {d["key"].rpartition("|")[2] for d in writes(his)["duplicates"]}
    assert recognised == {t for t, state in by_state.items() if state == "duplicate"}
    report("journal-crash", writes_at_kill=at_kill, resent=len(recognised) - 1)


async def test_a_write_the_his_rejects_is_a_dead_letter_and_the_replay_goes_on(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=journal_options())
    primary_down(stack)
    orders = [order(n, patient="p-99999" if n == 6 else "p-10042") for n in range(20)]
    async with aiohttp.ClientSession() as http:
        tickets = await post_orders(http, stack.url, orders)
    rejected = tickets[6]

    his = his_back(spawn, stack)
    ended = wait_until(lambda: all_finished(stack.url, tickets), 20, "every ticket finished")
    assert created_keys(his) == [f"{SYSTEM}|{t}" for t in tickets if t != rejected]
    assert [s["state"] for s in ended] == [
        "failed" if t == rejected else "applied" for t in tickets
    ]
    dead = ended[6]["detail"]
    assert dead["status"] == 422
    assert dead["outcome"] == "business-rule: subject Patient/p-99999 does not exist"
    assert dead["request"] == "POST /fhir/MedicationRequest"

    dead = journal_entries(stack.gateway, "list", "--state", "dead")
    assert [(e["ticket"], e["queue"], e["route"], e["state"]) for e in dead] == [
        (rejected, "his", "his-orders-write", "failed")
    ]
    listed = journal_cli(stack.gateway, "list", "--state", "dead")
    row = next(line for line in listed.splitlines() if line.startswith(rejected))
    assert "FAILED" in row and "422" in row and "does not exist" in row
    assert journal_entries(stack.gateway, "list", "--state", "open") == []
    assert len(journal_entries(stack.gateway, "list", "--queue", "his")) == 20
    shown = journal_cli(stack.gateway, "show", rejected)
    assert rejected in shown and "FAILED" in shown
    assert '"status": 422' in shown
    assert "Amoxicillin" not in shown and "Amoxicillin" not in listed  # no payload


async def test_updates_are_replayed_with_if_match_and_a_moved_on_record_is_a_conflict(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=journal_options())
    his = f"{stack.primary.url()}/fhir/MedicationRequest"
    async with aiohttp.ClientSession() as http:
        created = []
        for n in range(3):  # live: the HIS is up
            async with http.post(f"{stack.url}/fhir/MedicationRequest", json=order(n)) as r:
                assert r.status == 201 and r.headers["X-Resilgate-Upstream"] == "his/primary"
                created.append(await r.json())

        set_mode(stack, "set", "his", "fallback", "--reason", "HIS upgrade")
        wait_until(lambda: stack.events("mode_seen"), 5, "the mode to be seen")
        tickets = []
        for resource in created:
            stopped = {**resource, "status": "stopped"}
            async with http.put(
                f"{stack.url}/fhir/MedicationRequest/{resource['id']}",
                data=orjson.dumps(stopped),
                headers={"Content-Type": FHIR, "If-Match": 'W/"1"'},
            ) as r:
                assert r.status == 202 and r.headers["X-Resilgate-Degraded"] == "journal"
                tickets.append((await r.json())["ticket"])
        # Meanwhile, at the HIS: someone puts the second order on hold, and enters the third
        # one's stop by hand.
        for resource, status in ((created[1], "on-hold"), (created[2], "stopped")):
            async with http.put(
                f"{his}/{resource['id']}",
                json={**resource, "status": status},
                headers={"If-Match": 'W/"1"'},
            ) as r:
                assert r.status == 200
        async with http.post(  # not a FHIR resource: refused, nothing journaled
            f"{stack.url}/fhir/MedicationRequest", data=b"[]", headers={"Content-Type": FHIR}
        ) as r:
            assert r.status == 400 and r.headers["X-Resilgate-Degraded"] == "journal"
            assert (await r.json(content_type=None))["resourceType"] == "OperationOutcome"
        assert all(ticket_of(stack.url, t)["state"] == "accepted" for t in tickets)

        set_mode(stack, "clear", "his", "--reason", "upgrade done")
        ended = wait_until(lambda: all_finished(stack.url, tickets), 15, "every ticket finished")
        assert [s["state"] for s in ended] == ["applied", "conflict", "duplicate"]
        assert ended[0]["detail"]["version"] == "2"
        assert ended[1]["detail"]["status"] == 412
        assert "If-Match names version 1" in ended[1]["detail"]["outcome"]
        for resource, status in zip(created, ("stopped", "on-hold", "stopped"), strict=True):
            async with http.get(f"{his}/{resource['id']}") as r:
                current = await r.json(content_type=None)
            assert (current["status"], current["meta"]["versionId"]) == (status, "2")
    assert len(journal_entries(stack.gateway, "list")) == 3


async def test_other_writes_are_replayed_with_an_idempotency_key(spawn: Spawner) -> None:
    route = {
        "name": "reg-register",
        "upstream": "registration",
        "criticality": "core",
        "fallback": "journal",
        "match": {"path": "/reg/v1/registrations", "methods": ["POST"]},
        "timeouts": {"connect_s": 0.5, "total_s": 1},
    }
    options = journal_options()
    stack = start_stack(spawn, "registration", [route], dr_read_only=True, fallbacks=options)
    primary_down(stack, "registration/primary")
    walk_in = {
        "patientId": "test-0001",
        "dept": "TEST",
        "doctorId": "d-test",
        "slotId": "walk-in",
        "payType": "insured",
        "channel": "kiosk",
    }
    tickets = []
    async with aiohttp.ClientSession() as http:
        # The kiosk sends its first registration twice (a retry), with its own key.
        for key in ("kiosk-7-0001", "kiosk-7-0001", None):
            headers = {"Idempotency-Key": key} if key else {}
            async with http.post(
                f"{stack.url}/reg/v1/registrations", json=walk_in, headers=headers
            ) as r:
                assert r.status == 202 and r.headers["X-Resilgate-Degraded"] == "journal"
                tickets.append((await r.json())["ticket"])

    back = spawn.start(
        "registration-back",
        ["simulate", "registration", "--port", str(stack.primary.port()), "--site", "primary"],
    )
    ended = wait_until(lambda: all_finished(stack.url, tickets), 15, "every ticket finished")
    assert [s["state"] for s in ended] == ["applied", "duplicate", "applied"]
    log = writes(back)
    assert [w["key"] for w in log["writes"]] == ["kiosk-7-0001", tickets[2]]
    assert [d["key"] for d in log["duplicates"]] == ["kiosk-7-0001"]


@pytest.mark.parametrize(
    ("kind", "status", "transient", "state"),
    [
        ("create", 201, False, "applied"),
        ("create", 200, False, "duplicate"),
        ("create", 200, True, "accepted"),  # a platform error: nothing applied, try later
        ("create", 412, False, "conflict"),
        ("update", 200, False, "applied"),
        ("update", 409, False, "conflict"),
        ("update", 404, False, "failed"),
        ("keyed", 200, False, "applied"),
        ("create", 422, False, "failed"),
        ("create", 400, False, "failed"),
        ("create", 429, False, "accepted"),
        ("create", 401, False, "accepted"),
        ("create", 503, False, "accepted"),
        ("create", 302, False, "failed"),
    ],
)
def test_how_an_answer_ends_a_replayed_entry(
    kind: Any, status: int, transient: bool, state: str
) -> None:
    assert replay_state(kind, status, transient) == state


def test_which_writes_can_be_replayed_exactly_once() -> None:
    assert write_kind("POST", "/fhir/MedicationRequest") == ("create", "MedicationRequest")
    assert write_kind("PUT", "/his/fhir/ServiceRequest/sr-1") == ("update", "ServiceRequest")
    assert write_kind("POST", "/reg/v1/registrations") == ("keyed", "")
    for method, path in (
        ("POST", "/fhir"),  # a transaction Bundle
        ("POST", "/fhir/MedicationRequest/mr-1"),
        ("PUT", "/fhir/MedicationRequest"),  # a conditional update
        ("POST", "/fhir/Patient/$match"),
        ("GET", "/reg/v1/queues/NEI"),
    ):
        assert write_kind(method, path) is None, path
    assert same_resource({"id": "a", "meta": {"versionId": "2"}}, {"id": "a"})
    assert not same_resource({"id": "a", "status": "on-hold"}, {"id": "a", "status": "stopped"})


async def test_a_write_that_may_have_reached_the_his_is_never_journaled(spawn: Spawner) -> None:
    """The primary takes the POST and hangs; the retry finds the DR site refusing connections
    (or its breaker, once the probes saw it go). The first try may have applied it, so the
    client hears ``upstream_timeout``, not 202."""
    stack = start_stack(spawn, "his", ROUTES, fallbacks=journal_options())
    sim_call(stack.primary, "PUT", "/_sim/fault", {"mode": "hang", "path_prefix": "/fhir/"})
    stack.dr.signal(signal.SIGKILL)
    headers = {"Content-Type": FHIR, "Idempotency-Key": "order-0001"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/fhir/MedicationRequest", json=order(1), headers=headers) as r,
    ):
        status, answered, body = r.status, dict(r.headers), await r.json()
    assert status == 504 and body["error"] == "upstream_timeout", body
    assert "X-Resilgate-Degraded" not in answered
    assert not stack.events("journal_accepted")
    assert traffic(stack.primary) == 1  # it got there


async def test_an_entry_the_his_keeps_failing_becomes_a_dead_letter_and_the_queue_goes_on(
    spawn: Spawner,
) -> None:
    options = journal_options(give_up_after_s=2)
    # Each failed replay is a failed half-open trial that opens the breaker again.
    health = {**FAST_HEALTH, "breaker": {"consecutive_failures": 5, "open_s": 0.5, "max_open_s": 1}}
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, health=health, fallbacks=options)
    primary_down(stack)
    lab_order = {**order(0), "resourceType": "ServiceRequest", "code": {"text": "CBC"}}
    lab_order.pop("medicationCodeableConcept")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.url}/fhir/ServiceRequest", json=lab_order, headers={"Content-Type": FHIR}
        ) as response:
            assert response.status == 202
            poison = (await response.json())["ticket"]
        tickets = await post_orders(http, stack.url, [order(n) for n in range(1, 4)])

    his = his_back(spawn, stack)  # it answers 500 to this one kind of write, every time
    sim_call(
        his,
        "PUT",
        "/_sim/fault",
        {"mode": "error_rate", "rate": 1.0, "status": 500, "path_prefix": "/fhir/ServiceRequest"},
    )
    ended = wait_until(lambda: all_finished(stack.url, [poison, *tickets]), 60, "all finished")
    assert [s["state"] for s in ended] == ["failed", "applied", "applied", "applied"]
    assert ended[0]["detail"]["tries"] >= 5 and ended[0]["detail"]["gave_up_after_s"] >= 2
    assert created_keys(his) == [f"{SYSTEM}|{t}" for t in tickets]
    assert [r["ticket"] for r in stack.events("replay_gave_up")] == [poison]


def probes_seen(server: ServerProcess) -> int:
    return int(sim_call(server, "GET", "/_sim/stats")["probes"])


async def test_a_write_route_ops_forced_off_is_not_replayed_until_they_lift_it(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=journal_options())
    set_mode(stack, "set", "his-orders-write", "fallback", "--reason", "HIS order module bug")
    async with aiohttp.ClientSession() as http:
        tickets = await post_orders(http, stack.url, [order(n) for n in range(3)])
    # The HIS is healthy the whole time: 10 more probe rounds (2 s) show time passing with
    # the replayer free to run, and the writes must still wait.
    seen = probes_seen(stack.primary)
    wait_until(lambda: probes_seen(stack.primary) >= seen + 10, 10, "10 more probe rounds")
    assert created_keys(stack.primary) == []
    assert {ticket_of(stack.url, t)["state"] for t in tickets} == {"accepted"}

    set_mode(stack, "clear", "his-orders-write", "--reason", "fixed")
    ended = wait_until(lambda: all_finished(stack.url, tickets), 10, "the held writes replayed")
    assert [s["state"] for s in ended] == ["applied"] * 3
    assert created_keys(stack.primary) == [f"{SYSTEM}|{t}" for t in tickets]


async def test_ops_retry_a_dead_letter_then_discard_it_and_both_are_audited(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", ROUTES, dr_read_only=True, fallbacks=journal_options())
    primary_down(stack)
    async with aiohttp.ClientSession() as http:
        (rejected,) = await post_orders(http, stack.url, [order(0, patient="p-99999")])
    his_back(spawn, stack)
    wait_until(lambda: all_finished(stack.url, [rejected]), 20, "the entry to be dead")

    retried = journal_cli(
        stack.gateway, "retry", rejected, "--reason", "patient registered?", token=OPERATOR_TOKEN
    )
    assert "accepted" in retried
    # Replayed again at once (it is the head of its queue) and refused again: dead once more.
    wait_until(
        lambda: (
            (status := ticket_of(stack.url, rejected))["state"] == "failed"
            and status["detail"]["status"] == 422
        ),
        10,
        "the retried entry replayed and refused again",
    )
    journal_cli(
        stack.gateway, "discard", rejected, "--reason", "entered on paper", token=OPERATOR_TOKEN
    )
    assert ticket_of(stack.url, rejected)["state"] == "discarded"
    refused = journal_cli(
        stack.gateway, "retry", rejected, "--reason", "again", token=OPERATOR_TOKEN, check=False
    )
    assert "409 not_retryable" in refused

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            stack.gateway.url("admin") + "/audit",
            headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
        ) as response,
    ):
        audit = (await response.json())["records"]
    assert [(r["action"], r["target"], r["actor"]) for r in audit[:2]] == [
        ("journal.discard", rejected, "test-operator"),
        ("journal.retry", rejected, "test-operator"),
    ]
    assert audit[0]["reason"] == "entered on paper"
