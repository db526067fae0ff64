"""``journal``: HIS writes while the HIS is down: journaled, acknowledged ``202 Accepted`` with a
ticket, replayed in order and exactly once when it is back (DOMAIN.md section 6).

- A FHIR create (``POST …/fhir/{Type}``) gets the ticket as one more ``identifier`` (system
  ``fallbacks.journal.ticket_system``) and is replayed as a conditional create on it
  (``If-None-Exist``; a client's own ``If-None-Exist`` is kept instead): 201 applied, 200
  already there (a duplicate), 412 a conflict for a person.
- A FHIR update (``PUT …/fhir/{Type}/{id}``) is replayed as it came, ``If-Match`` included: a
  version that moved on (412, or 409) is a conflict, unless the record already reads as this
  update would leave it (then it is a duplicate).
- Any other write outside a FHIR base carries an ``Idempotency-Key`` (the client's, else the
  ticket) that the upstream must honour; a 2xx is applied, or a duplicate when the upstream
  marks it ``Idempotent-Replayed: true``.

Any other 4xx leaves a dead letter with the upstream's status and OperationOutcome; a 5xx, 401,
408, 429, a platform error or no answer keeps the entry at the head of its queue for later.
Other requests under a FHIR base (a transaction Bundle, an operation) cannot be replayed exactly
once: the notice answers them. Credentials and cookies are never journaled.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

from resilgate.errors import NoEndpoint, UpstreamError
from resilgate.failure_body import body_failure, short_text
from resilgate.fallback import (
    TICKETS_PATH,
    Fallback,
    FallbackRequest,
    FallbackServices,
    Replayed,
    UpstreamAnswer,
    degraded,
)
from resilgate.logs import get_logger
from resilgate.state.records import JournalEntry, JournalState
from resilgate.state.store import StoreUnavailable

log = get_logger("fallbacks.journal")

Kind = Literal["create", "update", "keyed"]
FHIR_JSON = "application/fhir+json"
# Request headers a replay needs; never Authorization or Cookie.
REPLAYED_HEADERS = (
    "Content-Type",
    "Accept",
    "Prefer",
    "If-Match",
    "If-None-Exist",
    "Idempotency-Key",
)
# ``{base ending in /fhir}/{Type}`` or ``…/{Type}/{id}`` (FHIR ids: 1-64 of [A-Za-z0-9.-]).
_FHIR_PATH = re.compile(
    r"^(?:/[^/]+)*/fhir/(?P<type>[A-Z][A-Za-z]{0,63})(?:/(?P<id>[A-Za-z0-9.\-]{1,64}))?$"
)
_UNDER_FHIR = re.compile(r"(?:^|/)fhir(?:/|$)")
# Answers that say "not now" rather than "not this write": try again later.
RETRY_LATER = frozenset({401, 407, 408, 425, 429})
DETAIL_CHARS = 300


def replay_state(kind: Kind, status: int, transient: bool) -> JournalState:
    """How an upstream's answer to a replayed write ends its entry (``accepted``: not yet)."""
    if status >= 500 or status in RETRY_LATER or transient:
        return "accepted"
    if 200 <= status < 300:
        return "duplicate" if kind == "create" and status == 200 else "applied"
    if status in (409, 412):
        return "conflict"
    return "failed"


def write_kind(method: str, path: str) -> tuple[Kind, str] | None:
    """What kind of write ``method path`` is, with its FHIR type; None: not replayable once."""
    found = _FHIR_PATH.match(path)
    if found is not None:
        if method == "POST" and found["id"] is None:
            return "create", found["type"]
        if method == "PUT" and found["id"] is not None:
            return "update", found["type"]
        return None
    if _UNDER_FHIR.search(path) or method in ("GET", "HEAD", "OPTIONS"):
        return None
    return "keyed", ""


def same_resource(current: Any, written: Any) -> bool:
    """Whether ``current`` reads as ``written`` would leave it (server-kept ``meta`` aside)."""
    if not isinstance(current, dict) or not isinstance(written, dict):
        return False
    return {k: v for k, v in current.items() if k != "meta"} == {
        k: v for k, v in written.items() if k != "meta"
    }


