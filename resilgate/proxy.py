"""The request path: route -> mode gate -> endpoints -> attempts -> stream the answer back."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import StreamReader, hdrs, web
from aiohttp.http import HttpVersion11

from resilgate.breaker import Admission
from resilgate.config import Config, Route
from resilgate.errors import (
    ClientGone,
    ClientTooSlow,
    GatewayError,
    NoEndpoint,
    NoRoute,
    RequestBodyTooLarge,
    UpstreamError,
    UpstreamInMaintenance,
    UpstreamUnreachable,
)
from resilgate.failure_body import body_failure
from resilgate.fallback import DEGRADED, Fallback, FallbackRequest, FallbackRunner, FallbackServices
from resilgate.fleet import Fleet
from resilgate.headers import client_response_headers, upstream_request_headers
from resilgate.health import EndpointHealth, UpstreamRuntime
from resilgate.logs import get_logger
from resilgate.metrics import Metrics
from resilgate.replay import FleetClient, Replayer
from resilgate.routes import RouteTable, host_without_port
from resilgate.selection import plan
from resilgate.state.records import ForcedMode, ModeName
from resilgate.state.view import StateView
from resilgate.upstream import Endpoint, clusters_from, upstream_error

log = get_logger("resilgate.proxy")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", Route)
SERVED_BY = web.RequestKey("served_by", str)
# How an exchange ended when its status alone does not say: "truncated" (the upstream broke
# mid-body), "client_gone" (the client left first), or an upstream failure's cause.
OUTCOME = web.RequestKey("outcome", str)
TRIES = web.RequestKey("tries", int)
DEGRADED_BY = web.RequestKey("degraded_by", str)  # the fallback that answered
# Answers up to this size are read whole and sent in one write; larger ones stream.
SMALL_BODY_BYTES = 64 * 1024
# Bodies of retryable requests up to this size are kept, so a retry can send them again.
RESEND_BODY_BYTES = 1024 * 1024
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
KEYED_METHODS = frozenset({"POST", "PATCH"})
IDEMPOTENCY_KEY = "Idempotency-Key"


@dataclass
class Gateway:
    """Everything one worker needs to route requests; built at start-up, never global."""

    config: Config
    routes: RouteTable
    timeouts: Mapping[str, aiohttp.ClientTimeout]
    fleet: Fleet
    fallbacks: FallbackRunner
    replayer: Replayer
    session: aiohttp.ClientSession | None = field(default=None)
    state: StateView | None = field(default=None)
    # SIGTERM came: /readyz says 503, and every answer closes its connection, so a client
    # on a kept-alive connection reconnects through the load balancer to another replica.
    draining: bool = False
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_config(cls, config: Config, registry: Mapping[str, type[Fallback]]) -> Gateway:
        """A worker's gateway, with the fallbacks of ``registry`` that the routes name."""
        timeouts = {
            route.name: aiohttp.ClientTimeout(
                total=route.timeouts.total_s, sock_connect=route.timeouts.connect_s
            )
            for route in config.routes
        }
        fleet = Fleet(config, clusters_from(config), fleet_metrics := Metrics())
        holder: list[Gateway] = []
        client = FleetClient(fleet, lambda: holder[0].session, lambda: holder[0].state)
        services = FallbackServices(
            config,
            fleet_metrics,
            fleet.replica,
            client,
            lambda: holder[0].state.store if holder[0].state is not None else None,
        )
        runner = FallbackRunner(services, registry)
        gateway = cls(
            config,
            RouteTable(config.routes),
            timeouts,
            fleet,
            runner,
            Replayer(services, runner, client),
        )
        holder.append(gateway)
        return gateway

    def __repr__(self) -> str:
        return f"<Gateway {self.routes!r} upstreams={sorted(self.fleet.runtimes)}>"


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
    body = await _read_whole(request, cap, timeout_s, too_large)
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
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
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


def may_retry(route: Route, method: str, headers: Mapping[str, str]) -> bool:
    """Whether the request may be sent again to another endpoint after it may have reached one.

    By method (GET, HEAD, OPTIONS, PUT, DELETE, and a POST or PATCH with ``Idempotency-Key``)
    unless the route says its calls are ``safe`` (commit nothing) or ``never`` (commit money).
    """
    if route.retries != "by_method":
        return route.retries == "safe"
    return method in IDEMPOTENT_METHODS or (method in KEYED_METHODS and IDEMPOTENCY_KEY in headers)


