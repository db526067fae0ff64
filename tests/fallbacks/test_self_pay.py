"""Self-pay: with insurance down, a settlement is answered as paid in full by the patient and
its claim is kept; once insurance is back, the claim is re-settled exactly once, and its ticket
shows the outcome and the refund due. The HIS's own 2207 behind a claim is asked about (5203,
2601) before any new one. Real gateway, real insurance simulators; then the same in process,
against the simulator's platform behind a scripted network and clock."""

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
from resilgate.errors import UpstreamTimeout
from resilgate.fallback import (
    FallbackRequest,
    FallbackServices,
    Replayed,
    UpstreamAnswer,
    UpstreamClient,
)
from resilgate.metrics import Metrics
from resilgate.simulators.faults import WriteLog
from resilgate.simulators.insurance import InsurancePlatform
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
SETTLE_TIMEOUT_S, RESOLVE_AFTER_S, LEASE_S = 1.0, 1.5, 3.0
SELF_PAY = {
    "message_zh": "医保暂停，请先自费",
    "message_en": "Insurance paused: please pay in full",
    "settle_timeout_s": SETTLE_TIMEOUT_S,
    "resolve_after_s": RESOLVE_AFTER_S,
    "max_inconclusive": 3,
}
FALLBACKS = {"self_pay": SELF_PAY, "journal": {"retry_after_s": 0.5, "claim_lease_s": LEASE_S}}
# What a claim whose HIS 2207 never reached the insurer does first.
HIS_2207_CLEARED = [("2207", "unknown"), ("5203", "not_found"), ("2601", "nothing_to_reverse")]
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


def steps(detail: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["infno"], a["outcome"]) for a in detail["attempts"]]


def insurance_in_fallback(stack: Stack) -> None:
    """Ops hold insurance back (settlements self-pay, nothing replayed); DR is gone, so every
    re-settlement goes to the primary, the one platform the test watches."""
    stack.dr.signal(signal.SIGKILL)
    set_mode(stack, "set", "insurance", "fallback", "--reason", "test")
    wait_until(lambda: stack.events("mode_seen"), 5, "the gateway to see the forced mode")


def insurance_back(stack: Stack) -> None:
    set_mode(stack, "clear", "insurance", "--reason", "test over")


async def self_pay_claim(
    http: aiohttp.ClientSession, stack: Stack, his_msgid: str = "", **data: Any
) -> str:
    """A 2207 answered self-pay while insurance is down; its claim id."""
    sent = envelope("2207", his_msgid or msgid(), settle_input(**{"amount": 236.50, **data}))
    status, headers, body = await call(http, stack, sent)
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
    # The HIS's 2207 never got there (connection refused): 5203 finds nothing, 2601 has
    # nothing to reverse, and only then one new 2207.
    assert steps(detail) == [*HIS_2207_CLEARED, ("2207", "settled")]
    assert detail["attempts"][0]["msgid"] == sent["msgid"]
    assert [a["about"] for a in detail["attempts"][1:3]] == [sent["msgid"]] * 2
    resettled = detail["attempts"][-1]["msgid"]
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
    assert steps(detail) == [*HIS_2207_CLEARED, ("2207", "unknown"), ("5203", "settled")]
    assert detail["resolved_by"] == "5203 query"
    assert not sim_call(stack.primary, "GET", "/_sim/writes")["duplicates"]


async def test_a_his_2207_the_insurer_applied_is_settled_by_query_and_never_sent_again(
    spawn: Spawner,
) -> None:
    """A platform error can hide a commit: the HIS's 2207 was applied, yet the gateway
    answered self-pay. The claim finds it (5203) and settles with its amounts."""
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    his = envelope("2207", msgid(), settle_input(236.50, "CB-HID-1"))
    applied = sim_call(stack.primary, "POST", CALL, his)  # reached the platform, then lost
    assert applied["infcode"] == "0", applied
    async with aiohttp.ClientSession() as http:
        claim_id = await self_pay_claim(http, stack, his["msgid"], bchno="CB-HID-1")
    insurance_back(stack)

    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be resolved")
    detail = assert_settled_once(stack, stack.primary, status)
    assert steps(detail) == [("2207", "unknown"), ("5203", "settled")]
    assert detail["resolved_by"] == "5203 query"
    assert settlements(stack.primary)[0]["key"] == his["msgid"]
    assert detail["setl_id"] == applied["output"]["setlinfo"]["setl_id"]


