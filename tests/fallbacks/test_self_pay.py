"""Self-pay: with insurance down, a settlement is answered as paid in full by the patient and
its claim is kept; once insurance is back, the claim is re-settled exactly once, and its ticket
shows the outcome and the refund due. Real gateway, real insurance simulators."""

from __future__ import annotations

import itertools
import json
import signal
import time
import urllib.request
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from fallbacks.self_pay import SelfPay
from resilgate.config import Config
from resilgate.fallback import (
    FallbackRequest,
    FallbackServices,
    Replayed,
    UpstreamAnswer,
    UpstreamClient,
)
from resilgate.metrics import Metrics
from resilgate.state.memory import MemoryStore
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.failover_stack import Stack, set_fault, set_mode, sim_call, start_stack
from tests.insurance_calls import FIXMEDINS, envelope, settle_input

CALL = "/fsi/api/callService"
ROUTES = [
    {
        "name": "insurance-settlement",
        "upstream": "insurance",
        "criticality": "core",
        "fallback": "self-pay",
        "match": {
            "path": CALL,
            "methods": ["POST"],
            "body": {"field": "infno", "values": ["2207", "2208", "2601"]},
        },
        "retries": "never",
        "failure_body": {"format": "insurance_envelope"},
        "timeouts": {"connect_s": 0.5, "total_s": 2.0},
    },
    {
        "name": "insurance-trial",
        "upstream": "insurance",
        "criticality": "core",
        "fallback": "self-pay",
        "match": {
            "path": CALL,
            "methods": ["POST"],
            "body": {"field": "infno", "values": ["1101", "2001", "2206", "5203", "9001"]},
        },
        "retries": "safe",
        "failure_body": {"format": "insurance_envelope"},
        "timeouts": {"connect_s": 0.5, "total_s": 2.0},
    },
]
RESOLVE_AFTER_S = 1.5
SELF_PAY = {
    "message_zh": "医保暂停，请先自费",
    "message_en": "Insurance paused: please pay in full",
    "settle_timeout_s": 1.0,
    "resolve_after_s": RESOLVE_AFTER_S,
}
FALLBACKS = {"self_pay": SELF_PAY, "journal": {"retry_after_s": 0.5, "claim_lease_s": 3.0}}
NOTICE = {"code": "insurance_unavailable_self_pay", "zh": SELF_PAY["message_zh"]}
_sequence = itertools.count(1)


def msgid() -> str:
    """A kiosk's msgid; its sequences stay below the gateway's own (9000-9999)."""
    return f"{FIXMEDINS}{time.strftime('%Y%m%d%H%M%S')}{next(_sequence) % 9000:04d}"


async def call(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]
) -> tuple[int, dict[str, str], Any]:
    async with http.post(stack.url + CALL, json=body) as response:
        return response.status, dict(response.headers), await response.json()


def ticket(stack: Stack, claim_id: str) -> Any:
    url = f"{stack.url}/_resilgate/tickets/{claim_id}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def finished(stack: Stack, claim_id: str) -> Any:
    """The claim's ticket once its re-settlement has finished, else None."""
    status = ticket(stack, claim_id)
    return status if status["state"] in ("applied", "failed", "conflict") else None


def settlements(server: ServerProcess) -> list[dict[str, Any]]:
    """Every 2207 the simulator committed (a duplicate msgid is not one)."""
    return [w for w in sim_call(server, "GET", "/_sim/writes")["writes"] if w["kind"] == "2207"]


def insurance_in_fallback(stack: Stack) -> None:
    """Ops hold insurance back (settlements self-pay, nothing replayed); DR is gone, so every
    re-settlement goes to the primary, the one platform the test watches."""
    stack.dr.signal(signal.SIGKILL)
    set_mode(stack, "set", "insurance", "fallback", "--reason", "test")
    wait_until(lambda: stack.events("mode_seen"), 5, "the gateway to see the forced mode")


