"""``self-pay``: insurance settlement is down: the patient pays in full now, the claim is
re-settled later (DOMAIN.md sections 3.2, 3.3).

Answers keep the insurer's envelope, so a charging system acts on them as on the platform's:

- 2207 settlement: ``infcode`` "0" with ``output.setlinfo`` saying the full amount is the
  patient's (``psn_cash_pay`` = ``medfee_sumamt``, fund and account 0, ``setl_id`` null). The
  claim is journaled durably first; the claim id, its status URL and the bilingual notice are
  in the envelope's ``resilgate`` section (``warn_msg`` carries the notice too). No claim, no
  self-pay answer: if the journal cannot take it, the notice answers 503.
- 2206 trial: the same answer without a claim (a trial commits nothing).
- 1101 person info: eligibility unknown, pay self-pay: ``baseinfo`` with the ``psn_no`` asked
  about, ``insuinfo`` empty.
- Anything else (2208, 2601, 5203, 2001, 9001): no answer here, the notice answers.

Once insurance takes writes again, ``replay`` re-settles each claim in order (see
:mod:`fallbacks.resettlement` for the state machine); its ticket shows the outcome and the
refund due. A replay starts a call only if its timeout ends within the first half of the
replayer's lease on the claim (the config requires ``settle_timeout_s`` under that half), so
no other replayer can take the claim while a call of it is under way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from fallbacks.resettlement import (
    BadClaim,
    Claim,
    Progress,
    Reply,
    Send,
    answered,
    claim_of,
    data_of,
    leads_on,
    local_time,
    make_msgid,
    money,
    next_step,
    read_reply,
    sending,
)
from resilgate.config import SelfPayOptions
from resilgate.errors import NoEndpoint, UpstreamError, UpstreamUnreachable
from resilgate.fallback import (
    TICKETS_PATH,
    Fallback,
    FallbackRequest,
    FallbackServices,
    Replayed,
    degraded,
)
from resilgate.logs import get_logger
from resilgate.state.records import JournalEntry
from resilgate.state.store import StoreUnavailable

log = get_logger("fallbacks.self_pay")

MSGID_SCOPE = "self-pay:msgid"  # the fleet-wide counter behind re-settlement msgids
MAX_SENDS = 4  # per turn: a query, a reversal, a new 2207, and one to spare
# A turn's calls end within this share of the lease; the rest covers the time between the
# claim and the turn, the store's writes and clocks that differ between replicas.
LEASE_SHARE = 0.5
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class _Turn:
    """One replay of a claim: the progress the store holds, and when its calls must end."""

    stored: Progress
    deadline: float


class SelfPay(Fallback):
    """Answers settlements with self-pay and re-settles them later; see the module doc."""

    name = "self-pay"
    journals = True

    def __init__(self, services: FallbackServices) -> None:
        super().__init__(services)
        self._routes = {route.name: route for route in services.config.routes}

    @property
    def options(self) -> SelfPayOptions:
        return self.services.config.fallbacks.self_pay

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        envelope = _envelope_of(request.body)
        if envelope is None:
            return self._refuse(request, None, "the body is not an insurance envelope")
        match envelope.get("infno"):
            case "2207":
                return await self._claim(request, envelope)
            case "2206":
                try:
                    claim = claim_of(envelope, request.path)
                except BadClaim as exc:
                    return self._refuse(request, envelope, str(exc))
                body = self_pay_answer(envelope, claim, None, self.options, self.services.clock())
                return degraded(self.name, 200, body, request.request_id)
            case "1101":
                body = eligibility_unknown(envelope, self.options, self.services.clock())
                return degraded(self.name, 200, body, request.request_id)
        return None

    async def _claim(
        self, request: FallbackRequest, envelope: Mapping[str, Any]
    ) -> web.StreamResponse | None:
        try:
            claim = claim_of(envelope, request.path)
        except BadClaim as exc:
            return self._refuse(request, envelope, str(exc))
        claim_id = self.services.new_ticket("C")
        try:
            await self.services.journal(request, claim_id, claim.to_payload())
        except StoreUnavailable:
            return None  # a self-pay answer promises a later refund: only for a stored claim
        body = self_pay_answer(envelope, claim, claim_id, self.options, self.services.clock())
        return degraded(self.name, 200, body, request.request_id)

    def _refuse(
        self, request: FallbackRequest, envelope: Mapping[str, Any] | None, reason: str
    ) -> web.Response:
        log.info(
            "self_pay_refused", route=request.route.name, request_id=request.request_id, why=reason
        )
        msgid = envelope.get("msgid") if envelope is not None else None
        body = {
            "infcode": "-1",
            "inf_refmsgid": msgid if isinstance(msgid, str) else None,
            "err_msg": f"无法自费结算 cannot take a self-pay settlement: {reason}",
            "output": {},
            "resilgate": {"degraded": self.name, "pay": None, "reason": reason},
        }
        return degraded(self.name, 400, body, request.request_id)

    async def replay(self, entry: JournalEntry) -> Replayed:
        """Take one claim as far as it can go now (see :mod:`fallbacks.resettlement`); every
        msgid is recorded before it is sent."""
        try:
            claim = Claim.from_payload(entry.payload)
        except BadClaim as exc:
            return Replayed("failed", _dumps({"claim": "self-pay", "reason": str(exc)}))
        options = self.options
        try:
            if entry.detail:
                progress = Progress.from_detail(entry.detail, claim.amount).recovered(options)
            else:
                progress = Progress.start(claim, entry.created_at, options)
        except ValueError as exc:
            reason = f"{exc}: ask the insurer (5203) before settling by hand"
            return Replayed("conflict", _dumps({"claim": "self-pay", "reason": reason}))
        lease_s = self.services.config.fallbacks.journal.claim_lease_s
        turn = _Turn(progress, self.services.clock() + lease_s * LEASE_SHARE)
        try:
            progress = await self._advance(entry, claim, turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "self_pay_replay_failed",
                ticket=entry.ticket,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )
            # Hand back what the store holds: a send it recorded must stay recorded.
            return Replayed("accepted", turn.stored.to_detail())
        if progress.finished:
            log.info("self_pay_claim_finished", ticket=entry.ticket, state=progress.state)
        return Replayed(progress.replay_state(), progress.to_detail())

    async def _advance(self, entry: JournalEntry, claim: Claim, turn: _Turn) -> Progress:
        """Send what the claim needs next, while each answer leads on and the lease lasts."""
        options, services = self.options, self.services
        route = self._routes.get(entry.route)
        rule = route.failure_body if route is not None else None
        progress = turn.stored
        for _ in range(MAX_SENDS):
            step = next_step(progress, services.clock(), options)
            if not isinstance(step, Send) or not self._in_time(turn):
                break  # nothing to send now, or the next turn sends it under a fresh lease
            number = await services.store.take_block(MSGID_SCOPE, 1)
            now = services.clock()
            at = local_time(now, options.utc_offset_hours)
            first, last = options.msgid_sequence_from, options.msgid_sequence_to
            msgid = make_msgid(claim.fixmedins_code, at, number, first, last)
            noted = sending(progress, step, msgid, now)
            if not await services.store.journal_note(
                entry.ticket, services.replica, noted.to_detail()
            ):
                log.warning("self_pay_lease_lost", ticket=entry.ticket, infno=step.infno)
                return turn.stored
            turn.stored = noted
            # The call ends by its recorded start + settle_timeout_s (what recovery assumes),
            # and so within the turn's share of the lease.
            ends = noted.attempts[-1].sent_at + options.settle_timeout_s
            timeout_s = ends - services.clock()
            if ends > turn.deadline or timeout_s <= 0:  # the store was slow: too late now
                log.info("self_pay_call_deferred", ticket=entry.ticket, infno=step.infno)
                return progress  # never sent: the record goes back to what it was
            envelope = claim.envelope(step.infno, msgid, at, step.about)
            reply = await self._send(entry.queue, claim.path, envelope, timeout_s)
            read = read_reply(reply, rule)
            progress = answered(noted, claim, read, services.clock(), options)
            log.info(
                "self_pay_attempt",
                ticket=entry.ticket,
                infno=step.infno,
                outcome=progress.attempts[-1].outcome,
                state=progress.state,
            )
            if not leads_on(progress):
                break
        return progress

    def _in_time(self, turn: _Turn) -> bool:
        """Whether a call started now ends (times out at the latest) by the turn's deadline."""
        return self.services.clock() + self.options.settle_timeout_s <= turn.deadline

    async def _send(
        self, queue: str, path: str, envelope: dict[str, Any], timeout_s: float
    ) -> Reply:
        try:
            answer = await self.services.client.send(
                queue,
                "POST",
                path,
                headers=JSON_HEADERS,
                body=orjson.dumps(envelope),
                timeout_s=timeout_s,
            )
        except (UpstreamUnreachable, NoEndpoint) as exc:
            return Reply(not_sent=True, why=exc.code)
        except UpstreamError as exc:
            return Reply(why=exc.code)
        return Reply(answer.status, answer.body)