async def test_a_query_refused_for_another_reason_sends_no_2207_and_ends_with_a_person(
    spawn: Spawner,
) -> None:
    """The HIS reused the msgid of another patient's settlement: 5203 answers "not this
    person", which is neither found nor not found. No 2601, no 2207: after
    ``max_inconclusive`` such answers the claim is a dead letter with the insurer's words."""
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    his = envelope("2207", msgid(), settle_input(236.50, "CB-COL-1"))
    assert sim_call(stack.primary, "POST", CALL, his)["infcode"] == "0"
    async with aiohttp.ClientSession() as http:
        claim_id = await self_pay_claim(
            http, stack, his["msgid"], bchno="CB-COL-2", psn_no="TEST0002"
        )
    insurance_back(stack)

    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be given up")
    assert status["state"] == "conflict", status
    detail = status["detail"]
    assert detail["state"] == "conflict" and detail["unknown_msgid"] == his["msgid"]
    assert steps(detail) == [("2207", "unknown")] + [("5203", "inconclusive")] * 3
    assert "不属于 ***" in detail["reason"] and his["msgid"] in detail["reason"]
    assert "TEST0002" not in json.dumps(status)
    assert [w["key"] for w in settlements(stack.primary)] == [his["msgid"]]  # nothing new


async def test_a_claim_whose_queries_hang_sends_nothing_else_until_the_insurer_answers(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "insurance", ROUTES, fallbacks=FALLBACKS)
    insurance_in_fallback(stack)
    async with aiohttp.ClientSession() as http:
        claim_id = await self_pay_claim(http, stack, bchno="CB-LOST-1")
    # Envelopes hang before the platform sees them; the web tier (and /health) stays up.
    set_fault(stack.primary, mode="hang", path_prefix="/fsi/")
    insurance_back(stack)

    def query_unanswered() -> bool:
        detail = ticket(stack, claim_id)["detail"]
        return bool(detail) and ("5203", "no_answer") in steps(detail)

    wait_until(query_unanswered, 15, "a query of the HIS's 2207 to time out")
    detail = ticket(stack, claim_id)["detail"]
    assert detail["state"] == "unknown" and not detail.get("inconclusive")  # no answer: waits
    assert {step for step in steps(detail)[1:]} == {("5203", "no_answer")}
    assert not settlements(stack.primary)
    set_fault(stack.primary, mode="none")

    status = wait_until(lambda: finished(stack, claim_id), 20, "the claim to be resolved")
    detail = assert_settled_once(stack, stack.primary, status)
    assert steps(detail)[-3:] == [*HIS_2207_CLEARED[1:], ("2207", "settled")]


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
    assert steps(first["detail"]) == [*HIS_2207_CLEARED, ("2207", "rejected")]
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


# In-process checks of the I/O layer: the insurer is the simulator's platform, in process.
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


class Network(UpstreamClient):
    """The insurance simulator's platform in process, behind a network the test scripts:
    ``faults[infno]`` says what happens to the next calls of that transaction; a call that
    gets an answer takes ``call_s`` on the test's clock."""

    def __init__(self, now: list[float], call_s: float) -> None:
        self.writes = WriteLog()
        self.platform = InsurancePlatform(1, self.writes)
        self.now, self.call_s = now, call_s
        self.calls: list[tuple[str, float, float]] = []  # infno, started, timeout_s
        self.faults: dict[str, list[str]] = {}

    async def send(self, upstream: str, method: str, path: str, **kw: Any) -> UpstreamAnswer:
        sent = orjson.loads(kw["body"])
        self.calls.append((sent["infno"], self.now[0], kw["timeout_s"]))
        fault = (self.faults.get(sent["infno"]) or [""]).pop(0)
        if fault == "lost":  # never reached the platform; the caller times out
            self.now[0] += kw["timeout_s"]
            raise UpstreamTimeout("no answer in time")
        answer, _ = self.platform.handle(sent)
        if fault == "crash":  # applied; the replayer breaks before it hears of it
            raise RuntimeError("the replayer broke after sending")
        self.now[0] += self.call_s
        return UpstreamAnswer(200, {}, orjson.dumps(answer), "insurance/p")

    def sent(self) -> list[str]:
        return [infno for infno, _, _ in self.calls]

    def settlements(self) -> list[str]:
        return [w["key"] for w in self.writes.writes if w["kind"] == "2207"]


class SlowStore(MemoryStore):
    """A store whose ``journal_note`` takes ``note_s`` on the test's clock."""

    def __init__(self, now: list[float]) -> None:
        super().__init__(clock=lambda: now[0])
        self.now, self.note_s = now, 0.0

    async def journal_note(self, ticket: str, owner: str, detail: str) -> bool:
        self.now[0] += self.note_s
        return await super().journal_note(ticket, owner, detail)


