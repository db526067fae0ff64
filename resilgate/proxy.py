"""The request path: match route -> choose endpoint -> call upstream -> stream the answer back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import StreamReader, web

from resilgate.config import Config, Route
from resilgate.errors import (
    NoRoute,
    RequestBodyTooLarge,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from resilgate.headers import client_response_headers, upstream_request_headers
from resilgate.logs import get_logger
from resilgate.routes import RouteTable, host_without_port
from resilgate.upstream import Cluster, Endpoint, clusters_from

log = get_logger("resilgate.proxy")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", Route)
SERVED_BY = web.RequestKey("served_by", str)


@dataclass
class Gateway:
    """Everything one worker needs to route requests; built at start-up, never global."""

    config: Config
    routes: RouteTable
    clusters: Mapping[str, Cluster]
    timeouts: Mapping[str, aiohttp.ClientTimeout]
    session: aiohttp.ClientSession | None = field(default=None)

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


async def _read_capped(content: StreamReader, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > cap:
            raise RequestBodyTooLarge(f"a body-matched route reads at most {cap} bytes", limit=cap)
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class _LimitedBody:
    """Streams the client's body upstream and notes when it passes the route's limit."""

    def __init__(self, content: StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._content.iter_any():
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
    cap = gateway.routes.body_cap(method, host, path)
    if cap is not None:
        if request.content_length is not None and request.content_length > cap:
            raise RequestBodyTooLarge(f"a body-matched route reads at most {cap} bytes", limit=cap)
        body = await _read_capped(request.content, cap)
        fields = _json_object(body)

    route = gateway.routes.match(method, host, path, fields)
    if route is None:
        raise NoRoute(f"no route for {method} {path}", path=path)
    request[ROUTE] = route

    limit = route.max_body_bytes
    if (request.content_length or 0) > limit or (body is not None and len(body) > limit):
        raise RequestBodyTooLarge(f"request body over {limit} bytes", limit=limit)

    endpoint = gateway.clusters[route.upstream].choose()
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
    streamed: _LimitedBody | None = None
    data: bytes | AsyncIterator[bytes] | None = body
    if body is None and request.body_exists:
        streamed = _LimitedBody(request.content, route.max_body_bytes)
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
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.raw_headers, request_id, endpoint.label),
            )
            request[SERVED_BY] = endpoint.label
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError, RequestBodyTooLarge) as exc:
        if streamed is not None and streamed.exceeded:
            raise RequestBodyTooLarge(
                f"request body over {route.max_body_bytes} bytes", limit=route.max_body_bytes
            ) from exc
        if response is not None and response.prepared:
            # Headers already went out: all that is left is to cut the connection so the
            # client sees a truncated answer instead of a silently short one.
            log.warning(
                "upstream_broke_midstream",
                request_id=request_id,
                route=route.name,
                upstream=endpoint.label,
                error=type(exc).__name__,
            )
            if request.transport is not None:
                request.transport.abort()
            return response
        raise _upstream_error(exc, endpoint) from exc


def _upstream_error(exc: BaseException, endpoint: Endpoint) -> Exception:
    where = endpoint.label
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(f"connecting to {where} timed out", upstream=where)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(f"cannot connect to {where}", upstream=where)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time", upstream=where)
    return UpstreamBroken(f"connection to {where} broke: {type(exc).__name__}", upstream=where)
