"""The admin listener's application: status, modes, audit, journal, drills, metrics, health.

It runs in every worker next to the public application and reads that worker's gateway; what
it changes goes to the state store, from which every worker and replica picks it up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from resilgate.admin.auth import Principal, TokenBook
from resilgate.admin.models import (
    Alive,
    AuditList,
    AuditView,
    DrillRequest,
    JournalItem,
    JournalList,
    ModeChange,
    ModeList,
    Ready,
    ReasonBody,
)
from resilgate.admin.openapi import document
from resilgate.admin.status import build_status, mode_view, queue_views
from resilgate.config import Config
from resilgate.drills import DrillRefused, InvalidDrill, UnknownDrillTarget
from resilgate.logs import get_logger
from resilgate.ops import OPS, Ops
from resilgate.proxy import GATEWAY, Gateway
from resilgate.state.records import (
    DEAD,
    UNFINISHED,
    AuditRecord,
    ForcedMode,
    JournalEntry,
    parsed_detail,
)
from resilgate.state.store import StateStore, StoreUnavailable

log = get_logger("resilgate.admin")
PUBLIC_APP = web.AppKey("public_app", web.Application)
TOKENS = web.AppKey("tokens", TokenBook)
PRINCIPAL = web.RequestKey("principal", Principal)
AUDIT_RETRIES = web.AppKey("audit_retries", set[asyncio.Task[None]])
AUDIT_RETRY_S = 2.0
AUDIT_RETRY_TRIES = 300  # ten minutes
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JOURNAL_STATES = {
    "open": UNFINISHED,
    "dead": DEAD,
    "all": None,
}
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An answer other than success: status, machine code and a reason for a person."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _json(model: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    body = model.model_dump_json().encode() if isinstance(model, BaseModel) else orjson.dumps(model)
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _problem(status: int, code: str, detail: str) -> web.Response:
    response = _json({"error": code, "detail": detail}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="resilgate-admin"'
    return response


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every failure is a JSON problem; a store outage is a 503."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _problem(exc.status, exc.code, exc.detail)
    except StoreUnavailable as exc:
        return _problem(503, "state_store_unreachable", f"the state store is unreachable: {exc}")
    except web.HTTPNotFound:
        return _problem(404, "not_found", f"no admin endpoint {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        response = _problem(405, "method_not_allowed", f"{request.method} is not allowed here")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("admin_error", path=request.path, method=request.method)
        return _problem(500, "internal_error", "the admin API failed; the log has the details")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token for everything but health and the document; operators for changes."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    principal = request.app[TOKENS].who(request.headers.get("Authorization"))
    if principal is None:
        raise ApiError(401, "unauthorized", "a valid bearer token is required")
    if request.method in CHANGING_METHODS and not principal.operator:
        raise ApiError(403, "forbidden", f"{principal.name} is a viewer: changes need an operator")
    request[PRINCIPAL] = principal
    return await handler(request)


def _gateway(request: web.Request) -> Gateway:
    return request.app[PUBLIC_APP][GATEWAY]


def _ops(request: web.Request) -> Ops:
    return request.app[PUBLIC_APP][OPS]


def _store(request: web.Request) -> StateStore:
    view = _gateway(request).state
    if view is None:
        raise ApiError(503, "starting", "the state store is not open yet")
    return view.store


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ApiError(400, "bad_request", reasons) from exc


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name} must be a whole number from {low} to {high}")
    return value


def _reason_query(request: web.Request) -> str:
    reason = request.query.get("reason", "")
    if not reason.strip() or len(reason) > 500:
        raise ApiError(400, "bad_request", "reason (1 to 500 characters) is required")
    return reason


async def _audit(
    request: web.Request, action: str, target: str, reason: str, detail: str = ""
) -> None:
    """Record a change that was made. If the store fails right after the change, the record
    is kept trying in the background (the change happened: the answer says so)."""
    actor = request[PRINCIPAL].name
    record = AuditRecord(time.time(), actor, action, target, reason, detail)
    store = _store(request)
    log.info("admin_change", actor=actor, action=action, target=target)
    try:
        await store.audit_append(record)
    except StoreUnavailable as exc:
        log.error("audit_deferred", actor=actor, action=action, target=target, error=str(exc))
        tasks = request.app[AUDIT_RETRIES]
        task = asyncio.get_running_loop().create_task(_append_later(store, record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _append_later(store: StateStore, record: AuditRecord) -> None:
    for _ in range(AUDIT_RETRY_TRIES):
        await asyncio.sleep(AUDIT_RETRY_S)
        try:
            await store.audit_append(record)
        except StoreUnavailable:
            continue
        log.info("audit_written_late", action=record.action, target=record.target)
        return
    log.error("audit_lost", actor=record.actor, action=record.action, target=record.target)


# -- health, document, metrics ---------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return _json(Alive(status="alive", replica=_gateway(request).fleet.replica))


async def readyz(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    if gateway.draining:
        return _json(Ready(ready=False, reason="draining: shutting down"), 503)
    if gateway.state is None:
        return _json(Ready(ready=False, reason="starting"), 503)
    return _json(Ready(ready=True, reason="ok"))


async def openapi(request: web.Request) -> web.Response:
    return _json(document())


async def metrics(request: web.Request) -> web.Response:
    body, content_type = _gateway(request).fleet.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def status(request: web.Request) -> web.Response:
    return _json(await build_status(_gateway(request), _ops(request)))


# -- modes ------------------------------------------------------------------------------------


def targets(config: Config) -> dict[str, str]:
    """Every name a mode may be forced on, and what it is."""
    names = {name: "upstream" for name in config.upstreams}
    names.update({route.name: "route" for route in config.routes})
    for upstream, spec in config.upstreams.items():
        names.update({f"{upstream}/{endpoint.name}": "endpoint" for endpoint in spec.endpoints})
    return names


def _target(request: web.Request) -> tuple[str, str]:
    target = unquote(request.match_info["target"])
    kind = targets(_gateway(request).config).get(target)
    if kind is None:
        raise ApiError(404, "unknown_target", f"no upstream, route or endpoint {target!r}")
    return target, kind


async def _active_modes(store: StateStore) -> dict[str, ForcedMode]:
    now = time.time()
    return {t: m for t, m in (await store.load_modes()).items() if m.active(now)}


async def list_modes(request: web.Request) -> web.Response:
    modes = await _active_modes(_store(request))
    return _json(ModeList(modes=[mode_view(t, m) for t, m in sorted(modes.items())]))


async def get_mode(request: web.Request) -> web.Response:
    target, _ = _target(request)
    return _json(mode_view(target, (await _active_modes(_store(request))).get(target)))


async def put_mode(request: web.Request) -> web.Response:
    target, kind = _target(request)
    change = await _body(request, ModeChange)
    if change.mode == "auto":
        return await _clear_mode(request, target, change.reason)
    if kind == "endpoint" and change.mode != "maintenance":
        raise ApiError(
            400, "bad_mode", "an endpoint can only be fenced (maintenance); force its upstream"
        )
    now = time.time()
    expires_at = now + change.expires_in_s if change.expires_in_s else None
    actor = request[PRINCIPAL].name
    forced = ForcedMode(target, change.mode, change.reason, actor, now, expires_at)
    store = _store(request)
    await store.put_mode(forced)
    detail = f"mode={change.mode}" + (
        f" expires_in_s={change.expires_in_s:g}" if change.expires_in_s else ""
    )
    await _audit(request, "mode.set", target, change.reason, detail)
    await _apply_here(request)
    return _json(mode_view(target, forced))


async def _clear_mode(request: web.Request, target: str, reason: str) -> web.Response:
    await _store(request).delete_mode(target)
    await _audit(request, "mode.clear", target, reason)
    await _apply_here(request)
    return _json(mode_view(target, None))


async def delete_mode(request: web.Request) -> web.Response:
    target, _ = _target(request)
    return await _clear_mode(request, target, _reason_query(request))


async def _apply_here(request: web.Request) -> None:
    """This worker applies the change at once; the others within their refresh."""
    view = _gateway(request).state
    if view is not None:
        try:
            await view.refresh()
        except Exception as exc:  # the background refresh tries again
            log.warning("mode_refresh_failed", error=f"{type(exc).__name__}: {exc}"[:200])


# -- audit ------------------------------------------------------------------------------------


async def audit(request: web.Request) -> web.Response:
    limit = _query_int(request, "limit", 100, 1, 1000)
    records = await _store(request).audit_list(limit)
    return _json(
        AuditList(
            records=[
                AuditView(
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    reason=r.reason,
                    detail=r.detail,
                )
                for r in records
            ]
        )
    )


# -- journal ----------------------------------------------------------------------------------


def journal_item(entry: JournalEntry) -> JournalItem:
    return JournalItem(
        ticket=entry.ticket,
        queue=entry.queue,
        route=entry.route,
        state=entry.state,
        accepted_at=entry.created_at,
        detail=parsed_detail(entry.detail),
    )


async def journal(request: web.Request) -> web.Response:
    state = request.query.get("state", "all")
    if state not in JOURNAL_STATES:
        raise ApiError(400, "bad_request", "state is open, dead or all")
    limit = _query_int(request, "limit", 100, 1, 1000)
    queue = request.query.get("queue") or None
    store = _store(request)
    entries = await store.journal_list(JOURNAL_STATES[state], limit, queue)
    return _json(
        JournalList(
            entries=[journal_item(e) for e in entries],
            queues=queue_views(await store.journal_stats(), time.time()),
        )
    )


async def _entry(request: web.Request) -> JournalEntry:
    ticket = request.match_info["ticket"]
    entry = await _store(request).journal_get(ticket)
    if entry is None:
        raise ApiError(404, "no_such_ticket", f"no ticket {ticket}")
    return entry


async def journal_entry(request: web.Request) -> web.Response:
    return _json(journal_item(await _entry(request)))


JournalChange = Callable[[StateStore, str, str], Awaitable[JournalEntry | None]]


async def _change_entry(
    request: web.Request, action: str, change: JournalChange, refusal: tuple[str, str]
) -> web.Response:
    entry = await _entry(request)
    body = await _body(request, ReasonBody)
    detail = orjson.dumps(
        {"by": request[PRINCIPAL].name, "action": action, "reason": body.reason, "was": entry.state}
    ).decode()
    try:
        changed = await change(_store(request), entry.ticket, detail)
    except KeyError as exc:
        raise ApiError(404, "no_such_ticket", f"no ticket {entry.ticket}") from exc
    if changed is None:
        code, why = refusal
        raise ApiError(409, code, f"ticket {entry.ticket} is {entry.state}: {why}")
    await _audit(request, f"journal.{action}", entry.ticket, body.reason, f"was={entry.state}")
    return _json(journal_item(changed))


async def journal_retry(request: web.Request) -> web.Response:
    return await _change_entry(
        request,
        "retry",
        lambda store, ticket, detail: store.journal_reopen(ticket, detail),
        ("not_retryable", "only a conflict or a failed entry can be retried"),
    )


async def journal_discard(request: web.Request) -> web.Response:
    return await _change_entry(
        request,
        "discard",
        lambda store, ticket, detail: store.journal_discard(ticket, detail, time.time()),
        ("not_discardable", "finished, or being replayed right now (try again in a moment)"),
    )


# -- drills -----------------------------------------------------------------------------------


async def start_drill(request: web.Request) -> web.Response:
    body = await _body(request, DrillRequest)
    drills = _ops(request).drills
    try:
        drill = await drills.start(
            body.target, body.mode, body.duration_s, body.reason, request[PRINCIPAL].name
        )
    except UnknownDrillTarget as exc:
        raise ApiError(404, "unknown_target", str(exc)) from exc
    except InvalidDrill as exc:
        raise ApiError(400, "invalid_drill", str(exc)) from exc
    except DrillRefused as exc:
        raise ApiError(409, "drill_refused", str(exc)) from exc
    await _apply_here(request)
    response = _json(drill, 201)
    response.headers["Location"] = f"/drills/{drill.id}"
    return response


async def list_drills(request: web.Request) -> web.Response:
    drills = await _ops(request).drills.list()
    return _json({"drills": [drill.model_dump(mode="json") for drill in drills]})


async def get_drill(request: web.Request) -> web.Response:
    drill_id = request.match_info["drill"]
    drill = await _ops(request).drills.view(drill_id)
    if drill is None:
        raise ApiError(404, "no_such_drill", f"no drill {drill_id}")
    return _json(drill)


# -- the application --------------------------------------------------------------------------


def build_admin_app(public_app: web.Application) -> web.Application:
    """The admin listener's application for one worker, next to its public ``public_app``."""
    app = web.Application(middlewares=[problems, authenticate])
    app[PUBLIC_APP] = public_app
    app[TOKENS] = TokenBook.from_config(public_app[GATEWAY].config)
    app[AUDIT_RETRIES] = set()
    if not len(app[TOKENS]):
        log.warning("admin_without_tokens", note="only /healthz, /readyz and /openapi.json answer")
    router = app.router
    router.add_get("/healthz", healthz, allow_head=False)
    router.add_get("/readyz", readyz, allow_head=False)
    router.add_get("/openapi.json", openapi, allow_head=False)
    router.add_get("/metrics", metrics, allow_head=False)
    router.add_get("/status", status, allow_head=False)
    router.add_get("/modes", list_modes, allow_head=False)
    router.add_get("/modes/{target:.+}", get_mode, allow_head=False)
    router.add_put("/modes/{target:.+}", put_mode)
    router.add_delete("/modes/{target:.+}", delete_mode)
    router.add_get("/audit", audit, allow_head=False)
    router.add_get("/journal", journal, allow_head=False)
    router.add_get("/journal/{ticket}", journal_entry, allow_head=False)
    router.add_post("/journal/{ticket}/retry", journal_retry)
    router.add_post("/journal/{ticket}/discard", journal_discard)
    router.add_post("/drills", start_drill)
    router.add_get("/drills", list_drills, allow_head=False)
    router.add_get("/drills/{drill}", get_drill, allow_head=False)
    return app


def mark_draining(admin_app: web.Application) -> None:
    """From now on ``/readyz`` says not ready, so the load balancer stops sending traffic, and
    public answers close their connections."""
    admin_app[PUBLIC_APP][GATEWAY].draining = True
