"""A registration the gateway took itself: the request checked as the registration system
would, the journal payload, the answer, and the back-entry replay's request and outcome.

No I/O here; ``fallbacks.local_queue`` does the sending and storing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import orjson

from resilgate.sealing import Keyring
from resilgate.state.records import JournalState

REQUIRED_FIELDS = ("patientId", "dept", "doctorId", "slotId", "payType", "channel")
PAY_TYPES = ("insured", "self-pay")
DEPT_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
KIND = "local-queue.registration"
# 4xx that say "not now", not "never" (401/407 refuse the gateway's own credentials, not the
# registration: dead-lettering would dead-letter every entry). As the journal fallback has it.
RETRY_LATER = frozenset({401, 407, 408, 425, 429})
EXTERNAL_PATH = "/reg/v1/registrations/external/"  # + ticket: the back-entry upsert


class Invalid(Exception):
    """A request the registration system would refuse; ``status`` and ``code`` as it would."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def answer(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


def mask(text: str) -> str:
    """Hide the middle as display boards do: 张建华 -> 张*华, 张三 -> 张*, p-10086 -> p*****6."""
    if len(text) <= 1:
        return "*"
    if len(text) == 2:
        return text[0] + "*"
    return text[0] + "*" * (len(text) - 2) + text[-1]


def check_registration(raw: bytes | None) -> tuple[dict[str, str], str]:
    """The registration fields of a ``POST /reg/v1/registrations`` body and the name the
    board shows (``patientName`` if sent, else the patient id), masked; or Invalid."""
    try:
        body = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        raise Invalid(400, "bad_request", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Invalid(400, "bad_request", "body must be a JSON object")
    missing = [name for name in REQUIRED_FIELDS if not body.get(name)]
    if missing:
        raise Invalid(400, "missing_fields", f"missing field(s): {', '.join(missing)}")
    wrong = [name for name in REQUIRED_FIELDS if not isinstance(body[name], str)]
    if wrong:
        raise Invalid(400, "invalid_fields", f"must be strings: {', '.join(wrong)}")
    if body["payType"] not in PAY_TYPES:
        raise Invalid(400, "invalid_pay_type", f"payType must be one of {PAY_TYPES}")
    if not DEPT_RE.match(body["dept"]):
        raise Invalid(404, "unknown_dept", "dept must be a department code")
    name = body.get("patientName")
    shown = name if isinstance(name, str) and name else body["patientId"]
    return {name: body[name] for name in REQUIRED_FIELDS}, mask(shown)


def slot_day(slot_id: str, dept: str) -> date | None:
    """The day a schedule slot (``NEI-20250320-d-01-AM``) books, if the id names one."""
    match = re.match(rf"^{re.escape(dept)}-(\d{{8}})-", slot_id)
    if match is None:
        return None
    text = match.group(1)
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def fingerprint(fields: dict[str, str]) -> str:
    """Tells a retry (same request, same key) from a different request reusing a key."""
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def keyed_tickets(route: str, key: str, keyring: Keyring | None) -> tuple[str, ...]:
    """The tickets a registration sent with ``Idempotency-Key`` may be under, the one to
    journal a new one under first: the same for every retry on every replica, so the journal
    itself recognises a retry (DuplicateTicket, or the spool drain).

    With a keyring, an HMAC that only holders of its keys can compute (one per key: after a
    rotation a retry is looked up under each), so a ticket cannot be derived from a key;
    without one, a plain hash of route and key (a client's guessable key gives it away).
    """
    parts = (b"local-queue ticket", route.encode(), key.encode())
    label = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
    if keyring is None:
        return (f"R-K-{hashlib.sha256(label).hexdigest()[:24]}",)
    return tuple(f"R-K-{name[:24]}" for name in keyring.index_names(label))


@dataclass(frozen=True, slots=True)
class LocalRegistration:
    """One locally issued number: what the journal keeps (the payload) and the board shows."""

    ticket: str
    dept: str
    date: str  # the hospital's day, ISO
    number: int
    queue_no: str
    fields: dict[str, str]  # the registration fields as sent
    masked_name: str
    fingerprint: str
    accepted_at: float = 0.0  # the journal entry's, filled in when read back
    kind: str = KIND

    def payload(self) -> bytes:
        data = asdict(self)
        del data["accepted_at"]
        return orjson.dumps(data)

    @classmethod
    def from_payload(cls, raw: bytes, accepted_at: float) -> LocalRegistration | None:
        """The registration in a journal payload; None if the payload is not one."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"accepted_at"}
        try:
            return cls(**{k: v for k, v in data.items() if k in names}, accepted_at=accepted_at)
        except TypeError:  # a field missing: not written by this fallback
            return None

    def answer(self, status_path: str) -> dict[str, Any]:
        """The 201 answer, shaped like the registration system's: it has no ``regNo`` or
        ``visitNo`` yet (see ``statusUrl`` for them after back-entry)."""
        return {
            "regNo": None,
            "queueNo": self.queue_no,
            "visitNo": None,
            **self.fields,
            "maskedName": self.masked_name,
            "date": self.date,
            "status": "CHECKED_IN",
            "queueStatus": "WAITING",
            "externalTicket": self.ticket,
            "issuer": "gateway",
            "ticket": self.ticket,
            "statusUrl": status_path,
        }

    def board_entry(self, status: str) -> dict[str, Any]:
        return {"queueNo": self.queue_no, "maskedName": self.masked_name, "status": status}

    def replay_body(self, queue_status: str) -> bytes:
        """The back-entry upsert: the fields, the local number and day, and where on the
        queue the patient is (``WAITING`` or ``CALLED`` locally)."""
        body = {
            **self.fields,
            "queueNo": self.queue_no,
            "date": self.date,
            "queueStatus": queue_status,
        }
        return orjson.dumps(body)


def replay_outcome(
    reg: LocalRegistration, status: int, answer: Any
) -> tuple[JournalState, dict[str, Any]]:
    """How one back-entry attempt ended, and the detail to keep: ids of the system's
    registration, or its error code (never a message, which may name the patient)."""
    detail: dict[str, Any] = {"localQueueNo": reg.queue_no, "dept": reg.dept, "date": reg.date}
    body = answer if isinstance(answer, dict) else {}
    if status in (200, 201):
        detail |= {
            "regNo": body.get("regNo"),
            "visitNo": body.get("visitNo"),
            "queueNo": body.get("queueNo"),
        }
        return ("applied" if status == 201 else "duplicate"), detail
    detail |= {"status": status, "code": body.get("code")}
    if status in (409, 412):
        return "conflict", detail
    if 400 <= status < 500 and status not in RETRY_LATER:
        return "failed", detail
    return "accepted", detail
