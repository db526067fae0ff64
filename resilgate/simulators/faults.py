"""Fault injection and the ``/_sim`` control API every simulator shares.

``install_faults`` gives an application ``GET /health``, an ``X-Sim-Site`` header on every
response, a fault middleware and these control routes, which faults never touch:

- ``PUT /_sim/fault`` ``{"mode", "latency_ms", "rate", "period_s", "status", "path_prefix"}``
  sets the fault (400 with ``{"error": reason}`` when the body is wrong); ``GET`` shows it,
  ``DELETE`` clears it. Every answer is the active fault with all six fields.
- ``GET /_sim/writes``, ``POST /_sim/reset`` (writes, fault and options back to their start),
  ``GET|PUT /_sim/options`` (the simulator's declared boolean switches).
- ``GET /_sim/stats``: ``in_flight``, ``requests`` (every request outside ``/_sim`` since start)
  and ``probes``, those of them whose ``User-Agent`` starts with ``resilgate-probe``.

Modes: ``refuse`` aborts the connection without an answer; ``hang`` never answers until the
fault changes or the client leaves; ``slow`` waits ``latency_ms`` first; ``error_rate``
answers ``status`` to a ``rate`` share of requests, drawn from an RNG re-seeded with the
simulator's seed whenever a fault is set; ``flap`` fails (``status``) for ``period_s``, then
serves for ``period_s``, starting with failure when set; ``commit_then_hang`` (insurance only)
lets a 2207 settlement commit, then hangs its answer; ``platform_error`` answers a ``rate``
share of requests (default all) with HTTP 200 carrying a platform error in the simulator's own
format, applying nothing: insurance an envelope with ``infcode`` "-1" and a 系统异常 ``err_msg``,
HIS an ``OperationOutcome`` (error, transient); registration and echo have no such format and
answer ``status`` as ``error_rate`` does. ``GET /health`` stays healthy under ``platform_error``
(the web tier is up, the platform behind it fails: what synthetic probes exist to notice).
``path_prefix`` narrows any mode.

Write-log rule: ``writes`` lists, in order, every write that changed the simulator's state,
once per application. A request recognised as a replay of an earlier write (same idempotency
key, same business identifier, same msgid) changes nothing and is listed in ``duplicates``
instead. Rejected requests (4xx, business errors) appear in neither. ``seq`` is one counter
across both lists, so their entries can be merged back into arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from resilgate.simulators import SimulatorOptions
from resilgate.simulators.common import BadRequest, json_response, now_cn, read_json_object

CONTROL_PREFIX = "/_sim/"
FAULT_MODES = (
    "none",
    "refuse",
    "hang",
    "slow",
    "error_rate",
    "flap",
    "commit_then_hang",
    "platform_error",
)
PROBE_AGENT_PREFIX = "resilgate-probe"
_FAULT_FIELDS = {"mode", "latency_ms", "rate", "period_s", "status", "path_prefix"}
_HANG_POLL_S = 0.1


@dataclass(frozen=True)
class Fault:
    """One fault, as set through ``PUT /_sim/fault``."""

    mode: str = "none"
    latency_ms: int = 0
    rate: float = 0.0
    period_s: float = 0.0
    status: int = 503
    path_prefix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "latency_ms": self.latency_ms,
            "rate": self.rate,
            "period_s": self.period_s,
            "status": self.status,
            "path_prefix": self.path_prefix,
        }

    def applies_to(self, path: str) -> bool:
        return self.mode != "none" and (
            self.path_prefix is None or path.startswith(self.path_prefix)
        )


NO_FAULT = Fault()


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number")
    return float(value)


def parse_fault(body: Mapping[str, Any], kind: str) -> Fault:
    """Validate a ``PUT /_sim/fault`` body; ``BadRequest`` says what is wrong."""
    unknown = set(body) - _FAULT_FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    mode = body.get("mode")
    if mode not in FAULT_MODES:
        raise BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}")
    if mode == "commit_then_hang" and kind != "insurance":
        raise BadRequest("commit_then_hang only applies to the insurance simulator")
    latency = _number(body, "latency_ms", 0)
    if latency < 0 or latency != int(latency):
        raise BadRequest("latency_ms must be a whole number >= 0")
    if mode == "slow" and latency == 0:
        raise BadRequest("slow needs latency_ms > 0")
    if mode == "error_rate" and "rate" not in body:
        raise BadRequest("error_rate needs rate")
    rate = _number(body, "rate", 1.0 if mode == "platform_error" else 0.0)
    if not 0.0 <= rate <= 1.0:
        raise BadRequest("rate must be between 0 and 1")
    period = _number(body, "period_s", 0)
    if mode == "flap" and period <= 0:
        raise BadRequest("flap needs period_s > 0")
    status = body.get("status", 503)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise BadRequest("status must be an integer from 400 to 599")
    prefix = body.get("path_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/")):
        raise BadRequest("path_prefix must be a string starting with /")
    return Fault(mode, int(latency), rate, period, status, prefix)


class Action(enum.Enum):
    """What the fault middleware does with one request."""

    SERVE = "serve"
    REFUSE = "refuse"
    HANG = "hang"
    DELAY = "delay"
    FAIL = "fail"
    PLATFORM_ERROR = "platform_error"


class WriteLog:
    """Every write a simulator applied, and every replay it recognised (see module doc)."""

    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []
        self.duplicates: list[dict[str, Any]] = []
        self._seq = 0

    def __repr__(self) -> str:
        return f"<WriteLog {len(self.writes)} applied, {len(self.duplicates)} duplicates>"

    def _entry(self, kind: str, key: str, details: Mapping[str, Any]) -> dict[str, Any]:
        self._seq += 1
        at = now_cn().isoformat(timespec="milliseconds")
        return {"seq": self._seq, "kind": kind, "key": key, "at": at, **details}

    def applied(self, kind: str, key: str, **details: Any) -> None:
        self.writes.append(self._entry(kind, key, details))

    def duplicate(self, kind: str, key: str, **details: Any) -> None:
        self.duplicates.append(self._entry(kind, key, details))

    def clear(self) -> None:
        self.writes.clear()
        self.duplicates.clear()

    def to_json(self) -> dict[str, Any]:
        return {"writes": self.writes, "duplicates": self.duplicates}


class SimControl:
    """The fault, counters, write log and switches of one simulator process."""

    def __init__(self, options: SimulatorOptions, flags: Mapping[str, bool] | None = None) -> None:
        self.options = options
        self.fault = NO_FAULT
        self.writes = WriteLog()
        self.in_flight = 0
        self.requests = 0
        self.probes = 0
        self._flag_defaults = dict(flags or {})
        self.flags = dict(self._flag_defaults)
        self._set_at = time.monotonic()
        self._rng = random.Random(options.seed)
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<SimControl {self.options.kind}/{self.options.site} fault={self.fault.mode} "
            f"{self.in_flight} in flight, {len(self.writes.writes)} writes>"
        )

    def set_fault(self, fault: Fault) -> None:
        self.fault = fault
        self._set_at = time.monotonic()
        self._rng = random.Random(self.options.seed)
        # Wake every hanging request so it re-reads the fault.
        self._changed.set()
        self._changed = asyncio.Event()

    def reset(self) -> None:
        self.set_fault(NO_FAULT)
        self.writes.clear()
        self.flags = dict(self._flag_defaults)

    def decide(self, path: str, now: float) -> Action:
        """What to do with a request for ``path`` at monotonic time ``now``."""
        fault = self.fault
        if not fault.applies_to(path):
            return Action.SERVE
        match fault.mode:
            case "refuse":
                return Action.REFUSE
            case "hang":
                return Action.HANG
            case "slow":
                return Action.DELAY
            case "error_rate":
                return Action.FAIL if self._rng.random() < fault.rate else Action.SERVE
            case "platform_error":
                if path == "/health" or self._rng.random() >= fault.rate:
                    return Action.SERVE
                return Action.PLATFORM_ERROR
            case "flap":
                phase = int((now - self._set_at) / fault.period_s)
                return Action.FAIL if phase % 2 == 0 else Action.SERVE
        return Action.SERVE

    def hang_applies(self, path: str) -> bool:
        """True when a committed 2207 on ``path`` must now hang (``commit_then_hang``)."""
        return self.fault.mode == "commit_then_hang" and self.fault.applies_to(path)

    async def hang(self, request: web.BaseRequest, still: str) -> bool:
        """Hold ``request`` while a ``still`` fault covers it; False if the client left."""
        while self.fault.mode == still and self.fault.applies_to(request.path):
            if _client_gone(request):
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), _HANG_POLL_S)
        return not _client_gone(request)


CONTROL = web.AppKey("sim_control", SimControl)
PlatformError = Callable[[web.Request], Awaitable[web.StreamResponse]]
PLATFORM_ERROR = web.AppKey[PlatformError]("sim_platform_error")


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def unanswered() -> web.Response:
    """A stand-in returned once the client is gone; aiohttp drops it quietly."""
    return web.Response(status=499)


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    control = request.app[CONTROL]
    control.in_flight += 1
    control.requests += 1
    if request.headers.get("User-Agent", "").startswith(PROBE_AGENT_PREFIX):
        control.probes += 1
    try:
        while True:
            action = control.decide(request.path, time.monotonic())
            if action is not Action.HANG:
                break
            if not await control.hang(request, "hang"):
                return unanswered()
        fault = control.fault
        if action is Action.REFUSE:
            if request.transport is not None:
                request.transport.abort()
            return unanswered()
        if action is Action.PLATFORM_ERROR and PLATFORM_ERROR in request.app:
            return await request.app[PLATFORM_ERROR](request)
        if action in (Action.FAIL, Action.PLATFORM_ERROR):
            return json_response(
                {"error": "simulated fault", "mode": fault.mode, "status": fault.status},
                status=fault.status,
            )
        if action is Action.DELAY:
            await asyncio.sleep(fault.latency_ms / 1000)
        return await handler(request)
    finally:
        control.in_flight -= 1


async def _get_fault(request: web.Request) -> web.Response:
    return json_response(request.app[CONTROL].fault.to_json())


async def _put_fault(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    try:
        fault = parse_fault(await read_json_object(request), control.options.kind)
    except BadRequest as exc:
        return json_response({"error": str(exc)}, status=400)
    control.set_fault(fault)
    return json_response(fault.to_json())


async def _delete_fault(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    control.set_fault(NO_FAULT)
    return json_response(NO_FAULT.to_json())


async def _get_writes(request: web.Request) -> web.Response:
    return json_response(request.app[CONTROL].writes.to_json())


async def _get_stats(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    return json_response(
        {"in_flight": control.in_flight, "requests": control.requests, "probes": control.probes}
    )


async def _reset(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    control.reset()
    return json_response({"fault": control.fault.to_json(), "options": control.flags})


async def _get_options(request: web.Request) -> web.Response:
    return json_response(request.app[CONTROL].flags)


async def _put_options(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    try:
        body = await read_json_object(request)
    except BadRequest as exc:
        return json_response({"error": str(exc)}, status=400)
    for name, value in body.items():
        if name not in control.flags:
            known = ", ".join(sorted(control.flags)) or "none"
            return json_response({"error": f"unknown option {name} (known: {known})"}, 400)
        if not isinstance(value, bool):
            return json_response({"error": f"option {name} must be true or false"}, 400)
    control.flags.update(body)
    return json_response(control.flags)


async def _add_site_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Sim-Site"] = request.app[CONTROL].options.site


async def _health(request: web.Request) -> web.Response:
    options = request.app[CONTROL].options
    return json_response({"status": "ok", "kind": options.kind, "site": options.site})


def install_faults(
    app: web.Application,
    options: SimulatorOptions,
    *,
    flags: Mapping[str, bool] | None = None,
    platform_error: PlatformError | None = None,
) -> SimControl:
    """Add ``/health``, ``X-Sim-Site``, the fault middleware and ``/_sim`` to ``app``.

    ``flags`` declares the simulator's boolean switches and their defaults, changed through
    ``PUT /_sim/options`` and read by handlers from ``app[CONTROL].flags``.
    ``platform_error`` answers a request hit by the ``platform_error`` fault in the
    simulator's own format, instead of its handler; without it the fault answers ``status``.
    """
    control = SimControl(options, flags)
    app[CONTROL] = control
    if platform_error is not None:
        app[PLATFORM_ERROR] = platform_error
    app.middlewares.append(fault_middleware)
    app.on_response_prepare.append(_add_site_header)
    app.router.add_get("/health", _health)
    app.router.add_get("/_sim/fault", _get_fault)
    app.router.add_put("/_sim/fault", _put_fault)
    app.router.add_delete("/_sim/fault", _delete_fault)
    app.router.add_get("/_sim/writes", _get_writes)
    app.router.add_get("/_sim/stats", _get_stats)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_get("/_sim/options", _get_options)
    app.router.add_put("/_sim/options", _put_options)
    return control