class Bench:
    """One self-pay claim, made at 1000.0, and the replayer's turns on it."""

    def __init__(self, call_s: float = 0.01) -> None:
        self.now = [1000.0]
        self.store = SlowStore(self.now)
        self.network = Network(self.now, call_s)
        services = FallbackServices(
            IN_PROCESS, Metrics(), "test/1", self.network, lambda: self.store, clock=self.clock
        )
        self.self_pay = SelfPay(services)

    def clock(self) -> float:
        return self.now[0]

    async def claim(self) -> None:
        await self.store.open()
        assert await self.self_pay.serve(fallback_request("2207")) is not None

    async def turn(self) -> Replayed:
        """One replayer turn, as resilgate/replay.py takes it; no call it starts may outlast
        the lease the turn holds."""
        claimed, first = self.now[0], len(self.network.calls)
        (entry,) = await self.store.journal_claim("insurance", "test/1", 1, LEASE_S)
        outcome = await self.self_pay.replay(entry)
        for infno, started, timeout_s in self.network.calls[first:]:
            assert started + timeout_s <= claimed + LEASE_S, f"{infno} could outlast the lease"
        if outcome.state == "accepted":
            assert await self.store.journal_note(entry.ticket, "test/1", outcome.detail)
        else:
            assert await self.store.journal_finish(
                entry.ticket, "test/1", outcome.state, outcome.detail
            )
        return outcome


def progress_of(outcome: Replayed) -> dict[str, Any]:
    detail: dict[str, Any] = orjson.loads(outcome.detail)
    return detail


async def test_a_resettlement_2207_lost_before_the_insurer_is_reversed_then_sent_anew_once() -> (
    None
):
    bench = Bench()
    await bench.claim()
    bench.network.faults["2207"] = ["lost"]
    bench.now[0] += SETTLE_TIMEOUT_S  # the HIS's 2207 is asked about from then on
    lost = await bench.turn()
    assert bench.network.sent() == ["5203", "2601", "2207"]
    assert progress_of(lost)["state"] == "unknown" and not bench.network.settlements()
    assert progress_of(await bench.turn())["state"] == "unknown"  # waits resolve_after_s
    assert bench.network.sent() == ["5203", "2601", "2207"]
    bench.now[0] += RESOLVE_AFTER_S
    resolved = await bench.turn()
    assert bench.network.sent() == ["5203", "2601", "2207"] * 2
    assert resolved.state == "applied"
    assert bench.network.settlements() == [progress_of(resolved)["attempts"][-1]["msgid"]]


async def test_a_2207_recorded_then_lost_to_a_crash_is_queried_never_sent_again() -> None:
    bench = Bench()
    await bench.claim()
    bench.network.faults["2207"] = ["crash"]
    bench.now[0] += SETTLE_TIMEOUT_S
    crashed = await bench.turn()
    assert bench.network.sent() == ["5203", "2601", "2207"] and crashed.state == "accepted"
    recorded = progress_of(crashed)["attempts"][-1]
    assert recorded["outcome"] == "sending"
    # Its call might have run until its timeout: it is queried resolve_after_s after that.
    ask_at = recorded["sent_at"] + SETTLE_TIMEOUT_S + RESOLVE_AFTER_S
    bench.now[0] = ask_at - 0.01
    waiting = await bench.turn()
    assert progress_of(waiting)["state"] == "unknown" and len(bench.network.calls) == 3
    bench.now[0] = ask_at
    resolved = await bench.turn()
    assert bench.network.sent() == ["5203", "2601", "2207", "5203"]
    assert resolved.state == "applied" and progress_of(resolved)["resolved_by"] == "5203 query"
    assert progress_of(resolved)["refund_due"] == 10.0  # fund 7.00 + account 3.00
    assert bench.network.settlements() == [recorded["msgid"]]


async def test_a_turn_never_starts_a_call_that_could_outlast_the_lease() -> None:
    """Counting the first call: a slow store can eat the lease before it. Calls that take
    long end the turn early; the next turn goes on under a fresh lease."""
    bench = Bench(call_s=0.6)
    await bench.claim()
    bench.now[0] += SETTLE_TIMEOUT_S
    bench.store.note_s = LEASE_S - SETTLE_TIMEOUT_S + 0.5  # recording the first send
    deferred = await bench.turn()
    assert not bench.network.calls and deferred.state == "accepted"
    assert progress_of(deferred)["attempts"][-1]["outcome"] == "unknown"  # nothing "sending"
    bench.store.note_s = 0.0
    per_turn = []
    for _ in range(5):
        first = len(bench.network.calls)
        outcome = await bench.turn()
        per_turn.append(bench.network.sent()[first:])
        if outcome.state != "accepted":
            break
    # 0.6 s a call: after one, another could end past half of the 3 s lease.
    assert per_turn == [["5203"], ["2601"], ["2207"]] and outcome.state == "applied"
    assert len(bench.network.settlements()) == 1


async def test_no_self_pay_answer_for_a_claim_the_journal_could_not_keep() -> None:
    """The answer promises a refund later: without a stored claim, the notice answers (503)."""
    no_store = FallbackServices(IN_PROCESS, Metrics(), "test/1", UpstreamClient(), lambda: None)
    self_pay = SelfPay(no_store)
    assert await self_pay.serve(fallback_request("2207")) is None
    trial = await self_pay.serve(
        fallback_request("2206")
    )  # a trial keeps nothing: it still answers
    assert trial is not None and trial.status == 200
