"""The request path: match route -> choose endpoint -> call upstream -> stream the answer back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import StreamReader, hdrs, web
from aiohttp.http import HttpVersion11

from resilgate.config import Config, Route
from resilgate.errors import (
    ClientGone,
    ClientTooSlow,
    NoRoute,
    RequestBodyTooLarge,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from resilgate.headers import client_response_headers, upstream_request_headers
from resilgate.logs import get_logger
from resilgate.routes import RouteTable, host_without_port
from resilgate.state.view import StateView
from resilgate.upstream import Cluster, Endpoint, clusters_from

log = get_logger("resilgate.proxy")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", Route)
SERVED_BY = web.RequestKey("served_by", str)
# How an exchange ended when its status alone does not say: "truncated" (the upstream broke
# mid-body), "client_gone" (the client left first), or an upstream failure's cause.
OUTCOME = web.RequestKey("outcome", str)
# Answers up to this size are read whole and sent in one write; larger ones stream.
SMALL_BODY_BYTES = 64 * 1024


@dataclass
class Gateway:
    """Everything one worker needs to route requests; built at start-up, never global."""

    config: Config
    routes: RouteTable
    clusters: Mapping[str, Cluster]
    timeouts: Mapping[str, aiohttp.ClientTimeout]
    session: aiohttp.ClientSession | None = field(default=None)
    state: StateView | None = field(default=None)

    @classmethod
    def from_config(cls, config: Config) -> Gateway:
        timeouts = {
            route.name: aiohttp.ClientTimeout(
                total=route.timeouts.total_s, sock_connect=route.timeouts.connect_s
            )
            for route in config.routes
        }
        return cls(config, RouteTable(config.routes), clusters_from(config), timeouts)

    def __repr__(self) -> str:
        return f"<Gateway {self.routes!r} upstreams={sorted(self.clusters)}>"


GATEWAY = web.AppKey("gateway", Gateway)


async def defer_expect(request: web.Request) -> None:
    """Hold back ``100 Continue``: the handler sends it once route and size checks pass."""
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers[hdrs.EXPECT]}")


async def _send_continue(request: web.Request) -> None:
    if (
        request.version == HttpVersion11
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


async def _read_for_matching(
    request: web.Request, route: Route, timeout_s: float
) -> tuple[bytes, Mapping[str, Any]]:
    """Read a small body to match on; returns it and its JSON object (empty if not one)."""
    cap = route.body_read_cap_bytes
    too_large = RequestBodyTooLarge(
        f"a body over {cap} bytes cannot be inspected by route {route.name!r} "
        "(routes[].body_read_cap_bytes)",
        limit=cap,
    )
    if (request.content_length or 0) > cap:
        raise too_large
    await _send_continue(request)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ClientTooSlow(f"request body not received within {timeout_s}s") from exc
    body = b"".join(chunks)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, {}
    return body, value if isinstance(value, dict) else {}


class _StreamedBody:
    """Streams the client's body upstream; notes whether it passed the limit or broke."""

    def __init__(self, content: StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False
        self.client_failed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                chunk = await self._content.readany()
            except Exception:
                self.client_failed = True
                raise
            if not chunk:
                return
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise RequestBodyTooLarge(f"request body over {self._limit} bytes")
            yield chunk


async def proxy_request(request: web.Request) -> web.StreamResponse:
    """The one handler of the public listener."""
    gateway = request.app[GATEWAY]
    method = request.method
    host = host_without_port(request.host)
    path = request.path

    body: bytes | None = None
    fields: Mapping[str, Any] | None = None
    body_route = gateway.routes.body_route(method, host, path)
    if body_route is not None:
        timeout_s = gateway.config.client_body_timeout_s
        body, fields = await _read_for_matching(request, body_route, timeout_s)

    route = gateway.routes.match(method, host, path, fields)
    if route is None:
        raise NoRoute(f"no route for {method} {path}", path=path)
    request[ROUTE] = route

    limit = route.max_body_bytes
    if (request.content_length or 0) > limit or (body is not None and len(body) > limit):
        raise RequestBodyTooLarge(f"request body over {limit} bytes", limit=limit)

    endpoint = gateway.clusters[route.upstream].choose()
    if body is None:
        await _send_continue(request)
    return await _forward(request, gateway, route, endpoint, body)


async def _forward(
    request: web.Request,
    gateway: Gateway,
    route: Route,
    endpoint: Endpoint,
    body: bytes | None,
) -> web.StreamResponse:
    assert gateway.session is not None, "the client session opens with the app"
    request_id = request[REQUEST_ID]
    headers = upstream_request_headers(
        request.raw_headers,
        client_ip=request.remote,
        scheme=request.scheme,
        host=request.host,
        request_id=request_id,
    )
    streamed: _StreamedBody | None = None
    data: bytes | AsyncIterator[bytes] | None = body
    if body is None and request.body_exists:
        streamed = _StreamedBody(request.content, route.max_body_bytes)
        data = streamed.chunks()

    response: web.StreamResponse | None = None
    try:
        async with gateway.session.request(
            request.method,
            endpoint.url_for(request.raw_path),
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=gateway.timeouts[route.name],
        ) as upstream:
            answer_headers = client_response_headers(
                upstream.raw_headers, request_id, endpoint.label
            )
            request[SERVED_BY] = endpoint.label
            length = upstream.content_length
            if length and length <= SMALL_BODY_BYTES and request.method != hdrs.METH_HEAD:
                # Small answers go out in one write; a failure while reading is still a
                # clean 502, not a truncated answer.
                small = web.Response(
                    status=upstream.status, reason=upstream.reason, headers=answer_headers
                )
                small.body = await upstream.read()
                return small
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=answer_headers
            )
            await _to_client(request, response.prepare(request))
            while chunk := await upstream.content.readany():
                await _to_client(request, response.write(chunk))
            await _to_client(request, response.write_eof())
            return response
    except ClientGone:
        _cut(request)
        if response is None or not response.prepared:
            raise
        return response
    except (aiohttp.ClientError, TimeoutError, RequestBodyTooLarge) as exc:
        if response is not None and response.prepared:
            # Headers already went out: all that is left is to cut the connection so the
            # client sees a truncated answer instead of a silently short one.
            request[OUTCOME] = "truncated"
            log.warning(
                "upstream_broke_midstream",
                request_id=request_id,
                route=route.name,
                upstream=endpoint.label,
                cause=type(exc).__name__,
            )
            _cut(request)
            return response
        if streamed is not None and streamed.exceeded:
            raise RequestBodyTooLarge(
                f"request body over {route.max_body_bytes} bytes", limit=route.max_body_bytes
            ) from exc
        if streamed is not None and streamed.client_failed:
            raise ClientGone("the client broke off its upload") from exc
        error = _upstream_error(exc, endpoint)
        request[OUTCOME] = str(error.details.get("cause", ""))
        raise error from exc


async def _to_client(request: web.Request, write: Any) -> None:
    """Await a write to the client; a failure there is the client's, not the upstream's."""
    try:
        await write
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone("the client went away") from exc


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _cause(exc: BaseException) -> str:
    """Exception class and OS reason, e.g. ``ClientConnectorError: Connection refused``."""
    reason = getattr(exc, "strerror", None) or getattr(
        getattr(exc, "os_error", None), "strerror", None
    )
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _upstream_error(exc: BaseException, endpoint: Endpoint) -> UpstreamError:
    where = endpoint.label
    cause = _cause(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(
            f"connecting to {where} timed out", upstream=where, cause=cause
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(f"cannot connect to {where}", upstream=where, cause=cause)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time", upstream=where, cause=cause)
    return UpstreamBroken(f"connection to {where} broke", upstream=where, cause=cause)