async def proxy_request(request: web.Request) -> web.StreamResponse:
    """The one handler of the public listener: route -> mode gate -> endpoints -> attempts."""
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

    mode = _forced_mode(gateway, route)
    if mode is not None and mode.mode == "maintenance" and route.fallback is None:
        raise UpstreamInMaintenance(
            f"{mode.target} is in maintenance mode: {mode.reason}",
            mode=mode.mode,
            set_by=mode.actor,
        )
    retry = may_retry(route, method, request.headers)
    if body is None:
        await _send_continue(request)
        length = request.content_length
        journals = _keeps_body(route)
        fits = length is not None and length <= RESEND_BODY_BYTES
        # A chunked body is read whole only for a fallback that may journal it, and only
        # where the route's limit is within what is kept anyway.
        chunked = length is None and limit <= RESEND_BODY_BYTES
        if request.body_exists and ((fits and (retry or journals)) or (chunked and journals)):
            # Kept so it can be sent again to the next endpoint, or journaled.
            cap = min(limit, RESEND_BODY_BYTES)
            body = await _read_whole(request, cap, gateway.config.client_body_timeout_s)
    if mode is not None and mode.mode in ("maintenance", "fallback"):
        reason = f"{mode.target} in {mode.mode} mode by {mode.actor}: {mode.reason}"
        return await _fall_back(request, gateway, route, body, reason)
    forced = None if mode is None or mode.mode == "auto" else mode.mode

    runtime = gateway.fleet.runtimes[route.upstream]
    runtime.budget.note_request()
    now = time.monotonic()
    order = plan(
        [health.candidate(now) for health in runtime.endpoints],
        write=method not in READ_METHODS and route.retries != "safe",
        forced=forced,
        draw=gateway.rng.random(),
    )
    if not order:
        gateway.fleet.metrics.no_endpoint.labels(route.name).inc()
        down = "; ".join(
            f"{h.endpoint.label}: {h.why_down() or 'holding down or busy'}"
            for h in runtime.endpoints
        )
        error = NoEndpoint(f"no endpoint of {route.upstream} can take this request ({down})")
        if route.fallback is not None:
            return await _fall_back(request, gateway, route, body, error.message)
        raise error
    return await _exchange(request, gateway, route, runtime, order, body, retry, forced)


def _forced_mode(gateway: Gateway, route: Route) -> ForcedMode | None:
    """The ops-forced mode of the route, else of its upstream (the mode gate)."""
    view = gateway.state
    if view is None or not view.modes:
        return None
    return view.mode_of(route.name) or view.mode_of(route.upstream)


def _keeps_body(route: Route) -> bool:
    """A fallback that may journal the request needs its body."""
    return route.fallback not in (None, "notice", "stale-cache")


def _reads(route: Route, method: str) -> bool:
    """The request changes nothing upstream, so any failure may be answered by a fallback."""
    return method in READ_METHODS or route.retries == "safe"


async def _read_whole(
    request: web.Request, cap: int, timeout_s: float, too_large: GatewayError | None = None
) -> bytes:
    """The whole body, at most ``cap`` bytes (else ``too_large``), within ``timeout_s``."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > cap:
                    raise too_large or RequestBodyTooLarge(
                        f"request body over {cap} bytes", limit=cap
                    )
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ClientTooSlow(f"request body not received within {timeout_s}s") from exc
    return b"".join(chunks)


def fallback_request(
    request: web.Request, route: Route, body: bytes | None, reason: str
) -> FallbackRequest:
    return FallbackRequest(
        route=route,
        method=request.method,
        path=request.path,
        query=request.query,
        raw_path=request.raw_path,
        headers=request.headers,
        body=body,
        request_id=request[REQUEST_ID],
        reason=reason,
    )


async def _fall_back(
    request: web.Request, gateway: Gateway, route: Route, body: bytes | None, reason: str
) -> web.StreamResponse:
    """No endpoint served: the route's fallback answers (the notice if it cannot)."""
    request[OUTCOME] = "fallback"
    answer = await gateway.fallbacks.answer(fallback_request(request, route, body, reason))
    request[DEGRADED_BY] = answer.headers.get(DEGRADED, "")
    return answer