def _envelope_of(body: bytes | None) -> dict[str, Any] | None:
    try:
        envelope = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    return envelope if isinstance(envelope, dict) else None


def _dumps(detail: dict[str, Any]) -> str:
    return orjson.dumps(detail).decode()


def _notice(options: SelfPayOptions) -> dict[str, str]:
    return {
        "code": "insurance_unavailable_self_pay",
        "zh": options.message_zh,
        "en": options.message_en,
    }


def _reply_header(
    envelope: Mapping[str, Any], options: SelfPayOptions, now: float
) -> dict[str, Any]:
    """The envelope fields of an answer the gateway gives in the insurer's place."""
    stamp = f"{local_time(now, options.utc_offset_hours):%Y-%m-%d %H:%M:%S}"
    msgid = envelope.get("msgid")
    return {
        "infcode": "0",
        "inf_refmsgid": msgid if isinstance(msgid, str) else None,
        "refmsg_time": stamp,
        "respond_time": stamp,
        "err_msg": None,
        "warn_msg": f"{options.message_zh} {options.message_en}",
    }


def self_pay_answer(
    envelope: Mapping[str, Any],
    claim: Claim,
    claim_id: str | None,
    options: SelfPayOptions,
    now: float,
) -> dict[str, Any]:
    """A settlement (2207, with ``claim_id``) or trial (2206) answered as paid in full by the
    patient."""
    full = money(claim.amount)
    data = claim.data
    setlinfo = {
        "setl_id": None,
        "mdtrt_id": data.get("mdtrt_id"),
        "psn_no": data.get("psn_no"),
        "insutype": data.get("insutype"),
        "med_type": data.get("med_type"),
        "medfee_sumamt": full,
        "inscp_scp_amt": 0.0,
        "fund_pay_sumamt": 0.0,
        "hifp_pay": 0.0,
        "acct_pay": 0.0,
        "psn_cash_pay": full,
        "psn_part_amt": full,
        "balc": None,
        "medins_setl_id": None,
        "setl_time": f"{local_time(now, options.utc_offset_hours):%Y-%m-%d %H:%M:%S}",
    }
    section: dict[str, Any] = {
        "degraded": "self-pay",
        "pay": "self-pay",
        "due_from_patient": full,
        "claim_id": claim_id,
        "claim_url": TICKETS_PATH + claim_id if claim_id else None,
        "notice": _notice(options),
    }
    if claim_id is None:
        section["trial"] = True
    return {
        **_reply_header(envelope, options, now),
        "output": {"setlinfo": setlinfo, "setldetail": []},
        "resilgate": section,
    }


def eligibility_unknown(
    envelope: Mapping[str, Any], options: SelfPayOptions, now: float
) -> dict[str, Any]:
    """A person-info call (1101) answered as: eligibility unknown, pay self-pay."""
    data = data_of(envelope) or {}
    psn_no = data.get("psn_no")
    return {
        **_reply_header(envelope, options, now),
        "output": {
            "baseinfo": {"psn_no": psn_no if isinstance(psn_no, str) else None},
            "insuinfo": [],
            "idetinfo": [],
        },
        "resilgate": {
            "degraded": "self-pay",
            "eligibility": "unknown",
            "pay": "self-pay",
            "notice": _notice(options),
        },
    }
