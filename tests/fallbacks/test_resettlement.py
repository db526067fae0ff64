"""The self-pay re-settlement state machine (DOMAIN.md 3.3), without I/O: what a claim holds,
how answers are read, and what is sent next. The rule above all: a 2207 that may have been
applied (the HIS's own included) is never followed by another 2207 until the insurer has said
it does not stand. Also: the configuration keeps every call within the replayer's lease."""

from __future__ import annotations

import re
import textwrap
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fallbacks.resettlement import (
    DETAIL_CHARS,
    MAX_ATTEMPTS,
    ORIGINAL,
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
from resilgate.config import ConfigError, FailureBody, SelfPayOptions, load_config
from resilgate.simulators.faults import WriteLog
from resilgate.simulators.insurance import MSGID, PLATFORM_ERROR_MSG, InsurancePlatform
from tests.insurance_calls import FIXMEDINS, envelope, settle_input

RULE = FailureBody(format="insurance_envelope")
HIS_MSGID = f"{FIXMEDINS}202503200912000001"  # the HIS's own 2207, behind every claim here
OPTIONS = SelfPayOptions()  # settle_timeout_s 20, resolve_after_s 30, max_inconclusive 5
TIMEOUT_S, RESOLVE_S = OPTIONS.settle_timeout_s, OPTIONS.resolve_after_s
CREATED = 1000.0  # when the claim was made


def make_claim(**data: Any) -> Claim:
    return claim_of(envelope("2207", HIS_MSGID, {**settle_input(236.50, "CB0001"), **data}), "/p")


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


def send(
    progress: Progress,
    read: Read,
    now: float = 1000.0,
    msgid: str = "",
    options: SelfPayOptions = OPTIONS,
) -> Progress:
    """Take the next step, which must be a send, and record ``read`` as its answer."""
    step = next_step(progress, now, options)
    assert isinstance(step, Send), step
    msgid = msgid or make_msgid(
        FIXMEDINS, local_time(now, 8), len(progress.attempts) + 1, 9000, 9999
    )
    return answered(sending(progress, step, msgid, now), CLAIM, read, now, options)


def new_claim() -> Progress:
    """A claim as it is made: unknown about the HIS's own 2207."""
    return Progress.start(CLAIM, CREATED, OPTIONS)


def fresh() -> Progress:
    """A claim whose HIS 2207 the insurer said does not stand: the next step is a 2207."""
    return Progress(CLAIM.amount)


def unknown_2207(msgid: str = "U" * 30) -> Progress:
    """A claim whose re-settlement 2207 timed out at 1000.0."""
    return send(fresh(), TIMED_OUT, now=1000.0, msgid=msgid)


# --- The claim ----------------------------------------------------------------------------------


def test_a_claim_keeps_what_the_insurer_needs_and_survives_the_journal() -> None:
    original = envelope("2207", HIS_MSGID, settle_input(236.5, "CB0001"))
    original["sign_no"] = "SN2025032000000001"
    claim = claim_of(original, "/fsi/api/callService")
    assert claim.amount == Decimal("236.50") and claim.fixmedins_code == FIXMEDINS
    assert "sign_no" not in claim.header  # a day's sign-in: stale by the time it is replayed
    assert claim.header["opter"] == "kiosk-07" and claim.data["chrg_bchno"] == "CB0001"
    assert Claim.from_payload(claim.to_payload()) == claim


def test_the_institution_code_comes_from_the_msgid_when_the_envelope_has_none() -> None:
    original = envelope("2207", HIS_MSGID, settle_input(10, "CB1"))
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
        claim_of({**envelope("2207", HIS_MSGID, settle_input(1, "CB1")), **change}, "/p")


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


def test_a_new_claim_is_unknown_about_the_his_2207_and_asks_once_its_call_is_over() -> None:
    """The engine also hands over a 2207 the insurer answered with a platform error, which
    may hide a commit: the HIS's msgid is the first unknown one, asked about before any 2207."""
    progress = new_claim()
    assert progress.state == "unknown" and progress.unknown_msgid == HIS_MSGID
    assert [(a.infno, a.msgid, a.outcome, a.why) for a in progress.attempts] == [
        ("2207", HIS_MSGID, "unknown", ORIGINAL)
    ]
    # Its call is over before the claim is made: settle_timeout_s, not resolve_after_s, later.
    ready = CREATED + TIMEOUT_S
    assert TIMEOUT_S < RESOLVE_S
    assert next_step(progress, ready - 0.1, OPTIONS) == Wait(ready)
    assert next_step(progress, ready, OPTIONS) == Send("5203", HIS_MSGID)
    assert Progress.from_detail(progress.to_detail(), CLAIM.amount) == progress


def test_a_his_2207_the_insurer_applied_settles_the_claim_with_no_new_2207() -> None:
    progress = send(new_claim(), settled(), now=CREATED + TIMEOUT_S)
    assert progress.state == "settled" and progress.resolved_by == "5203 query"
    assert progress.settlement is not None and progress.settlement.refund_due == Decimal("225.55")
    assert [(a.infno, a.outcome) for a in progress.attempts] == [
        ("2207", "unknown"),
        ("5203", "settled"),
    ]


def test_a_his_2207_the_insurer_never_got_is_reversed_then_sent_anew() -> None:
    at = CREATED + TIMEOUT_S
    progress = send(new_claim(), refused(f"结算信息不存在 no settlement for {HIS_MSGID}"), at)
    assert next_step(progress, at, OPTIONS) == Send("2601", HIS_MSGID)
    progress = send(progress, refused(f"原交易不存在 no message {HIS_MSGID} was received"), at)
    assert progress.state == "submitting" and next_step(progress, at, OPTIONS) == Send("2207")
    assert [a.about for a in progress.attempts] == ["", HIS_MSGID, HIS_MSGID]
    assert orjson.loads(progress.to_detail())["attempts"][1]["about"] == HIS_MSGID


def test_the_simulators_own_not_found_answers_count_as_not_found() -> None:
    """The default markers match what the insurance simulator says when nothing is there."""
    platform = InsurancePlatform(1, WriteLog())
    asked = 0

    def insurer(infno: str, about: str) -> Read:
        nonlocal asked
        asked += 1
        data = CLAIM.envelope(infno, "", local_time(CREATED, 8), about)  # type: ignore[arg-type]
        msgid = make_msgid(FIXMEDINS, local_time(CREATED, 8), asked, 9000, 9999)
        answer, _ = platform.handle({**data, "msgid": msgid})
        return reply(answer)

    at = CREATED + TIMEOUT_S
    progress = send(new_claim(), insurer("5203", HIS_MSGID), at)
    assert progress.attempts[-1].outcome == "not_found", progress.attempts[-1]
    progress = send(progress, insurer("2601", HIS_MSGID), at)
    assert progress.attempts[-1].outcome == "nothing_to_reverse", progress.attempts[-1]


INCONCLUSIVE = [
    refused("缺少必填字段 missing field input.data.setl_id or medins_setl_id"),
    refused("结算 S250320000001 不属于 TEST0001"),  # the person asked about: masked
    refused("签到信息无效 sign in first"),
    reply({"infcode": "-1", "err_msg": "bad envelope"}, 400),
]
EMPTY_SUCCESS = reply({"infcode": "0", "output": {}})  # for a 5203: no settlement in it


@pytest.mark.parametrize("read", [*INCONCLUSIVE, EMPTY_SUCCESS])
def test_a_query_answered_for_another_reason_leaves_the_2207_unknown(read: Read) -> None:
    query = send(new_claim(), read, now=CREATED + TIMEOUT_S)
    assert query.state == "unknown" and not leads_on(query) and query.inconclusive == 1
    assert query.attempts[-1].outcome == "inconclusive"
    assert next_step(query, CREATED + 100, OPTIONS) == Send("5203", HIS_MSGID)  # not a 2207


@pytest.mark.parametrize("read", INCONCLUSIVE)
def test_a_reversal_refused_for_another_reason_leaves_the_2207_unknown(read: Read) -> None:
    reversing = send(new_claim(), refused("结算信息不存在"), now=CREATED + TIMEOUT_S)
    reversal = send(reversing, read, now=CREATED + TIMEOUT_S)
    assert reversal.state == "unknown" and not leads_on(reversal)
    assert next_step(reversal, CREATED + 100, OPTIONS) == Send("2601", HIS_MSGID)


def test_inconclusive_answers_in_a_row_make_a_dead_letter_with_what_the_insurer_said() -> None:
    progress, now = new_claim(), CREATED + TIMEOUT_S
    answers = [INCONCLUSIVE[1], TIMED_OUT, INCONCLUSIVE[0], PLATFORM_ERROR, EMPTY_SUCCESS]
    answers += [INCONCLUSIVE[2], INCONCLUSIVE[1]]
    for read in answers:  # no answer at all neither counts nor breaks the row
        assert progress.state == "unknown"
        progress = send(progress, read, now=now)
        now += 5
    assert progress.state == "conflict" and progress.replay_state() == "conflict"
    assert progress.inconclusive == OPTIONS.max_inconclusive == 5
    assert progress.reason is not None and HIS_MSGID in progress.reason
    for said in ("不属于 ***", "missing field", "without a settlement", "sign in first"):
        assert said in progress.reason, progress.reason
    assert "TEST0001" not in progress.to_detail()  # the person stays out of it
    assert isinstance(next_step(progress, now, OPTIONS), Done)


def test_a_conclusive_answer_starts_the_count_again_and_no_answers_never_count() -> None:
    progress, now = new_claim(), CREATED + TIMEOUT_S
    for read in [INCONCLUSIVE[0]] * 4 + [refused("结算信息不存在")] + [INCONCLUSIVE[0]] * 4:
        progress = send(progress, read, now=now)
    assert progress.state == "unknown" and progress.inconclusive == 4 and progress.queried
    for read in [TIMED_OUT, PLATFORM_ERROR, NOT_SENT, reply({}, 503)] * 5:
        progress = send(progress, read, now=now)
    assert progress.state == "unknown" and progress.inconclusive == 4
    assert progress.attempts[-1].outcome == "no_answer"


def test_the_not_found_markers_are_the_configured_ones() -> None:
    options = SelfPayOptions(not_found_markers=["无此结算"], max_inconclusive=2)
    progress = Progress.start(CLAIM, CREATED, options)
    at = CREATED + TIMEOUT_S
    progress = send(progress, refused("结算信息不存在"), at, options=options)
    assert progress.attempts[-1].outcome == "inconclusive"
    progress = send(progress, refused("无此结算 NO SUCH settlement"), at, options=options)
    assert progress.attempts[-1].outcome == "not_found"
    progress = send(progress, refused("无此结算"), at, options=options)
    assert progress.state == "submitting"
    case_blind = SelfPayOptions(not_found_markers=["Not Found"])
    progress = send(Progress.start(CLAIM, CREATED, case_blind), refused("msgid NOT FOUND"), at)
    assert progress.attempts[-1].outcome == "not_found"


def test_a_claim_whose_his_2207_does_not_stand_sends_a_2207_which_settles_it() -> None:
    progress = send(fresh(), settled())
    assert progress.state == "settled" and progress.replay_state() == "applied"
    assert progress.settlement is not None
    assert progress.settlement.refund_due == Decimal("225.55")  # fund 165.55 + account 60
    assert isinstance(next_step(progress, 2000.0, OPTIONS), Done)
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
    assert next_step(progress, 1000.0 + RESOLVE_S - 0.1, OPTIONS) == Wait(1000.0 + RESOLVE_S)
    assert next_step(progress, 1000.0 + RESOLVE_S, OPTIONS) == Send("5203", "U" * 30)


def test_an_unknown_2207_the_query_finds_live_is_settled_by_the_query() -> None:
    progress = unknown_2207()
    progress = send(progress, settled(vali_flag="1", setl_state="settled"), now=1031.0)
    assert progress.state == "settled" and progress.resolved_by == "5203 query"
    assert [(a.infno, a.outcome) for a in progress.attempts] == [
        ("2207", "unknown"),
        ("5203", "settled"),
    ]


def test_an_unknown_2207_the_query_cannot_find_is_reversed_before_a_new_attempt() -> None:
    progress = unknown_2207()
    progress = send(progress, refused("结算信息不存在 no settlement for UUU"), now=1031.0)
    assert progress.state == "unknown" and progress.queried and leads_on(progress)
    assert next_step(progress, 1031.0, OPTIONS) == Send("2601", "U" * 30)
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
    progress = send(unknown_2207(), refused("结算信息不存在"), now=1031.0)
    progress = send(progress, reply({"infcode": "0", "output": {"data": {}}}), now=1031.0)
    assert progress.attempts[-1].outcome == "reversed" and progress.state == "submitting"


def test_a_query_showing_the_settlement_reversed_leads_to_a_new_attempt() -> None:
    progress = send(unknown_2207(), settled(vali_flag="0", setl_state="reversed"), now=1031.0)
    assert progress.attempts[-1].outcome == "voided" and progress.state == "submitting"


@pytest.mark.parametrize("read", [PLATFORM_ERROR, TIMED_OUT, NOT_SENT, reply({}, 503)])
def test_a_query_or_reversal_without_an_insurers_word_changes_nothing(read: Read) -> None:
    unknown = unknown_2207()
    progress = send(unknown, read, now=1031.0)
    assert progress.state == "unknown" and not leads_on(progress)
    assert progress.attempts[-1].outcome == "no_answer" and not progress.inconclusive
    assert next_step(progress, 1032.0, OPTIONS) == Send("5203", "U" * 30)
    reversing = send(unknown, refused("结算信息不存在"), now=1031.0)
    progress = send(reversing, read, now=1032.0)
    assert progress.state == "unknown" and not leads_on(progress)
    assert next_step(progress, 1033.0, OPTIONS) == Send("2601", "U" * 30)


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
    assert send(unknown_2207(), read, now=1031.0).state == "conflict"
    assert send(new_claim(), read, now=CREATED + TIMEOUT_S).state == "conflict"


def test_a_success_without_a_settlement_in_it_is_unknown() -> None:
    progress = send(fresh(), reply({"infcode": "0", "output": {}}))
    assert progress.state == "unknown"


def test_a_send_recorded_but_never_answered_is_unknown_from_the_end_of_its_timeout() -> None:
    noted = sending(fresh(), Send("2207"), "S" * 30, 1000.0).to_detail()
    progress = Progress.from_detail(noted, CLAIM.amount).recovered(OPTIONS)
    assert progress.state == "unknown" and progress.unknown_msgid == "S" * 30
    # The call may have run until its timeout; the insurer gets resolve_after_s from there.
    ended = 1000.0 + TIMEOUT_S
    assert progress.unknown_since == ended
    assert next_step(progress, ended + RESOLVE_S - 0.1, OPTIONS) == Wait(ended + RESOLVE_S)
    assert next_step(progress, ended + RESOLVE_S, OPTIONS) == Send("5203", "S" * 30)

    query = sending(progress, Send("5203", "S" * 30), "Q" * 30, 1051.0).to_detail()
    progress = Progress.from_detail(query, CLAIM.amount).recovered(OPTIONS)
    assert progress.attempts[-1].outcome == "no_answer" and not progress.inconclusive
    assert next_step(progress, 1052.0, OPTIONS) == Send("5203", "S" * 30)


def test_an_unknown_2207_recorded_before_ask_after_was_kept_still_waits() -> None:
    detail = orjson.loads(unknown_2207().to_detail())
    del detail["ask_after"]
    progress = Progress.from_detail(orjson.dumps(detail).decode(), CLAIM.amount)
    assert next_step(progress, 1000.0, OPTIONS) == Wait(1000.0 + RESOLVE_S)


@pytest.mark.parametrize(
    "detail",
    ["", "not json", "[]", '{"claim": "journal"}', '{"claim": "self-pay", "state": "x"}'],
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


def test_a_dead_letter_of_long_inconclusive_answers_keeps_the_detail_short() -> None:
    progress = new_claim()
    for n in range(OPTIONS.max_inconclusive):
        progress = send(progress, refused(f"规则 {n} " + "y" * 500), now=CREATED + TIMEOUT_S)
    assert progress.state == "conflict"
    detail = progress.to_detail()
    assert len(detail) <= DETAIL_CHARS
    assert Progress.from_detail(detail, CLAIM.amount) == progress


READS = st.sampled_from(
    [
        settled(),
        settled(vali_flag="0", setl_state="reversed"),
        refused("参保人待遇暂停"),
        refused("结算信息不存在"),
        refused("原交易不存在 no message"),
        *INCONCLUSIVE,
        EMPTY_SUCCESS,
        PLATFORM_ERROR,
        TIMED_OUT,
        NOT_SENT,
        reply({}, 500),
        reply({"infcode": "0", "output": {"data": {}}}),
    ]
)


def says_it_does_not_stand(infno: str, read: Read) -> bool:
    """The test's own reading of an answer about a 2207 (to it, or to a 5203 or 2601 about
    it): the insurer said it does not stand (not done, reversed or undone, never received)."""
    output = read.envelope.get("output") or {}
    voided = read.verdict == "ok" and (output.get("setlinfo") or {}).get("vali_flag") == "0"
    if infno == "2207":
        return voided or read.verdict in ("not_applied", "refused", "bad_request")
    if infno == "5203":
        return voided
    return read.verdict == "ok" or (read.verdict == "refused" and "不存在" in read.why)


@settings(max_examples=300)
@given(st.lists(st.tuples(READS, st.booleans(), st.floats(0, 60)), max_size=40))
def test_no_2207_is_sent_while_an_earlier_one_may_stand(
    script: list[tuple[Read, bool, float]],
) -> None:
    """Whatever the insurer answers (inconclusive answers included), and wherever the
    replayer dies, a 2207 goes out only when every earlier 2207, the HIS's own first, is known
    not to stand; queries and reversals ask about that one, only once its call is over."""
    progress, now = new_claim(), CREATED
    open_2207: str | None = HIS_MSGID
    over_at = CREATED  # when the open 2207's call was surely over
    for n, (read, crash, pause) in enumerate(script):
        now += pause
        step = next_step(progress, now, OPTIONS)
        if isinstance(step, Done):
            if progress.state in ("settled", "conflict"):
                break
            assert open_2207 is None, "rejected while an earlier 2207 may stand"
            break
        if isinstance(step, Wait):
            assert progress.state == "unknown" and step.until > now
            continue
        if step.infno == "2207":
            assert open_2207 is None, "a 2207 while an earlier one may stand"
        else:
            assert step.about == open_2207 is not None
            wait_s = TIMEOUT_S if open_2207 == HIS_MSGID else RESOLVE_S
            assert now >= over_at + wait_s, "asked while its 2207 may still be on its way"
        msgid = f"{FIXMEDINS}20250320091200{n:04d}"
        noted = sending(progress, step, msgid, now)
        stored = Progress.from_detail(noted.to_detail(), CLAIM.amount)
        assert stored == noted
        if crash:  # died after recording the send: the next replayer reads the record
            progress = stored.recovered(OPTIONS)
            if step.infno == "2207":
                open_2207, over_at = msgid, now + TIMEOUT_S
            continue
        progress = answered(noted, CLAIM, read, now, OPTIONS)
        if says_it_does_not_stand(step.infno, read):
            open_2207 = None
        elif step.infno == "2207":
            open_2207, over_at = msgid, now
        assert re.fullmatch(r"\d{30}|[A-Za-z0-9]{30}", msgid)
        assert Progress.from_detail(progress.to_detail(), CLAIM.amount) == progress


# --- The configuration keeps every call within the replayer's lease ------------------------------

MAIN = """\
upstreams:
  insurance:
    endpoints:
      - {name: primary, url: "http://127.0.0.1:9301", priority: 0}
routes:
  - name: insurance-settlement
    upstream: insurance
    fallback: FALLBACK
    match: {path: /fsi/api/callService, methods: [POST]}
fallbacks:
  self_pay: {settle_timeout_s: TIMEOUT}
  journal: {claim_lease_s: LEASE}
include_routes: []
"""


def write_main(tmp_path: Path, timeout_s: float, lease_s: float, fallback: str) -> Path:
    text = MAIN.replace("TIMEOUT", str(timeout_s)).replace("LEASE", str(lease_s))
    path = tmp_path / "resilgate.yaml"
    path.write_text(textwrap.dedent(text.replace("FALLBACK", fallback)))
    return path


@pytest.mark.parametrize(("timeout_s", "lease_s"), [(20, 30), (20, 40), (30, 30), (31, 30)])
def test_a_settle_timeout_of_half_the_claim_lease_or_more_is_refused(
    tmp_path: Path, timeout_s: float, lease_s: float
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_main(tmp_path, timeout_s, lease_s, "self-pay"))
    (problem,) = caught.value.problems
    assert problem.file.endswith("resilgate.yaml")
    assert "fallbacks.self_pay.settle_timeout_s" in problem.message
    assert "fallbacks.journal.claim_lease_s" in problem.message
    assert f"({float(timeout_s)}s)" in problem.message and f"({float(lease_s)}s)" in problem.message


def test_a_settle_timeout_under_half_the_lease_or_without_self_pay_is_fine(
    tmp_path: Path,
) -> None:
    assert load_config(write_main(tmp_path, 19.9, 40, "self-pay")).routes
    assert load_config(write_main(tmp_path, 20, 2, "notice")).routes  # no self-pay route
    defaults = load_config(write_main(tmp_path, OPTIONS.settle_timeout_s, 60, "self-pay"))
    assert defaults.fallbacks.self_pay == OPTIONS  # the defaults fit a 60 s lease