@dataclass(frozen=True, slots=True)
class Journaled:
    """A journal entry's payload: the request to replay, ready to send."""

    kind: Kind
    method: str
    path: str  # with the query, as the client sent it
    headers: dict[str, str]
    body: bytes

    def to_payload(self) -> bytes:
        data: dict[str, Any] = {
            "kind": self.kind,
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
        }
        try:
            data["body"] = self.body.decode()
        except UnicodeDecodeError:
            data["body_b64"] = base64.b64encode(self.body).decode()
        return orjson.dumps(data)

    @classmethod
    def from_payload(cls, raw: bytes) -> Journaled:
        data = orjson.loads(raw)
        body = (
            data["body"].encode() if "body" in data else base64.b64decode(data.get("body_b64", ""))
        )
        return cls(data["kind"], data["method"], data["path"], dict(data["headers"]), body)

    @property
    def line(self) -> str:
        """Method and path without the query (which may name a patient), for details."""
        return f"{self.method} {self.path.partition('?')[0]}"


class BadWrite(ValueError):
    """A journaled write that could never be applied; the message says why (400)."""


def fhir_resource(body: bytes | None, kind: Kind, fhir_type: str, path: str) -> dict[str, Any]:
    """The request's FHIR resource, checked against its URL; ``BadWrite`` if it is not one."""
    try:
        resource = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        raise BadWrite("the body is not JSON") from None
    if not isinstance(resource, dict):
        raise BadWrite("the body must be a FHIR resource (a JSON object)")
    if resource.get("resourceType") != fhir_type:
        raise BadWrite(f"resourceType must be {fhir_type}, as in the URL")
    rid = path.rpartition("/")[2]
    if kind == "update" and resource.get("id") != rid:
        raise BadWrite(f"the resource's id must be {rid}, as in the URL")
    if not isinstance(resource.get("identifier", []), list):
        raise BadWrite("identifier must be a list")
    return resource


class Journal(Fallback):
    """Journals the writes of its routes; see the module doc for how each is replayed."""

    name = "journal"
    journals = True

    def __init__(self, services: FallbackServices) -> None:
        super().__init__(services)
        self._routes = {route.name: route for route in services.config.routes}

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        shape = write_kind(request.method, request.path)
        if shape is None:
            log.info(
                "journal_declined",
                route=request.route.name,
                method=request.method,
                request_id=request.request_id,
            )
            return None
        kind, fhir_type = shape
        options = self.services.config.fallbacks.journal
        ticket = self.services.new_ticket("J")
        headers = {
            name: request.headers[name] for name in REPLAYED_HEADERS if name in request.headers
        }
        headers["X-Request-ID"] = request.request_id
        body = request.body
        if body is None and _has_body(request):
            return None  # too large to keep: it could not be replayed (the notice answers)
        if kind == "keyed":
            headers.setdefault("Idempotency-Key", ticket)
        else:
            try:
                resource = fhir_resource(body, kind, fhir_type, request.path)
            except BadWrite as exc:
                return self._bad_write(request, str(exc))
            headers.setdefault("Content-Type", FHIR_JSON)
            if kind == "create":
                resource["identifier"] = [
                    *resource.get("identifier", []),
                    {"system": options.ticket_system, "value": ticket},
                ]
                headers.setdefault("If-None-Exist", f"identifier={options.ticket_system}|{ticket}")
            body = orjson.dumps(resource)
        journaled = Journaled(kind, request.method, request.raw_path, headers, body or b"")
        try:
            await self.services.journal(request, ticket, journaled.to_payload())
        except StoreUnavailable:
            return None  # never acknowledge what was not stored: the notice answers 503
        status_url = TICKETS_PATH + ticket
        answer = {
            "ticket": ticket,
            "state": "accepted",
            "status_url": status_url,
            "route": request.route.name,
            "notice": {
                "code": "write_journaled",
                "zh": options.message_zh,
                "en": options.message_en,
            },
            "request_id": request.request_id,
        }
        location = {"Location": status_url, "Content-Location": status_url}
        return degraded(self.name, 202, answer, request.request_id, location)

    def _bad_write(self, request: FallbackRequest, reason: str) -> web.Response:
        log.info(
            "journal_refused",
            route=request.route.name,
            request_id=request.request_id,
            reason=reason,
        )
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": reason}],
        }
        return degraded(self.name, 400, outcome, request.request_id, content_type=FHIR_JSON)

    async def replay(self, entry: JournalEntry) -> Replayed:
        try:
            journaled = Journaled.from_payload(entry.payload)
        except (ValueError, KeyError, TypeError) as exc:  # never replayable: not a queue stopper
            return Replayed("failed", _dumps({"error": f"unreadable payload: {exc}"[:200]}))
        route = self._routes.get(entry.route)
        timeout_s = route.timeouts.total_s if route is not None else 30.0
        attempts = int(_json_object(entry.detail).get("attempts", 0)) + 1
        progress: dict[str, Any] = {"request": journaled.line, "attempts": attempts}
        store, owner = self.services.store, self.services.replica
        if not await store.journal_note(entry.ticket, owner, _dumps(progress)):
            return Replayed("accepted", _dumps({**progress, "error": "lease lost"}))
        try:
            answer = await self.services.client.send(
                entry.queue,
                journaled.method,
                journaled.path,
                headers=journaled.headers,
                body=journaled.body,
                timeout_s=timeout_s,
            )
        except (UpstreamError, NoEndpoint) as exc:
            return Replayed("accepted", _dumps({**progress, "error": exc.code}))
        failure = body_failure(
            route.failure_body if route is not None else None, answer.status, answer.body
        )
        state = replay_state(journaled.kind, answer.status, failure is not None)
        detail = {**progress, "status": answer.status, "upstream": answer.endpoint}
        if state == "applied" and journaled.kind == "keyed" and _replayed_answer(answer):
            state = "duplicate"
        if (
            state == "conflict"
            and journaled.kind == "update"
            and await self._reads_as_written(entry.queue, journaled, timeout_s)
        ):
            state = "duplicate"
        if state in ("applied", "duplicate"):
            detail.update(_record_of(answer))
        else:
            detail["outcome"] = failure or _answer_text(answer)
        return Replayed(state, _dumps(detail))

    async def _reads_as_written(self, queue: str, journaled: Journaled, timeout_s: float) -> bool:
        """Whether the record already reads as the update would leave it (then a version
        mismatch is our own earlier attempt, or the same change entered by hand)."""
        path = journaled.path.partition("?")[0]
        try:
            answer = await self.services.client.send(
                queue, "GET", path, headers={"Accept": FHIR_JSON}, timeout_s=timeout_s
            )
        except (UpstreamError, NoEndpoint):
            return False
        return answer.status == 200 and same_resource(answer.json(), orjson.loads(journaled.body))