@dataclass
class _Answer:
    """An endpoint's answer with its headers in (and, when small, its body)."""

    health: EndpointHealth
    response: aiohttp.ClientResponse
    attempt: int
    body: bytes | None  # read whole when small
    failure: str  # why it counts as a failure of the endpoint, or ""

    def release(self) -> None:
        self.response.release()
        self.health.load.finished(self.attempt)


@dataclass
class _Failed:
    """An attempt that got no answer."""

    health: EndpointHealth
    error: GatewayError
    reached: bool  # the request may have reached the endpoint
    sent: bool = True  # False: its breaker refused it before anything was sent


@dataclass(frozen=True, slots=True)
class _Outcomes:
    """Feeds one attempt's outcome to its endpoint's breaker; an attempt that ops forced past
    the breaker (mode ``primary``) has no admission and reports nothing."""

    health: EndpointHealth
    admission: Admission | None

    def record(self, *, failed: bool, latency_s: float) -> None:
        if self.admission is not None:
            self.health.breaker.record(self.admission, failed=failed, latency_s=latency_s)

    def abandon(self) -> None:
        if self.admission is not None:
            self.health.breaker.abandon(self.admission)


class _Exchange:
    """The attempts of one client request: the first endpoint, then retries and hedges."""

    def __init__(
        self,
        request: web.Request,
        gateway: Gateway,
        route: Route,
        runtime: UpstreamRuntime,
        body: bytes | None,
        retry: bool,
        forced: ModeName | None,
    ) -> None:
        self.request = request
        self.forced = forced == "primary"
        self.gateway = gateway
        self.route = route
        self.runtime = runtime
        self.body = body
        self.retry = retry
        self.streamed: _StreamedBody | None = None
        if body is None and request.body_exists:
            self.streamed = _StreamedBody(request.content, route.max_body_bytes)
        self.headers = upstream_request_headers(
            request.raw_headers,
            client_ip=request.remote,
            scheme=request.scheme,
            host=request.host,
            request_id=request[REQUEST_ID],
        )
        self.tries = 0
        self.observed = gateway.fallbacks.observes(route, request.method)
        self.read_whole_bytes = SMALL_BODY_BYTES
        if self.observed:
            cache_limit = gateway.config.fallbacks.stale_cache.max_entry_bytes
            self.read_whole_bytes = max(SMALL_BODY_BYTES, cache_limit)
        self._waiting: list[EndpointHealth] = []
        self._running: dict[asyncio.Task[_Answer | _Failed], EndpointHealth] = {}
        self._kept: _Answer | None = None
        # An attempt may have been applied: sent with no answer, or answered with a failure
        # that does not show it was refused before being processed.
        self.maybe_applied = False

    def resendable(self) -> bool:
        """The body can go out again: kept whole, or never started streaming."""
        return self.streamed is None or not self.streamed.started

    async def attempt(self, health: EndpointHealth) -> _Answer | _Failed:
        """One try at one endpoint, with the route's timeouts; outcome fed to its breaker."""
        admission = health.breaker.admit()
        if admission is None and not self.forced:
            refused = NoEndpoint(f"{health.endpoint.label} refused by its breaker")
            return _Failed(health, refused, reached=False, sent=False)
        breaker = _Outcomes(health, admission)
        self.tries += 1
        load = health.load
        attempt = load.start()
        started = time.perf_counter()
        try:
            response = await self._send(health.endpoint)
        except asyncio.CancelledError:
            # A hedge won, or the client left. Waiting on a stalled endpoint is its failure.
            if load.stalled_since is not None:
                breaker.record(failed=True, latency_s=time.perf_counter() - started)
            else:
                breaker.abandon()
            load.finished(attempt)
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            breaker.record(failed=True, latency_s=time.perf_counter() - started)
            load.finished(attempt)
            self._raise_if_client_side(exc)
            error = upstream_error(exc, health.endpoint)
            return _Failed(health, error, not isinstance(error, UpstreamUnreachable))
        load.answered(attempt)
        latency = time.perf_counter() - started
        answer = _Answer(health, response, attempt, None, "")
        method = self.request.method
        try:
            length = response.content_length
            if length is not None and length <= self.read_whole_bytes and method != "HEAD":
                answer.body = await response.read()
        except asyncio.CancelledError:
            breaker.abandon()
            answer.release()
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            breaker.record(failed=True, latency_s=latency)
            answer.release()
            return _Failed(health, upstream_error(exc, health.endpoint), True)
        answer.failure = self._judge(health.endpoint, response.status, answer.body)
        breaker.record(failed=bool(answer.failure), latency_s=latency)
        return answer

    async def _send(self, endpoint: Endpoint) -> aiohttp.ClientResponse:
        data: bytes | AsyncIterator[bytes] | None = self.body
        if self.streamed is not None:
            data = self.streamed.chunks()
        assert self.gateway.session is not None, "the client session opens with the app"
        return await self.gateway.session.request(
            self.request.method,
            endpoint.url_for(self.request.raw_path),
            headers=self.headers,
            data=data,
            allow_redirects=False,
            timeout=self.gateway.timeouts[self.route.name],
        )

    def _raise_if_client_side(self, exc: BaseException) -> None:
        """A failed upload is the client's doing (too large, or it left), not the endpoint's."""
        if self.streamed is not None and self.streamed.exceeded:
            limit = self.route.max_body_bytes
            raise RequestBodyTooLarge(f"request body over {limit} bytes", limit=limit) from exc
        if self.streamed is not None and self.streamed.client_failed:
            raise ClientGone("the client broke off its upload") from exc

    def _judge(self, endpoint: Endpoint, status: int, body: bytes | None) -> str:
        """Why an answer counts as the endpoint's failure (status, or body when read), or ""."""
        if status in self.gateway.config.upstreams[endpoint.upstream].breaker.failure_statuses:
            return f"status {status}"
        if body is not None:
            return body_failure(self.route.failure_body, status, body) or ""
        return ""

    def may_try_next(self, outcome: _Answer | _Failed) -> bool:
        """After a failed try: may the request go to the next endpoint?"""
        if not self.resendable():
            return False
        if isinstance(outcome, _Failed) and not outcome.reached:
            return True  # it never reached the endpoint: safe for every call
        return self.retry

    def hedgeable(self) -> bool:
        return self.retry and self.streamed is None

    async def run(self, order: list[Endpoint]) -> _Answer:
        """Try endpoints in ``order`` until one answers well; the last answer or error if none."""
        self._waiting = [self.runtime_health(endpoint) for endpoint in order]
        error: GatewayError | None = None
        hedged = False
        self._start("first")
        try:
            while self._running:
                timeout = None
                if self.hedgeable() and self._waiting and not hedged:
                    slowest = min(h.load.stall_after_s() for h in self._running.values())
                    timeout = max(0.005, slowest / 2)
                done, _ = await asyncio.wait(
                    self._running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if any(h.load.stalled() for h in self._running.values()):
                        hedged = True  # once per request, whether the budget allows it or not
                        if self._start("hedge"):
                            self.request[OUTCOME] = "hedged"
                    continue
                for task in done:
                    self._running.pop(task)
                    outcome = task.result()
                    if isinstance(outcome, _Answer) and not outcome.failure:
                        self._keep(None)
                        return outcome
                    if isinstance(outcome, _Answer):
                        self._keep(outcome)
                        self.maybe_applied |= not _refused(outcome)
                    else:
                        self.maybe_applied |= outcome.reached
                        if error is None or _weight(outcome.error) >= _weight(error):
                            error = outcome.error
                    if self._waiting and not self._running and self.may_try_next(outcome):
                        sent = not isinstance(outcome, _Failed) or outcome.sent
                        self._start("retry" if sent else "first")
            if self._kept is not None:
                kept, self._kept = self._kept, None
                return kept
            assert error is not None
            raise error
        finally:
            self._keep(None)
            for task in self._running:
                task.cancel()
            if self._running:
                leftovers = await asyncio.gather(*self._running, return_exceptions=True)
                for leftover in leftovers:
                    if isinstance(leftover, _Answer):
                        leftover.release()

    def _start(self, kind: str) -> bool:
        """Start a try at the next waiting endpoint; retries and hedges spend budget."""
        if kind != "first":
            allowed = self.runtime.budget.try_spend()
            metric = self.gateway.fleet.metrics.retries
            metric.labels(self.runtime.name, kind, str(allowed).lower()).inc()
            if not allowed:
                log.info("retry_budget_spent", upstream=self.runtime.name, kind=kind)
                return False
        health = self._waiting.pop(0)
        self._running[asyncio.ensure_future(self.attempt(health))] = health
        return True

    def _keep(self, answer: _Answer | None) -> None:
        """Hold on to the latest failed answer (to pass on if nothing better comes)."""
        if self._kept is not None:
            self._kept.release()
        self._kept = answer
        if answer is not None:
            log.info(
                "endpoint_failed",
                request_id=self.request[REQUEST_ID],
                endpoint=answer.health.endpoint.label,
                cause=answer.failure,
            )

    def runtime_health(self, endpoint: Endpoint) -> EndpointHealth:
        health = self.runtime.by_label(endpoint.label)
        assert health is not None, "plans come from the runtime's own endpoints"
        return health


async def _exchange(
    request: web.Request,
    gateway: Gateway,
    route: Route,
    runtime: UpstreamRuntime,
    order: list[Endpoint],
    body: bytes | None,
    retry: bool,
    forced: ModeName | None,
) -> web.StreamResponse:
    exchange = _Exchange(request, gateway, route, runtime, body, retry, forced)
    try:
        answer = await exchange.run(order)
    except NoEndpoint as error:  # nothing was sent: every endpoint's breaker refused
        if route.fallback is not None:
            return await _fall_back(request, gateway, route, body, error.message)
        raise
    except UpstreamError as error:
        request[OUTCOME] = str(error.details.get("cause", ""))
        if route.fallback is not None and (
            _reads(route, request.method) or not exchange.maybe_applied
        ):
            return await _fall_back(request, gateway, route, body, error.message)
        if route.retries == "never" and exchange.maybe_applied:
            error.details["outcome"] = "unknown"
            error.details["advice"] = (
                "the call may have been applied: query its outcome (insurance 5203) or reverse "
                "it (2601); do not send it again"
            )
        raise
    finally:
        request[TRIES] = exchange.tries
    if (
        answer.failure
        and route.fallback is not None
        and (_reads(route, request.method) or not exchange.maybe_applied)
    ):
        answer.release()
        reason = f"{answer.health.endpoint.label} failed: {answer.failure}"
        return await _fall_back(request, gateway, route, body, reason)
    try:
        relayed = await _relay(request, answer)
    finally:
        answer.release()
    if exchange.observed and answer.body is not None and 200 <= answer.response.status < 300:
        gateway.fallbacks.observe(
            fallback_request(request, route, body, ""),
            answer.response.status,
            relayed.headers,
            answer.body,
        )
    return relayed


def _weight(error: GatewayError) -> int:
    """Which error the client hears when every try failed: one that may have been applied
    over one that never reached a site, over a breaker's refusal (the latest among equals)."""
    if isinstance(error, NoEndpoint):
        return 0
    return 1 if isinstance(error, UpstreamUnreachable) else 2


def _refused(answer: _Answer) -> bool:
    """A failed answer that shows the request was not processed: a 503 (the upstream refused
    to start on it) or a failure read from the body (a platform error)."""
    return answer.response.status == 503 or not answer.failure.startswith("status ")


async def _relay(request: web.Request, answer: _Answer) -> web.StreamResponse:
    """Send the winning answer to the client: one write when small, streamed otherwise."""
    upstream = answer.response
    label = answer.health.endpoint.label
    answer_headers = client_response_headers(upstream.raw_headers, request[REQUEST_ID], label)
    request[SERVED_BY] = label
    if answer.body is not None:
        small = web.Response(status=upstream.status, reason=upstream.reason, headers=answer_headers)
        small.body = answer.body
        return small
    response = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=answer_headers
    )
    if request.app[GATEWAY].draining:
        response.force_close()
    try:
        await _to_client(request, response.prepare(request))
        while chunk := await upstream.content.readany():
            await _to_client(request, response.write(chunk))
        await _to_client(request, response.write_eof())
        return response
    except ClientGone:
        _cut(request)
        if not response.prepared:
            raise
        return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        if not response.prepared:
            raise upstream_error(exc, answer.health.endpoint) from exc
        # Headers already went out: cut the connection so the client sees a truncated answer
        # instead of a silently short one.
        request[OUTCOME] = "truncated"
        log.warning(
            "upstream_broke_midstream",
            request_id=request[REQUEST_ID],
            upstream=label,
            cause=type(exc).__name__,
        )
        _cut(request)
        return response


async def _to_client(request: web.Request, write: Any) -> None:
    """Await a write to the client; a failure there is the client's, not the upstream's."""
    try:
        await write
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone("the client went away") from exc


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