def insurance_back(stack: Stack) -> None:
    set_mode(stack, "clear", "insurance", "--reason", "test over")


async def self_pay_claim(http: aiohttp.ClientSession, stack: Stack, **data: Any) -> str:
    """A 2207 answered self-pay while insurance is down; its claim id."""
    status, headers, body = await call(
        http, stack, envelope("2207", msgid(), settle_input(**{"amount": 236.50, **data}))
    )
    assert status == 200 and headers["X-Resilgate-Degraded"] == "self-pay", (status, body)
    claim_id: str = body["resilgate"]["claim_id"]
    return claim_id


def assert_settled_once(stack: Stack, server: ServerProcess, status: Any) -> dict[str, Any]:
    """The claim's ticket says settled, with the refund due, and the insurer holds exactly
    that one settlement, made with one of the claim's recorded msgids."""
    detail: dict[str, Any] = status["detail"]
    assert status["state"] == "applied" and detail["state"] == "settled", status
    committed = settlements(server)
    assert [w["setl_id"] for w in committed] == [detail["setl_id"]], committed
    assert committed[0]["key"] in {a["msgid"] for a in detail["attempts"]}
    refund = Decimal(str(detail["fund_pay_sumamt"])) + Decimal(str(detail["acct_pay"]))
    assert Decimal(str(detail["refund_due"])) == refund > 0
    assert Decimal(str(detail["psn_cash_pay"])) + refund == Decimal("236.50")
    return detail


