"""The public application: middlewares for cross-cutting concerns around the one handler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from fallbacks import REGISTRY
from resilgate.config import Config
from resilgate.errors import ClientGone, GatewayError, NoTicket, StartupError, StoreDown
from resilgate.fallback import TICKETS_PATH
from resilgate.headers import REQUEST_ID as REQUEST_ID_HEADER
from resilgate.headers import RequestIds
from resilgate.logs import LOG_STREAM, get_logger, info_line
from resilgate.ops import OPS, build_ops
from resilgate.outcomes import RequestOutcome
from resilgate.proxy import (
    DEGRADED_BY,
    GATEWAY,
    OUTCOME,
    REQUEST_ID,
    ROUTE,
    SERVED_BY,
    TRIES,
    Gateway,
    defer_expect,
    proxy_request,
)
from resilgate.state.factory import make_store
from resilgate.state.records import parsed_detail
from resilgate.state.store import StoreUnavailable
from resilgate.state.view import StateView, trim_forever
from resilgate.upstream import new_session

log = get_logger("resilgate.access")
REQUEST_IDS = web.AppKey("request_ids", RequestIds)


def _error_response(
    status: int, body: dict[str, str | int], request_id: str, retry_after_s: int | None = None
) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON answer that carries the request id."""
    try:
        return await handler(request)
    except GatewayError as exc:
        request_id = request.get(REQUEST_ID) or request.app[REQUEST_IDS](None)
        return _error_response(exc.status, exc.body(request_id), request_id, exc.retry_after_s)
    except web.HTTPException:
        raise
    except Exception:
        request_id = request.get(REQUEST_ID) or request.app[REQUEST_IDS](None)
        log.exception("unhandled_error", request_id=request_id)
        body: dict[str, str | int] = {"error": "internal_error", "request_id": request_id}
        return _error_response(500, body, request_id)


@web.middleware
async def close_when_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: while draining, every answer says ``Connection: close`` (streamed ones set it
    in the proxy), so no client keeps a connection to a replica that is going away."""
    response = await handler(request)
    if request.app[GATEWAY].draining and not response.prepared:
        response.force_close()
    return response


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the client's ``X-Request-ID`` or make one; it goes upstream and comes back."""
    request[REQUEST_ID] = request.app[REQUEST_IDS](request.headers.get(REQUEST_ID_HEADER))
    response = await handler(request)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    return response


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One JSON line per request: route, who served it, status, duration. Never the path."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except GatewayError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        # The client went away and aiohttp cancelled the handler (and the upstream call).
        status = ClientGone.status
        request[OUTCOME] = "client_gone"
        raise
    finally:
        route = request.get(ROUTE)
        duration_s = time.perf_counter() - started
        outcome = RequestOutcome(
            route=route.name if route else None,
            criticality=route.criticality if route else None,
            upstream=route.upstream if route else None,
            served_by=request.get(SERVED_BY),
            degraded=request.get(DEGRADED_BY) or None,
            status=status,
            duration_s=duration_s,
            at=time.time(),
        )
        request.app[GATEWAY].fleet.metrics.observe(outcome)
        request.app[OPS].record(outcome)
        info_line(
            "resilgate.access",
            "access",
            request_id=request[REQUEST_ID],
            method=request.method,
            route=route.name if route else None,
            criticality=route.criticality if route else None,
            upstream=request.get(SERVED_BY),
            degraded=request.get(DEGRADED_BY),
            tries=request.get(TRIES),
            status=status,
            outcome=request.get(OUTCOME),
            duration_ms=round(duration_s * 1000, 2),
        )


async def ticket_status(request: web.Request) -> web.Response:
    """Where a journaled write, a self-pay claim or a local registration stands: its state and
    the upstream's answer (never the request body)."""
    view = request.app[GATEWAY].state
    if view is None:
        raise StoreDown("the state store is not open yet")
    ticket = request.match_info["ticket"]
    try:
        entry = await view.store.journal_get(ticket)
    except StoreUnavailable as exc:
        raise StoreDown(f"the state store is unreachable: {exc}") from exc
    if entry is None:
        raise NoTicket(f"no ticket {ticket}")
    body = {
        "ticket": entry.ticket,
        "state": entry.state,
        "queue": entry.queue,
        "route": entry.route,
        "accepted_at": entry.created_at,
        "detail": parsed_detail(entry.detail),
    }
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def shared_state(app: web.Application) -> AsyncIterator[None]:
    """Open the state store and keep this worker's view of it fresh in the background."""
    config = app[GATEWAY].config
    try:
        store = make_store(config)
        await store.open()
    except Exception as exc:  # a bad URL, an unusable file, an unreachable SQLite
        raise StartupError(f"state ({config.state.backend}): {exc}") from exc
    if store.backend == "memory":
        log.warning("state_store_memory", note="tests only: nothing is shared or kept")
    view = StateView(store, refresh_s=config.state.refresh_s)
    gateway = app[GATEWAY]
    gateway.state = view
    await gateway.fallbacks.start()
    ops = app[OPS]
    day = 86400.0
    tasks = [
        asyncio.create_task(view.run()),
        asyncio.create_task(ops.alerts.run()),
        asyncio.create_task(ops.watcher.run()),
        asyncio.create_task(ops.drills.run()),
        asyncio.create_task(gateway.fleet.run(view)),
        asyncio.create_task(gateway.replayer.run()),
        asyncio.create_task(
            trim_forever(
                store,
                config.state.trim_interval_s,
                config.state.audit_retention_days * day,
                config.state.journal_retention_days * day,
                config.state.verdict_retention_s,
            )
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ops.alerts.close()
    await gateway.fallbacks.stop()
    await store.close()


def build_app(config: Config) -> web.Application:
    """The public listener's application for one worker."""
    app = web.Application(middlewares=[close_when_draining, errors_as_json, request_id, access_log])
    app[GATEWAY] = Gateway.from_config(config, REGISTRY)
    app[OPS] = build_ops(app[GATEWAY])
    app[REQUEST_IDS] = RequestIds()

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        gateway = app[GATEWAY]
        gateway.session = new_session(config)
        yield
        await gateway.session.close()

    async def flush_logs(app: web.Application) -> AsyncIterator[None]:
        LOG_STREAM.deferred = True

        async def flusher() -> None:
            while True:
                await asyncio.sleep(LOG_STREAM.FLUSH_INTERVAL_S)
                LOG_STREAM.flush_now()

        task = asyncio.get_running_loop().create_task(flusher())
        yield
        task.cancel()
        LOG_STREAM.deferred = False
        LOG_STREAM.flush_now()

    app.cleanup_ctx.append(flush_logs)
    app.cleanup_ctx.append(shared_state)
    app.cleanup_ctx.append(client_session)
    app.router.add_get(f"{TICKETS_PATH}{{ticket}}", ticket_status)
    app.router.add_route("*", "/{tail:.*}", proxy_request, expect_handler=defer_expect)
    return app