def _has_body(request: FallbackRequest) -> bool:
    headers = request.headers
    return "Transfer-Encoding" in headers or int(headers.get("Content-Length") or 0) > 0


def _replayed_answer(answer: UpstreamAnswer) -> bool:
    """The upstream says it answered from its idempotency-key store (nothing new applied)."""
    return any(
        name.lower() == "idempotent-replayed" and value.lower() == "true"
        for name, value in answer.headers.items()
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _dumps(detail: dict[str, Any]) -> str:
    return orjson.dumps(detail).decode()


def _record_of(answer: UpstreamAnswer) -> dict[str, str]:
    """Which upstream record the write made or found: type, id and version, nothing else."""
    resource = answer.json()
    if not isinstance(resource, dict) or "id" not in resource:
        return {}
    record = {"resource": f"{resource.get('resourceType')}/{resource['id']}"}
    meta = resource.get("meta")
    if isinstance(meta, dict) and "versionId" in meta:
        record["version"] = str(meta["versionId"])
    return record


def _answer_text(answer: UpstreamAnswer) -> str:
    """The upstream's reason, for the person resolving a dead letter: an OperationOutcome's
    issues, or the ``error``/``message`` of a JSON error body; never anything else of it."""
    document = answer.json()
    if not isinstance(document, dict):
        return f"{answer.headers.get('Content-Type', 'no content type')}, {len(answer.body)} bytes"
    if document.get("resourceType") == "OperationOutcome":
        issues = [
            ": ".join(str(part) for part in (i.get("code", "?"), i.get("diagnostics")) if part)
            for i in document.get("issue") or ()
            if isinstance(i, dict)
        ]
        return short_text("; ".join(issues), DETAIL_CHARS)
    for name in ("error", "message", "err_msg", "detail"):
        if isinstance(document.get(name), str):
            return short_text(document[name], DETAIL_CHARS)
    return "no reason given"
