"""Re-settlement of a self-pay claim (DOMAIN.md section 3.3): the claim, its progress and every
decision about it, without I/O.

A claim is what the insurer needs to settle a visit the patient paid in full while insurance
was down. Its progress, kept as the journal entry's ``detail``, moves like this:

- A new claim is ``unknown`` about the HIS's own 2207 (the claim's msgid): the gateway took it
  over when nothing was sent, but also after a platform error, which may hide a commit. So it
  is resolved like any unknown 2207, from ``settle_timeout_s`` after the claim was made.
- ``submitting``: send a 2207 with a fresh msgid, recorded before it is sent. Answered "0":
  ``settled`` (the patient gets back ``refund_due`` = fund + personal account share). Refused
  for a business reason: ``rejected``, a dead letter with the insurer's reason. Not applied
  (503, 429, a platform error, nothing sent): ``submitting`` again, with a fresh msgid.
  No answer (timeout, broken connection, another 5xx, an answer that cannot be read):
  ``unknown``.
- ``unknown``: that 2207 is never sent again, nor any other 2207 for the claim, until the
  insurer has said it does not stand. Once its call is over (or could be: ``settle_timeout_s``
  after a send whose answer was never recorded) and ``resolve_after_s`` has passed, 5203 by
  the msgid: a live settlement: ``settled``; reversed or undone: ``submitting``; "no such
  settlement" (a ``not_found_markers`` text): a 2601 reversal of the msgid (voids a late
  commit), and once it is done or answered "no such message", ``submitting``. Any other
  refusal, or a success without a settlement, is inconclusive and leaves it ``unknown``;
  ``max_inconclusive`` of them in a row make it a ``conflict`` with the insurer's answers.
  Timeouts and platform errors are no answer at all: the claim waits for the next turn.
- An answer about another visit or amount (a msgid collision) is a ``conflict`` for a person;
  so is a progress record that cannot be read (no one can tell what was sent).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Literal, get_args

import orjson

from resilgate.config import FailureBody, SelfPayOptions
from resilgate.failure_body import body_failure, infcode_is_success, short_text

ClaimState = Literal["submitting", "unknown", "settled", "rejected", "conflict"]
Infno = Literal["2207", "5203", "2601"]
ReplayState = Literal["accepted", "applied", "failed", "conflict"]

CENT = Decimal("0.01")
SENDING = "sending"  # recorded before the send; still there: the sender may have died
NO_ANSWER = "no_answer"  # a 5203 or 2601 without the insurer's word (timeout, platform error)
ORIGINAL = "the HIS's own 2207, answered self-pay"
# Outcomes after which the next step can follow at once (the others wait for the next turn).
LEADS_ON = frozenset({"not_found", "reversed", "nothing_to_reverse", "voided"})
MAX_ATTEMPTS = 6  # kept in the detail; older ones are only counted
DETAIL_CHARS = 1900  # the replayer keeps 2000 characters of a detail
REASON_CHARS = 160
ANSWERS_CHARS = 400  # the insurer's inconclusive answers, in a dead letter's reason
WHY_CHARS = 60
# Envelope header fields a re-settlement repeats; ``sign_no`` is left out: it is a day's.
HEADER_FIELDS = (
    "fixmedins_code",
    "fixmedins_name",
    "mdtrtarea_admvs",
    "insuplc_admdvs",
    "recer_sys_code",
    "dev_no",
    "dev_safe_info",
    "cainfo",
    "signtype",
    "infver",
    "opter_type",
    "opter",
    "opter_name",
)
REQUIRED_DATA = ("psn_no", "mdtrt_id", "chrg_bchno", "medfee_sumamt")
# Fields of ``input.data`` that name the person: never copied into a detail.
PERSONAL_FIELDS = ("psn_no", "mdtrt_cert_no", "certno", "psn_name", "card_sn", "mdtrt_id")
RETRY_LATER = frozenset({401, 407, 408, 425, 429, 503})  # "not now", nothing applied
_FIXMEDINS = re.compile(r"^[A-Za-z0-9]{12}$")


class BadClaim(ValueError):
    """An envelope a claim cannot be made from; the message says why."""


def amount_of(value: Any) -> Decimal:
    """A money amount of an envelope in cents; ``BadClaim`` if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadClaim("medfee_sumamt must be an amount")
    try:
        amount = Decimal(str(value)).quantize(CENT, ROUND_HALF_UP)
    except InvalidOperation:
        raise BadClaim("medfee_sumamt must be an amount") from None
    if not amount.is_finite() or amount < 0:
        raise BadClaim("medfee_sumamt must be an amount of 0 or more")
    return amount


