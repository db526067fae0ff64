"""The self-pay re-settlement state machine (DOMAIN.md 3.3), without I/O: what a claim holds,
how answers are read, and what is sent next. The rule above all: a 2207 that may have been
applied is never followed by another 2207 until the insurer has said it does not stand."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fallbacks.resettlement import (
    DETAIL_CHARS,
    MAX_ATTEMPTS,
    BadClaim,
    Claim,
    Done,
    Progress,
    Read,
    Reply,
    Send,
    Wait,
    answered,
    claim_of,
    leads_on,
    local_time,
    make_msgid,
    next_step,
    read_reply,
    sending,
)
from resilgate.config import FailureBody
from resilgate.simulators.insurance import MSGID, PLATFORM_ERROR_MSG
from tests.insurance_calls import FIXMEDINS, envelope, settle_input

RULE = FailureBody(format="insurance_envelope")
ORIGINAL = f"{FIXMEDINS}202503200912000001"
RESOLVE_S = 30.0


def make_claim(**data: Any) -> Claim:
    return claim_of(envelope("2207", ORIGINAL, {**settle_input(236.50, "CB0001"), **data}), "/p")


CLAIM = make_claim()


def reply(body: dict[str, Any], status: int = 200) -> Read:
    return read_reply(Reply(status, orjson.dumps(body)), RULE)


def settled(
    *, medfee: float = 236.50, fund: float = 165.55, acct: float = 60.0, **info: Any
) -> Read:
    setlinfo = {
        "setl_id": "S250320000001",
        "mdtrt_id": "MD250320001",
        "psn_no": "TEST0001",
        "medfee_sumamt": medfee,
        "fund_pay_sumamt": fund,
        "acct_pay": acct,
        "psn_cash_pay": round(medfee - fund - acct, 2),
        **info,
    }
    return reply({"infcode": "0", "err_msg": None, "output": {"setlinfo": setlinfo}})


def refused(err_msg: str) -> Read:
    return reply({"infcode": "-1", "err_msg": err_msg, "output": {}})


PLATFORM_ERROR = refused(PLATFORM_ERROR_MSG)
TIMED_OUT = read_reply(Reply(why="upstream_timeout"), RULE)
NOT_SENT = read_reply(Reply(not_sent=True, why="upstream_unreachable"), RULE)


def send(progress: Progress, read: Read, now: float = 1000.0, msgid: str = "") -> Progress:
    """Take the next step, which must be a send, and record ``read`` as its answer."""
    step = next_step(progress, now, RESOLVE_S)
    assert isinstance(step, Send), step
    msgid = msgid or make_msgid(
        FIXMEDINS, local_time(now, 8), len(progress.attempts) + 1, 9000, 9999
    )
    return answered(sending(progress, step, msgid, now), CLAIM, read, now)


def fresh() -> Progress:
    return Progress(CLAIM.amount)


# --- The claim ----------------------------------------------------------------------------------


def test_a_claim_keeps_what_the_insurer_needs_and_survives_the_journal() -> None:
    original = envelope("2207", ORIGINAL, settle_input(236.5, "CB0001"))
    original["sign_no"] = "SN2025032000000001"
    claim = claim_of(original, "/fsi/api/callService")
    assert claim.amount == Decimal("236.50") and claim.fixmedins_code == FIXMEDINS
    assert "sign_no" not in claim.header  # a day's sign-in: stale by the time it is replayed
    assert claim.header["opter"] == "kiosk-07" and claim.data["chrg_bchno"] == "CB0001"
    assert Claim.from_payload(claim.to_payload()) == claim


def test_the_institution_code_comes_from_the_msgid_when_the_envelope_has_none() -> None:
    original = envelope("2207", ORIGINAL, settle_input(10, "CB1"))
    del original["fixmedins_code"]
    assert claim_of(original, "/p").fixmedins_code == FIXMEDINS


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"msgid": None}, "msgid"),
        ({"input": {"data": []}}, "input.data"),
        ({"input": {"data": {**settle_input(1, "CB1"), "chrg_bchno": ""}}}, "chrg_bchno"),
        ({"input": {"data": {**settle_input(1, "CB1"), "medfee_sumamt": "x"}}}, "amount"),
        ({"input": {"data": {**settle_input(1, "CB1"), "medfee_sumamt": -1}}}, "amount"),
        ({"input": {"data": {**settle_input(1, "CB1"), "medfee_sumamt": "NaN"}}}, "amount"),
        ({"input": {"data": {**settle_input(1, "CB1"), "medfee_sumamt": True}}}, "amount"),
        ({"fixmedins_code": "H31"}, "fixmedins_code"),
    ],
)
def test_an_envelope_without_what_the_insurer_needs_makes_no_claim(
    change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(BadClaim, match=reason):
        claim_of({**envelope("2207", ORIGINAL, settle_input(1, "CB1")), **change}, "/p")


def test_an_unreadable_payload_is_a_bad_claim() -> None:
    with pytest.raises(BadClaim):
        Claim.from_payload(b'{"msgid": "x"}')


@given(st.integers(min_value=1, max_value=10**9), st.integers(0, 9999), st.integers(0, 9999))
def test_msgids_are_30_characters_the_insurer_accepts_within_the_sequence_range(
    number: int, a: int, b: int
) -> None:
    first, last = min(a, b), max(a, b)
    msgid = make_msgid(FIXMEDINS, datetime(2025, 3, 20, 9, 12), number, first, last)
    assert MSGID.match(msgid) and len(msgid) == 30
    assert msgid.startswith(f"{FIXMEDINS}20250320091200")
    assert first <= int(msgid[-4:]) <= last


def test_consecutive_counter_values_give_distinct_msgids_in_the_same_second() -> None:
    at = datetime(2025, 3, 20, 9, 12)
    assert len({make_msgid(FIXMEDINS, at, n, 9000, 9999) for n in range(1, 1001)}) == 1000


def test_the_msgid_timestamp_is_the_insurers_wall_clock() -> None:
    assert f"{local_time(0.0, 8):%Y%m%d%H%M%S}" == "19700101080000"


# --- Reading answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (Reply(200, b'{"infcode": "0", "output": {}}'), "ok"),
        (Reply(200, b'{"infcode": 0, "output": {}}'), "ok"),
        (Reply(200, orjson.dumps({"infcode": "-1", "err_msg": "suspended"})), "refused"),
        (Reply(200, orjson.dumps({"infcode": "-1", "err_msg": PLATFORM_ERROR_MSG})), "not_applied"),
        (Reply(503, b"busy"), "not_applied"),
        (Reply(429, b""), "not_applied"),
        (Reply(401, b""), "not_applied"),
        (Reply(500, b""), "unknown"),  # a 500 or 504 may come after the commit
        (Reply(504, b""), "unknown"),
        (Reply(502, b""), "unknown"),
        (Reply(302, b""), "unknown"),
        (Reply(200, b"<html>"), "unknown"),
        (Reply(200, b'{"output": {}}'), "unknown"),
        (Reply(400, b'{"infcode": "-1", "err_msg": "not JSON"}'), "bad_request"),
        (Reply(why="upstream_timeout"), "unknown"),
        (Reply(why="upstream_broken"), "unknown"),
        (Reply(not_sent=True, why="no_endpoint_available"), "not_applied"),
    ],
)
def test_answers_are_read_as_done_refused_not_done_or_unknown(answer: Reply, verdict: str) -> None:
    assert read_reply(answer, RULE).verdict == verdict


# --- The state machine -------------------------------------------------------------------------


def test_a_new_claim_sends_a_2207_which_settles_it_with_the_refund_due() -> None:
    progress = send(fresh(), settled())
    assert progress.state == "settled" and progress.replay_state() == "applied"
    assert progress.settlement is not None
    assert progress.settlement.refund_due == Decimal("225.55")  # fund 165.55 + account 60
    assert isinstance(next_step(progress, 2000.0, RESOLVE_S), Done)
    detail = orjson.loads(progress.to_detail())
    assert detail["refund_due"] == 225.55 and detail["setl_id"] == "S250320000001"
    assert detail["attempts"][0]["infno"] == "2207" and detail["resolved_by"] == "2207"


def test_a_business_refusal_is_a_dead_letter_with_the_reason_but_not_the_person() -> None:
    progress = send(fresh(), refused("参保人待遇暂停 insurance of TEST0001 is suspended"))
    assert progress.state == "rejected" and progress.replay_state() == "failed"
    assert progress.reason == "参保人待遇暂停 insurance of *** is suspended"
    assert "TEST0001" not in progress.to_detail() and "MD250320001" not in progress.to_detail()


@pytest.mark.parametrize("read", [PLATFORM_ERROR, NOT_SENT, reply({}, 503)])
def test_nothing_applied_means_a_new_attempt_with_a_new_msgid_later(read: Read) -> None:
    progress = send(fresh(), read, msgid="A" * 30)
    assert progress.state == "submitting" and progress.replay_state() == "accepted"
    assert not leads_on(progress)  # the queue pauses before trying again
    progress = send(progress, settled(), msgid="B" * 30)
    assert [a.msgid for a in progress.attempts] == ["A" * 30, "B" * 30]
    assert progress.state == "settled"


@pytest.mark.parametrize("read", [TIMED_OUT, reply({}, 504), reply({}, 500)])
def test_a_2207_without_an_answer_is_unknown_and_waits_before_it_is_queried(read: Read) -> None:
    progress = send(fresh(), read, now=1000.0, msgid="U" * 30)
    assert progress.state == "unknown" and progress.unknown_msgid == "U" * 30
    assert progress.replay_state() == "accepted"
    assert next_step(progress, 1000.0 + RESOLVE_S - 0.1, RESOLVE_S) == Wait(1000.0 + RESOLVE_S)
    assert next_step(progress, 1000.0 + RESOLVE_S, RESOLVE_S) == Send("5203", "U" * 30)


def test_an_unknown_2207_the_query_finds_live_is_settled_by_the_query() -> None:
    progress = send(fresh(), TIMED_OUT, now=1000.0)
    progress = send(progress, settled(vali_flag="1", setl_state="settled"), now=1031.0)
    assert progress.state == "settled" and progress.resolved_by == "5203 query"
    assert [(a.infno, a.outcome) for a in progress.attempts] == [
        ("2207", "unknown"),
        ("5203", "settled"),
    ]


def test_an_unknown_2207_the_query_cannot_find_is_reversed_before_a_new_attempt() -> None:
    progress = send(fresh(), TIMED_OUT, now=1000.0, msgid="U" * 30)
    progress = send(progress, refused("结算信息不存在 no settlement for UUU"), now=1031.0)
    assert progress.state == "unknown" and progress.queried and leads_on(progress)
    assert next_step(progress, 1031.0, RESOLVE_S) == Send("2601", "U" * 30)
    progress = send(progress, refused("原交易不存在 no message UUU was received"), now=1031.0)
    assert progress.state == "submitting" and leads_on(progress)
    progress = send(progress, settled(), now=1031.0)
    assert [(a.infno, a.outcome) for a in progress.attempts] == [
        ("2207", "unknown"),
        ("5203", "not_found"),
        ("2601", "nothing_to_reverse"),
        ("2207", "settled"),
    ]


def test_a_late_commit_the_reversal_voids_leads_to_a_new_attempt() -> None:
    progress = send(fresh(), TIMED_OUT, now=1000.0)
    progress = send(progress, refused("结算信息不存在"), now=1031.0)
    progress = send(progress, reply({"infcode": "0", "output": {"data": {}}}), now=1031.0)
    assert progress.attempts[-1].outcome == "reversed" and progress.state == "submitting"


def test_a_query_showing_the_settlement_reversed_leads_to_a_new_attempt() -> None:
    progress = send(fresh(), TIMED_OUT, now=1000.0)
    progress = send(progress, settled(vali_flag="0", setl_state="reversed"), now=1031.0)
    assert progress.attempts[-1].outcome == "voided" and progress.state == "submitting"


@pytest.mark.parametrize(
    "read", [PLATFORM_ERROR, TIMED_OUT, NOT_SENT, reply({}, 503), reply({}, 404)]
)
def test_a_query_or_reversal_without_an_insurers_word_changes_nothing(read: Read) -> None:
    unknown = send(fresh(), TIMED_OUT, now=1000.0, msgid="U" * 30)
    progress = send(unknown, read, now=1031.0)
    assert progress.state == "unknown" and not leads_on(progress)
    assert next_step(progress, 1032.0, RESOLVE_S) == Send("5203", "U" * 30)
    reversing = send(unknown, refused("结算信息不存在"), now=1031.0)
    progress = send(reversing, read, now=1032.0)
    assert progress.state == "unknown" and not leads_on(progress)
    assert next_step(progress, 1033.0, RESOLVE_S) == Send("2601", "U" * 30)


@pytest.mark.parametrize(
    ("read", "why"),
    [
        (settled(mdtrt_id="MD999"), "another mdtrt_id"),
        (settled(psn_no="TEST0009"), "another psn_no"),
        (settled(medfee=99.0, fund=10.0, acct=0.0), "settled 99.00"),
    ],
)
def test_an_answer_about_another_visit_is_a_conflict_for_a_person(read: Read, why: str) -> None:
    progress = send(fresh(), read)
    assert progress.state == "conflict" and progress.replay_state() == "conflict"
    assert progress.reason is not None and why in progress.reason
    unknown = send(fresh(), TIMED_OUT, now=1000.0)
    assert send(unknown, read, now=1031.0).state == "conflict"


def test_a_success_without_a_settlement_in_it_is_unknown() -> None:
    progress = send(fresh(), reply({"infcode": "0", "output": {}}))
    assert progress.state == "unknown"


def test_a_send_recorded_but_never_answered_counts_as_unknown_after_a_crash() -> None:
    noted = sending(fresh(), Send("2207"), "S" * 30, 1000.0).to_detail()
    progress = Progress.from_detail(noted, CLAIM.amount).recovered()
    assert progress.state == "unknown" and progress.unknown_msgid == "S" * 30
    assert progress.unknown_since == 1000.0
    assert next_step(progress, 1031.0, RESOLVE_S) == Send("5203", "S" * 30)

    query = sending(progress, Send("5203", "S" * 30), "Q" * 30, 1031.0).to_detail()
    progress = Progress.from_detail(query, CLAIM.amount).recovered()
    assert progress.attempts[-1].outcome == "inconclusive"
    assert next_step(progress, 1032.0, RESOLVE_S) == Send("5203", "S" * 30)


@pytest.mark.parametrize(
    "detail", ["not json", "[]", '{"claim": "journal"}', '{"claim": "self-pay", "state": "x"}']
)
def test_an_unreadable_progress_record_is_refused(detail: str) -> None:
    with pytest.raises(ValueError, match="progress"):
        Progress.from_detail(detail, CLAIM.amount)


def test_a_weeks_long_outage_keeps_the_detail_short_and_readable() -> None:
    progress = fresh()
    long_error = refused(PLATFORM_ERROR_MSG + " " + "x" * 500)
    for n in range(200):
        progress = send(progress, long_error, msgid=f"{n:030d}")
    detail = progress.to_detail()
    assert len(detail) <= DETAIL_CHARS
    assert Progress.from_detail(detail, CLAIM.amount) == progress
    assert len(progress.attempts) == MAX_ATTEMPTS and progress.dropped == 200 - MAX_ATTEMPTS


READS = st.sampled_from(
    [
        settled(),
        settled(vali_flag="0", setl_state="reversed"),
        refused("参保人待遇暂停"),
        refused("结算信息不存在"),
        PLATFORM_ERROR,
        TIMED_OUT,
        NOT_SENT,
        reply({}, 500),
        reply({"infcode": "0", "output": {"data": {}}}),
    ]
)


@settings(max_examples=300)
@given(st.lists(st.tuples(READS, st.booleans(), st.floats(0, 60)), max_size=40))
def test_no_2207_is_sent_while_an_earlier_one_may_stand(
    script: list[tuple[Read, bool, float]],
) -> None:
    """Whatever the insurer answers, and wherever the replayer dies, a 2207 goes out only when
    every earlier 2207 is known not to stand; queries and reversals ask about that one."""
    progress, now, open_2207 = fresh(), 0.0, None
    for n, (read, crash, pause) in enumerate(script):
        now += pause
        step = next_step(progress, now, RESOLVE_S)
        if isinstance(step, Done):
            break
        if isinstance(step, Wait):
            assert progress.state == "unknown" and step.until > now
            continue
        if step.infno == "2207":
            assert open_2207 is None, "a 2207 while an earlier one may stand"
        else:
            assert step.about == open_2207 is not None
        msgid = f"{FIXMEDINS}20250320091200{n:04d}"
        noted = sending(progress, step, msgid, now)
        stored = Progress.from_detail(noted.to_detail(), CLAIM.amount)
        assert stored == noted
        if crash:  # died after recording the send: the next replayer reads the record
            progress = stored.recovered()
            open_2207 = msgid if step.infno == "2207" else open_2207
            continue
        progress = answered(noted, CLAIM, read, now)
        last = progress.attempts[-1].outcome
        if step.infno == "2207" and progress.state == "unknown":
            open_2207 = msgid
        if last in ("voided", "reversed", "nothing_to_reverse"):
            open_2207 = None
        assert re.fullmatch(r"\d{30}|[A-Za-z0-9]{30}", msgid)
        assert Progress.from_detail(progress.to_detail(), CLAIM.amount) == progress