async def test_with_insurance_down_a_settlement_is_self_pay_and_is_resettled_once_it_is_back(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    port = stack.primary.port()
    for site in (stack.primary, stack.dr):
        site.signal(signal.SIGKILL)
    # A 2207 sent at the moment of the crash has an unknown outcome (the gateway answers so);
    # from the moment the probes see both sites down, settlements are self-pay.
    wait_until(lambda: len(stack.events("probe_down")) == 2, 5, "probes to see both sites down")

    sent = envelope("2207", msgid(), settle_input(236.50, "CB-SP-1"))
    async with aiohttp.ClientSession() as http:
        status, headers, body = await call(http, stack, sent)
        assert status == 200, body
        assert headers["X-Resilgate-Degraded"] == "self-pay"
        assert "X-Resilgate-Upstream" not in headers
        assert body["infcode"] == "0" and body["inf_refmsgid"] == sent["msgid"]
        setlinfo = body["output"]["setlinfo"]
        assert setlinfo["medfee_sumamt"] == setlinfo["psn_cash_pay"] == 236.50
        assert setlinfo["fund_pay_sumamt"] == setlinfo["acct_pay"] == 0
        assert setlinfo["setl_id"] is None
        section = body["resilgate"]
        assert section["degraded"] == "self-pay" and section["due_from_patient"] == 236.50
        assert section["notice"]["zh"] == NOTICE["zh"] and section["notice"]["en"]
        claim_id = section["claim_id"]
        assert claim_id.startswith("C-") and section["claim_url"].endswith(claim_id)
        assert ticket(stack, claim_id)["state"] == "accepted"

        trial = envelope("2206", msgid(), settle_input(80.00, "CB-SP-2"))
        status, headers, body = await call(http, stack, trial)
        assert status == 200 and headers["X-Resilgate-Degraded"] == "self-pay"
        assert body["output"]["setlinfo"]["psn_cash_pay"] == 80.00
        assert body["resilgate"]["claim_id"] is None and body["resilgate"]["trial"] is True

        person = envelope("1101", msgid(), {"psn_no": "TEST0001"})
        status, headers, body = await call(http, stack, person)
        assert status == 200 and headers["X-Resilgate-Degraded"] == "self-pay"
        assert body["infcode"] == "0" and body["output"]["baseinfo"]["psn_no"] == "TEST0001"
        assert body["output"]["insuinfo"] == []
        assert body["resilgate"]["eligibility"] == "unknown"

        undo = envelope("2208", msgid(), {"setl_id": "S1", "mdtrt_id": "MD250320001"})
        status, headers, _ = await call(http, stack, undo)
        assert status == 503 and headers["X-Resilgate-Degraded"] == "notice"

    started = time.monotonic()
    back = spawn.start(
        "sim-insurance-primary-back",
        ["simulate", "insurance", "--port", str(port), "--site", "primary"],
    )
    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be re-settled")
    print(f"\n[self-pay] re-settled {time.monotonic() - started:.2f}s after insurance returned")
    detail = assert_settled_once(stack, back, status)
    assert [a["infno"] for a in detail["attempts"]] == ["2207"]
    resettled = detail["attempts"][0]["msgid"]
    assert resettled.startswith(FIXMEDINS) and 9000 <= int(resettled[-4:]) <= 9999
    assert "TEST0001" not in json.dumps(status)  # no patient identifier on the ticket


async def test_a_resettlement_that_commits_then_hangs_is_resolved_by_query_not_sent_again(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    async with aiohttp.ClientSession() as http:
        claim_id = await self_pay_claim(http, stack, bchno="CB-HANG-1")
    set_fault(stack.primary, mode="commit_then_hang")  # only a committed 2207 hangs
    insurance_back(stack)

    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be resolved")
    detail = assert_settled_once(stack, stack.primary, status)
    assert [(a["infno"], a["outcome"]) for a in detail["attempts"]] == [
        ("2207", "unknown"),
        ("5203", "settled"),
    ]
    assert detail["resolved_by"] == "5203 query"
    assert not sim_call(stack.primary, "GET", "/_sim/writes")["duplicates"]


async def test_a_resettlement_lost_before_the_insurer_is_reversed_then_sent_anew_once(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    async with aiohttp.ClientSession() as http:
        claim_id = await self_pay_claim(http, stack, bchno="CB-LOST-1")
    # Envelopes hang before the platform sees them; the web tier (and /health) stays up.
    set_fault(stack.primary, mode="hang", path_prefix="/fsi/")
    insurance_back(stack)

    def unknown() -> bool:
        detail = ticket(stack, claim_id)["detail"]
        return bool(detail) and detail["state"] == "unknown"

    wait_until(unknown, 15, "the re-settlement to time out")
    assert not settlements(stack.primary)
    set_fault(stack.primary, mode="none")

    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be resolved")
    detail = assert_settled_once(stack, stack.primary, status)
    steps = [(a["infno"], a["outcome"]) for a in detail["attempts"]]
    assert steps[0] == ("2207", "unknown") and steps[-1] == ("2207", "settled")
    assert ("5203", "not_found") in steps and ("2601", "nothing_to_reverse") in steps
    assert steps.index(("2601", "nothing_to_reverse")) < len(steps) - 1


async def test_a_claim_the_insurer_rejects_is_a_dead_letter_and_the_next_is_still_settled(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    async with aiohttp.ClientSession() as http:
        suspended = await self_pay_claim(http, stack, bchno="CB-REJ-1", psn_no="TEST0002")
        insured = await self_pay_claim(http, stack, bchno="CB-REJ-2")
    insurance_back(stack)

    second = wait_until(lambda: finished(stack, insured), 20, "the second claim to be settled")
    first = ticket(stack, suspended)
    assert first["state"] == "failed", first
    assert first["detail"]["state"] == "rejected"
    assert "参保人待遇暂停" in first["detail"]["reason"]  # the insurer's own words
    assert "TEST0002" not in json.dumps(first)
    assert_settled_once(stack, stack.primary, second)
    assert any(r.get("ticket") == suspended for r in stack.events("replay_finished"))


async def test_a_body_that_is_no_envelope_is_refused_and_nothing_is_claimed(spawn: Spawner) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    bad = envelope("2207", msgid(), {**settle_input(1, "CB-BAD"), "medfee_sumamt": "lots"})
    async with aiohttp.ClientSession() as http:
        status, headers, body = await call(http, stack, bad)
    assert status == 400 and headers["X-Resilgate-Degraded"] == "self-pay"
    assert body["infcode"] == "-1" and "medfee_sumamt" in body["err_msg"]
    assert not stack.events("journal_accepted")


# In-process checks of the I/O layer, with the upstream as the only stand-in.
IN_PROCESS = Config.model_validate(
    {
        "upstreams": {
            "insurance": {"endpoints": [{"name": "p", "url": "http://127.0.0.1:1", "priority": 0}]}
        },
        "routes": ROUTES,
        "fallbacks": FALLBACKS,
    }
)


def fallback_request(infno: str, amount: float = 10.0) -> FallbackRequest:
    body = orjson.dumps(envelope(infno, msgid(), settle_input(amount, "CB-IN-PROCESS")))
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    route = IN_PROCESS.routes[0 if infno == "2207" else 1]
    return FallbackRequest(route, "POST", CALL, {}, CALL, headers, body, "rid", "down")


class Insurer(UpstreamClient):
    """Fails the first send after it left (a bug, a crash); then answers 5203 with a live
    settlement of 10.00 and refuses anything else."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, upstream: str, method: str, path: str, **kw: Any) -> UpstreamAnswer:
        infno = orjson.loads(kw["body"])["infno"]
        self.sent.append(infno)
        if len(self.sent) == 1:
            raise RuntimeError("the replayer broke after sending")
        setlinfo = {
            "setl_id": "S1",
            "mdtrt_id": "MD250320001",
            "medfee_sumamt": 10.0,
            "fund_pay_sumamt": 7.0,
            "acct_pay": 3.0,
            "psn_cash_pay": 0.0,
            "vali_flag": "1",
        }
        answer = {"infcode": "0", "output": {"setlinfo": setlinfo}}
        if infno != "5203":
            answer = {"infcode": "-1", "err_msg": f"unexpected {infno}", "output": {}}
        return UpstreamAnswer(200, {}, orjson.dumps(answer), "insurance/p")


async def test_a_2207_recorded_then_lost_to_a_crash_is_queried_never_sent_again() -> None:
    store, insurer, now = MemoryStore(), Insurer(), [1000.0]
    await store.open()
    services = FallbackServices(
        IN_PROCESS, Metrics(), "test/1", insurer, lambda: store, clock=lambda: now[0]
    )
    self_pay = SelfPay(services)
    assert await self_pay.serve(fallback_request("2207")) is not None

    async def turn() -> Replayed:
        """One replayer turn, as resilgate/replay.py takes it."""
        (entry,) = await store.journal_claim("insurance", "test/1", 1, 3.0)
        outcome = await self_pay.replay(entry)
        if outcome.state == "accepted":
            assert await store.journal_note(entry.ticket, "test/1", outcome.detail)
        return outcome

    crashed = await turn()
    assert insurer.sent == ["2207"] and crashed.state == "accepted"
    assert orjson.loads(crashed.detail)["attempts"][0]["outcome"] == "sending"
    waiting = await turn()
    assert insurer.sent == ["2207"] and orjson.loads(waiting.detail)["state"] == "unknown"
    now[0] += RESOLVE_AFTER_S
    resolved = await turn()
    assert insurer.sent == ["2207", "5203"] and resolved.state == "applied"
    assert orjson.loads(resolved.detail)["refund_due"] == 10.0


async def test_no_self_pay_answer_for_a_claim_the_journal_could_not_keep() -> None:
    """The answer promises a refund later: without a stored claim, the notice answers (503)."""
    no_store = FallbackServices(IN_PROCESS, Metrics(), "test/1", UpstreamClient(), lambda: None)
    self_pay = SelfPay(no_store)
    assert await self_pay.serve(fallback_request("2207")) is None
    trial = await self_pay.serve(
        fallback_request("2206")
    )  # a trial keeps nothing: it still answers
    assert trial is not None and trial.status == 200