def money(value: Decimal) -> float:
    """An amount as the platform writes it: a JSON number with two decimals."""
    return float(value.quantize(CENT, ROUND_HALF_UP))


def redact(text: str, identifiers: list[str]) -> str:
    """``text`` with every occurrence of ``identifiers`` masked."""
    for identifier in sorted(identifiers, key=len, reverse=True):
        text = text.replace(identifier, "***")
    return text


def local_time(epoch_s: float, utc_offset_hours: float) -> datetime:
    """The insurer's wall clock at ``epoch_s``."""
    zone = timezone(timedelta(hours=utc_offset_hours))
    return datetime.fromtimestamp(epoch_s, zone)


def make_msgid(fixmedins: str, at: datetime, number: int, first: int, last: int) -> str:
    """A 30-character msgid: institution code, ``at`` to the second, and a 4-digit sequence
    made of ``number`` (a fleet-wide counter, from 1) within ``first``..``last``."""
    sequence = first + (number - 1) % (last - first + 1)
    return f"{fixmedins}{at:%Y%m%d%H%M%S}{sequence:04d}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A 2207 the insurer could not take: everything needed to settle it later."""

    msgid: str  # of the original 2207, for the record
    path: str  # where the envelope was posted
    header: dict[str, Any]
    data: dict[str, Any]  # the original ``input.data``, as sent
    amount: Decimal

    @property
    def fixmedins_code(self) -> str:
        code = self.header.get("fixmedins_code")
        return code if isinstance(code, str) and code else self.msgid[:12]

    def identifiers(self) -> list[str]:
        """The values that name the person or visit, to keep out of details."""
        found = (self.data.get(name) for name in PERSONAL_FIELDS)
        return [str(value) for value in found if isinstance(value, str | int) and str(value)]

    def envelope(self, infno: Infno, msgid: str, at: datetime, about: str | None) -> dict[str, Any]:
        """The envelope of one re-settlement call made at ``at``; ``about`` is the msgid of
        the unknown 2207 that a 5203 or 2601 asks about."""
        person = {k: self.data[k] for k in ("psn_no",) if k in self.data}
        if infno == "2207":
            data = dict(self.data)
        elif infno == "5203":
            visit = {k: self.data[k] for k in ("mdtrt_id",) if k in self.data}
            data = {**person, **visit, "medins_setl_id": about}
        else:
            data = {**person, "omsgid": about, "oinfno": "2207"}
        return {
            "infno": infno,
            "msgid": msgid,
            "inf_time": f"{at:%Y-%m-%d %H:%M:%S}",
            **self.header,
            "input": {"data": data},
        }

    def to_payload(self) -> bytes:
        return orjson.dumps(
            {
                "kind": "self-pay-claim",
                "msgid": self.msgid,
                "path": self.path,
                "header": self.header,
                "data": self.data,
                "amount": str(self.amount),
            }
        )

    @classmethod
    def from_payload(cls, raw: bytes) -> Claim:
        try:
            stored = orjson.loads(raw)
            return cls(
                stored["msgid"],
                stored["path"],
                dict(stored["header"]),
                dict(stored["data"]),
                amount_of(stored["amount"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BadClaim(f"unreadable claim: {type(exc).__name__}") from None


def data_of(envelope: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``input.data`` of an envelope, if it has one."""
    inp = envelope.get("input")
    data = inp.get("data") if isinstance(inp, Mapping) else None
    return data if isinstance(data, Mapping) else None


def claim_of(envelope: Mapping[str, Any], path: str) -> Claim:
    """The claim of a settlement envelope (2206 or 2207); ``BadClaim`` if it lacks something
    the insurer needs."""
    msgid = envelope.get("msgid")
    if not isinstance(msgid, str) or not msgid:
        raise BadClaim("msgid is missing")
    data = data_of(envelope)
    if data is None:
        raise BadClaim("input.data is missing")
    for name in REQUIRED_DATA:
        if data.get(name) in (None, ""):
            raise BadClaim(f"input.data.{name} is missing")
    amount = amount_of(data["medfee_sumamt"])
    header = {name: envelope[name] for name in HEADER_FIELDS if envelope.get(name) is not None}
    claim = Claim(msgid, path, header, dict(data), amount)
    if not _FIXMEDINS.match(claim.fixmedins_code):
        raise BadClaim("fixmedins_code must be the institution's 12-character code")
    return claim


# --- What came back -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """What one sent envelope got: an HTTP answer, or why none came."""

    status: int = 0  # 0: no answer
    body: bytes = b""
    not_sent: bool = False  # nothing reached the insurer (unreachable, no endpoint)
    why: str = ""  # why there is no answer


Verdict = Literal["ok", "refused", "bad_request", "not_applied", "unknown"]


@dataclass(frozen=True, slots=True)
class Read:
    """A reply as the state machine needs it."""

    verdict: Verdict
    envelope: dict[str, Any]
    why: str


def read_reply(reply: Reply, rule: FailureBody | None) -> Read:
    """``ok`` (infcode 0), ``refused`` (the insurer's business answer), ``bad_request`` (a
    4xx: refused before the insurer's logic), ``not_applied`` (nothing was done: not sent,
    401/407/408/425/429/503, a platform error) or ``unknown`` (it may have been done: no
    answer, another 5xx, an answer that cannot be read)."""
    if reply.status == 0:
        verdict: Verdict = "not_applied" if reply.not_sent else "unknown"
        return Read(verdict, {}, ("not sent: " if reply.not_sent else "no answer: ") + reply.why)
    status = f"status {reply.status}"
    if reply.status in RETRY_LATER:
        return Read("not_applied", {}, status)
    if reply.status >= 500 or reply.status < 200 or 300 <= reply.status < 400:
        return Read("unknown", {}, status)
    try:
        document = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        document = None
    if 400 <= reply.status < 500:
        reason = _err_msg(document) or "no reason given"
        return Read("bad_request", {}, f"{status}: {reason}")
    if not isinstance(document, dict) or "infcode" not in document:
        return Read("unknown", {}, f"{status}, not an envelope")
    failure = body_failure(rule, reply.status, reply.body)
    if failure is not None:
        return Read("not_applied", document, f"platform error: {failure}")
    if infcode_is_success(document["infcode"]):
        return Read("ok", document, "")
    return Read("refused", document, _err_msg(document) or f"infcode {document['infcode']}")


def _err_msg(document: Any) -> str:
    if isinstance(document, dict):
        for name in ("err_msg", "error", "message"):
            if isinstance(document.get(name), str) and document[name]:
                return str(document[name])
    return ""


@dataclass(frozen=True, slots=True)
class Settlement:
    """A settlement the insurer holds for a claim, as its 2207 or 5203 answer reads."""

    setl_id: str
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal
    acct_pay: Decimal
    psn_cash_pay: Decimal
    live: bool

    @property
    def refund_due(self) -> Decimal:
        """What the patient, who paid everything, gets back."""
        return self.fund_pay_sumamt + self.acct_pay


def settlement_in(envelope: Mapping[str, Any], claim: Claim) -> Settlement | str | None:
    """The settlement in an answer's ``output.setlinfo``; a reason text if it is about another
    visit or amount (a conflict); None if there is none to read."""
    output = envelope.get("output")
    info = output.get("setlinfo") if isinstance(output, Mapping) else None
    if not isinstance(info, Mapping) or not isinstance(info.get("setl_id"), str | int):
        return None
    for name in ("psn_no", "mdtrt_id"):
        ours, theirs = claim.data.get(name), info.get(name)
        if ours not in (None, "") and theirs not in (None, "") and str(ours) != str(theirs):
            return f"the insurer answered about another {name}: check the msgid by hand"
    try:
        medfee, fund, acct, cash = (
            amount_of(info.get(name, 0))
            for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
        )
    except BadClaim:
        return None
    if medfee != claim.amount:
        return f"the insurer settled {medfee}, the claim is for {claim.amount}"
    live = str(info.get("vali_flag", "1")) == "1" and info.get("setl_state") in (None, "settled")
    return Settlement(str(info["setl_id"]), medfee, fund, acct, cash, live)


# --- Progress ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One envelope sent for a claim."""

    infno: Infno
    msgid: str
    sent_at: float
    outcome: str = SENDING
    why: str = ""
    about: str = ""  # of a 5203 or 2601: the msgid of the 2207 it asks about

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "infno": self.infno,
            "msgid": self.msgid,
            "sent_at": round(self.sent_at, 3),
            "outcome": self.outcome,
        }
        if self.about:
            data["about"] = self.about
        if self.why:
            data["why"] = self.why
        return data


@dataclass(frozen=True, slots=True)
class Send:
    """Next: send this transaction (``about``: the unknown 2207's msgid)."""

    infno: Infno
    about: str | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Next: nothing before ``until`` (an unknown 2207 is given time to show up)."""

    until: float


@dataclass(frozen=True, slots=True)
class Done:
    """The claim is finished."""


Step = Send | Wait | Done


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a claim's re-settlement stands; kept as its journal entry's ``detail``."""

    amount: Decimal
    state: ClaimState = "submitting"
    attempts: tuple[Attempt, ...] = ()
    dropped: int = 0  # attempts older than the ones kept
    unknown_msgid: str | None = None
    unknown_since: float | None = None
    queried: bool = False  # 5203 found nothing for ``unknown_msgid``: reverse it next
    settlement: Settlement | None = None
    resolved_by: str | None = None
    reason: str | None = None
    ask_after: float | None = None  # no 5203 about ``unknown_msgid`` before this
    inconclusive: int = 0  # insurer answers in a row that said nothing about it

    def __repr__(self) -> str:
        last = self.attempts[-1] if self.attempts else None
        tried = f"{last.infno} {last.outcome}" if last else "nothing sent"
        return f"<Progress {self.state} {self.dropped + len(self.attempts)} attempts, {tried}>"

    @classmethod
    def start(cls, claim: Claim, created_at: float, options: SelfPayOptions) -> Progress:
        """A new claim: the HIS's own 2207 may stand (a platform error can hide a commit), so
        it is the unknown one, first queried once its call is surely over."""
        since = round(created_at, 3)
        original = Attempt("2207", claim.msgid, since, "unknown", ORIGINAL)
        return cls(
            claim.amount,
            "unknown",
            (original,),
            unknown_msgid=claim.msgid,
            unknown_since=since,
            ask_after=round(created_at + options.settle_timeout_s, 3),
        )

    @property
    def finished(self) -> bool:
        return self.state in ("settled", "rejected", "conflict")

    def replay_state(self) -> ReplayState:
        """How the journal entry ends: settled applied, rejected failed, conflict a conflict;
        anything else is handed back for later."""
        match self.state:
            case "settled":
                return "applied"
            case "rejected":
                return "failed"
            case "conflict":
                return "conflict"
        return "accepted"

    def to_detail(self) -> str:
        """JSON for ``detail`` (and the ticket page), under ``DETAIL_CHARS`` characters."""
        progress = self
        while True:
            text = orjson.dumps(progress._json()).decode()
            if len(text) <= DETAIL_CHARS or len(progress.attempts) <= 2:
                return text  # two attempts and a short reason always fit
            progress = _keep(progress, len(progress.attempts) - 1)

    def _json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "claim": "self-pay",
            "state": self.state,
            "amount": money(self.amount),
            "attempts": [a.to_json() for a in self.attempts],
        }
        if self.dropped:
            data["attempts_dropped"] = self.dropped
        if self.unknown_msgid is not None:
            data["unknown_msgid"] = self.unknown_msgid
            data["unknown_since"] = round(self.unknown_since or 0.0, 3)
            if self.ask_after is not None:
                data["ask_after"] = round(self.ask_after, 3)
            data["queried"] = self.queried
        if self.inconclusive:
            data["inconclusive"] = self.inconclusive
        if self.settlement is not None:
            s = self.settlement
            data.update(
                setl_id=s.setl_id,
                medfee_sumamt=money(s.medfee_sumamt),
                fund_pay_sumamt=money(s.fund_pay_sumamt),
                acct_pay=money(s.acct_pay),
                psn_cash_pay=money(s.psn_cash_pay),
                refund_due=money(s.refund_due),
            )
        if self.resolved_by is not None:
            data["resolved_by"] = self.resolved_by
        if self.reason is not None:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_detail(cls, text: str, amount: Decimal) -> Progress:
        """The progress a detail records; ValueError if there is none or it is unreadable (a
        new claim has none: :meth:`start` it)."""
        try:
            data = orjson.loads(text)
            states = get_args(ClaimState)
            if data.get("claim") != "self-pay" or data["state"] not in states:
                raise ValueError("not a self-pay claim's progress")
            attempts = tuple(
                Attempt(
                    a["infno"],
                    a["msgid"],
                    float(a["sent_at"]),
                    a["outcome"],
                    a.get("why", ""),
                    a.get("about", ""),
                )
                for a in data["attempts"]
            )
            if any(a.infno not in get_args(Infno) for a in attempts):
                raise ValueError("an attempt of an unknown transaction")
            settlement = None
            if "setl_id" in data:
                medfee, fund, acct, cash = (
                    amount_of(data[name])
                    for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
                )
                settlement = Settlement(str(data["setl_id"]), medfee, fund, acct, cash, True)
            since, ask_after = data.get("unknown_since"), data.get("ask_after")
            return cls(
                amount,
                data["state"],
                attempts,
                int(data.get("attempts_dropped", 0)),
                data.get("unknown_msgid"),
                None if since is None else float(since),
                bool(data.get("queried", False)),
                settlement,
                data.get("resolved_by"),
                data.get("reason"),
                None if ask_after is None else float(ask_after),
                int(data.get("inconclusive", 0)),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable progress: {type(exc).__name__}") from None

    def recovered(self, options: SelfPayOptions) -> Progress:
        """After a replayer stopped between recording a send and recording its answer: a 2207
        may have been sent, and its call may have run until its timeout: ``unknown`` from then;
        a 5203 or 2601 got no answer."""
        if not self.attempts or self.attempts[-1].outcome != SENDING:
            return self
        last = self.attempts[-1]
        if last.infno == "2207":
            ended = last.sent_at + options.settle_timeout_s
            return _unknown(self, "unknown", "no answer recorded", ended, options)
        return _answer(self, NO_ANSWER, "no answer recorded")


def next_step(progress: Progress, now: float, options: SelfPayOptions) -> Step:
    """What to do for a claim now."""
    progress = progress.recovered(options)
    if progress.finished:
        return Done()
    if progress.state == "submitting":
        return Send("2207")
    ready = progress.ask_after
    if ready is None:  # a record made before ``ask_after`` was kept
        since = progress.unknown_since if progress.unknown_since is not None else now
        ready = since + options.resolve_after_s
    if now < ready:
        return Wait(ready)
    return Send("2601" if progress.queried else "5203", progress.unknown_msgid)


def sending(progress: Progress, step: Send, msgid: str, now: float) -> Progress:
    """``progress`` with ``msgid`` recorded as being sent for ``step``: store this first."""
    attempt = Attempt(step.infno, msgid, round(now, 3), about=step.about or "")
    attempts = (*progress.attempts, attempt)
    return _keep(replace(progress, attempts=attempts), MAX_ATTEMPTS)


def answered(
    progress: Progress, claim: Claim, read: Read, now: float, options: SelfPayOptions
) -> Progress:
    """``progress`` once the attempt being sent got ``read``."""
    last = progress.attempts[-1]
    if last.outcome != SENDING:
        raise ValueError(f"no attempt is being sent: {progress!r}")
    why = short_text(redact(read.why, claim.identifiers()), WHY_CHARS) if read.why else ""
    match last.infno, read.verdict:
        case "2207", "ok":
            return _settled_by(progress, claim, read, "2207", why, now, options)
        case "2207", "refused" | "bad_request":
            reason = short_text(redact(read.why, claim.identifiers()), REASON_CHARS)
            return replace(_answer(progress, "rejected"), state="rejected", reason=reason)
        case "2207", "not_applied":
            return _answer(progress, "not_applied", why)
        case "2207", _:
            return _unknown(progress, "unknown", why, now, options)
        case "5203", "ok":
            return _settled_by(progress, claim, read, "5203 query", why, now, options)
        case "5203", "refused" if says_not_found(read, options):
            return replace(_answer(progress, "not_found", why), queried=True, inconclusive=0)
        case "2601", "ok":
            return _resubmit(_answer(progress, "reversed"))
        case "2601", "refused" if says_not_found(read, options):
            return _resubmit(_answer(progress, "nothing_to_reverse", why))
        case _, "refused" | "bad_request":
            return _inconclusive(progress, why, options)
    return _answer(progress, NO_ANSWER, why)


def says_not_found(read: Read, options: SelfPayOptions) -> bool:
    """Whether a refusal says there is no such settlement or message (``not_found_markers``)."""
    text = read.why.casefold()
    return any(marker.casefold() in text for marker in options.not_found_markers if marker)


def leads_on(progress: Progress) -> bool:
    """Whether the next step may follow at once: the last answer moved the claim along
    (rather than asking to wait, or to try again later)."""
    last = progress.attempts[-1] if progress.attempts else None
    return not progress.finished and last is not None and last.outcome in LEADS_ON


def _settled_by(
    progress: Progress,
    claim: Claim,
    read: Read,
    resolved_by: str,
    why: str,
    now: float,
    options: SelfPayOptions,
) -> Progress:
    found = settlement_in(read.envelope, claim)
    if isinstance(found, str):
        return replace(_answer(progress, "conflict"), state="conflict", reason=found)
    if found is None:  # an answer "0" without a settlement in it: ask again later
        if progress.attempts[-1].infno == "2207":
            return _unknown(progress, "unknown", "success without a settlement", now, options)
        return _inconclusive(progress, "success without a settlement", options)
    if not found.live:  # reversed or undone: nothing stands for the claim
        return _resubmit(_answer(progress, "voided", why))
    settled = _answer(progress, "settled")
    return replace(settled, state="settled", settlement=found, resolved_by=resolved_by)


def _answer(progress: Progress, outcome: str, why: str = "") -> Progress:
    """The attempt being sent, answered with ``outcome``."""
    last = replace(progress.attempts[-1], outcome=outcome, why=why)
    return replace(progress, attempts=(*progress.attempts[:-1], last))


def _unknown(
    progress: Progress, outcome: str, why: str, ended: float, options: SelfPayOptions
) -> Progress:
    """The 2207 being sent may stand; its call was over (or timed out) at ``ended``."""
    return replace(
        _answer(progress, outcome, why),
        state="unknown",
        unknown_msgid=progress.attempts[-1].msgid,
        unknown_since=round(ended, 3),
        ask_after=round(ended + options.resolve_after_s, 3),
        queried=False,
        inconclusive=0,
    )


def _inconclusive(progress: Progress, why: str, options: SelfPayOptions) -> Progress:
    """The insurer answered, but not whether the unknown 2207 stands: it stays unknown, and
    after ``max_inconclusive`` such answers in a row it is a person's to find out."""
    answered_ = _answer(progress, "inconclusive", why)
    count = progress.inconclusive + 1
    if count < options.max_inconclusive:
        return replace(answered_, inconclusive=count)
    said: list[str] = []  # what it said since the last conclusive answer, oldest first
    for attempt in reversed(answered_.attempts):
        if attempt.outcome not in ("inconclusive", NO_ANSWER):
            break
        text = f"{attempt.infno}: {attempt.why or 'no reason given'}"
        if attempt.outcome == "inconclusive" and text not in said:
            said.insert(0, text)
    reason = (
        f"{count} answers in a row did not say whether 2207 {progress.unknown_msgid} stands; "
        f"ask the insurer before settling by hand. It said: {' | '.join(said)}"
    )
    return replace(
        answered_, state="conflict", inconclusive=count, reason=short_text(reason, ANSWERS_CHARS)
    )


def _resubmit(progress: Progress) -> Progress:
    """The unknown 2207 is settled as not standing: a new attempt may go."""
    return replace(
        progress,
        state="submitting",
        unknown_msgid=None,
        unknown_since=None,
        ask_after=None,
        queried=False,
        inconclusive=0,
    )


def _keep(progress: Progress, most: int) -> Progress:
    extra = max(0, len(progress.attempts) - most)
    if not extra:
        return progress
    return replace(progress, attempts=progress.attempts[extra:], dropped=progress.dropped + extra)
