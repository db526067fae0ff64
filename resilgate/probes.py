"""Active checks of each endpoint, apart from real traffic (DOMAIN.md sections 7 and 10.1).

An endpoint has up to two checks (``resilgate.config.Probes``): an HTTP check (is the web tier
up?) and a synthetic transaction acting for the test patient (does the business work?). Each
check counts passes and failures in a row (``CheckState``, no I/O); ``EndpointProbes`` runs
the checks of one endpoint and combines their verdicts.

A check passes when its answer has ``expect_status`` and, for a synthetic check with a
``failure_body`` rule, ``body_failure`` finds no failure in the body. A synthetic check of
format ``insurance_envelope`` also needs ``infcode`` "0": the test patient must succeed, so a
business refusal (unknown visit, suspended person) fails the probe too. Connection errors and
timeouts fail a check.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import aiohttp
import orjson
from multidict import CIMultiDict

from resilgate.config import HttpCheck, Probes, SyntheticCheck
from resilgate.failure_body import body_failure, infcode_is_success, short_text
from resilgate.logs import get_logger
from resilgate.upstream import Endpoint

ProbeVerdict = Literal["unknown", "up", "down"]

PROBE_USER_AGENT = "resilgate-probe/1"
BODY_READ_CAP = 64 * 1024
FIRST_RUN_WITHIN_S = 1.0
INTERVAL_JITTER = 0.1


class CheckState:
    """Rise/fall counting of one check.

    The verdict is "unknown" until ``rise`` passes or ``fall`` failures in a row; after that it
    turns "up" after ``rise`` passes in a row and "down" after ``fall`` failures in a row.
    """

    def __init__(self, name: str, rise: int, fall: int, *, endpoint: str = "") -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.name = name
        self.endpoint = endpoint
        self.rise = rise
        self.fall = fall
        self.verdict: ProbeVerdict = "unknown"
        self.passed_in_row = 0
        self.failed_in_row = 0
        self.last_detail = ""

    @property
    def suspect(self) -> bool:
        """Failing, but fewer than ``fall`` times in a row yet."""
        return self.failed_in_row > 0 and self.verdict != "down"

    def record(self, passed: bool, detail: str) -> ProbeVerdict | None:
        """Count one result; the new verdict when it changed, else None."""
        self.last_detail = detail
        verdict = self.verdict
        if passed:
            self.passed_in_row += 1
            self.failed_in_row = 0
            if self.passed_in_row >= self.rise:
                verdict = "up"
        else:
            self.failed_in_row += 1
            self.passed_in_row = 0
            if self.failed_in_row >= self.fall:
                verdict = "down"
        if verdict == self.verdict:
            return None
        self.verdict = verdict
        return verdict

    def __repr__(self) -> str:
        who = f"{self.endpoint} {self.name}" if self.endpoint else self.name
        state = self.verdict.upper() + (" suspect" if self.suspect else "")
        if self.failed_in_row:
            run = f"{self.failed_in_row} failed in a row"
        elif self.passed_in_row:
            run = f"{self.passed_in_row} passed in a row"
        else:
            return f"<CheckState {who} {state} no result yet>"
        return f"<CheckState {who} {state} {run}: {self.last_detail}>"


def render_body(template: str, now: datetime, seq: int) -> str:
    """A synthetic check's body: ``{msgid_time}``, ``{seq4}`` and ``{inf_time}`` filled in.

    Other braces (the JSON itself) stay as written.
    """
    return (
        template.replace("{msgid_time}", now.strftime("%Y%m%d%H%M%S"))
        .replace("{seq4}", f"{seq % 10000:04d}")
        .replace("{inf_time}", now.strftime("%Y-%m-%d %H:%M:%S"))
    )


def judge(check: HttpCheck, status: int, body: bytes) -> str | None:
    """Why an answer fails ``check``; None when it passes (rules in the module docstring)."""
    if status != check.expect_status:
        return f"status {status}"
    if not isinstance(check, SyntheticCheck) or check.failure_body is None:
        return None
    failure = body_failure(check.failure_body, status, body)
    if failure is not None:
        return failure
    if check.failure_body.format == "insurance_envelope":
        return _test_patient_refused(body)
    return None


def _test_patient_refused(body: bytes) -> str | None:
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "not an insurance envelope"
    if not isinstance(envelope, dict):
        return "not an insurance envelope"
    infcode = envelope.get("infcode")
    if infcode_is_success(infcode):
        return None
    err_msg = envelope.get("err_msg")
    reason = f": {short_text(err_msg)}" if isinstance(err_msg, str) else ""
    code = short_text(str(infcode), 16) if isinstance(infcode, str | int) else "missing"
    return f"infcode {code}{reason}"


def _describe(exc: BaseException) -> str:
    reason = short_text(str(exc))
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > BODY_READ_CAP:
            break  # the rest is dropped with the connection
    return bytes(body[:BODY_READ_CAP])


class EndpointProbes:
    """The checks of one endpoint together.

    ``on_change`` is called after the endpoint's verdict changed. Synthetic bodies get the
    time in the gateway's local time zone (run it with ``TZ`` set to the hospital's) and a
    sequence number that starts at random, so replicas probing in the same second rarely
    share a msgid.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        probes: Probes,
        *,
        on_change: Callable[[EndpointProbes], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_change = on_change
        self._rng = random.Random()
        self._seq = self._rng.randrange(10000)
        self._log = get_logger("resilgate.probes")
        configured = (("http", probes.http), ("synthetic", probes.synthetic))
        self._configs: tuple[tuple[HttpCheck, CheckState], ...] = tuple(
            (check, CheckState(name, check.rise, check.fall, endpoint=endpoint.label))
            for name, check in configured
            if check is not None
        )
        self.checks: tuple[CheckState, ...] = tuple(state for _, state in self._configs)

    @property
    def verdict(self) -> ProbeVerdict:
        """Down if any check is down; up if every check is up; else unknown (also with none)."""
        verdicts = {state.verdict for state in self.checks}
        if "down" in verdicts:
            return "down"
        return "up" if verdicts == {"up"} else "unknown"

    def __repr__(self) -> str:
        checks = ", ".join(f"{s.name} {s.verdict.upper()}" for s in self.checks) or "no checks"
        return f"<EndpointProbes {self.endpoint.label} {self.verdict.upper()} ({checks})>"

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Run every check until cancelled (returns at once when none is configured)."""
        async with asyncio.TaskGroup() as group:
            for check, state in self._configs:
                name = f"probe {self.endpoint.label} {state.name}"
                group.create_task(self._loop(session, check, state), name=name)

    async def _loop(
        self, session: aiohttp.ClientSession, check: HttpCheck, state: CheckState
    ) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._rng.uniform(0, min(check.interval_s, FIRST_RUN_WITHIN_S)))
        while True:
            started = loop.time()
            await self._probe_once(session, check, state)
            jitter = self._rng.uniform(1 - INTERVAL_JITTER, 1 + INTERVAL_JITTER)
            await asyncio.sleep(max(0.0, check.interval_s * jitter - (loop.time() - started)))

    async def _probe_once(
        self, session: aiohttp.ClientSession, check: HttpCheck, state: CheckState
    ) -> None:
        try:
            passed, detail = await self._attempt(session, check)
        except Exception as exc:  # a fault of ours: keep probing, count it as a failure
            passed, detail = False, _describe(exc)
            self._log.error(
                "probe_error", endpoint=self.endpoint.label, check=state.name, error=detail
            )
        before = self.verdict
        change = state.record(passed, detail)
        fields = {"endpoint": self.endpoint.label, "check": state.name, "detail": detail}
        if change == "up":
            self._log.info("probe_up", **fields)
        elif change == "down":
            self._log.warning("probe_down", **fields, failed_in_row=state.failed_in_row)
        elif state.verdict == "up" and state.failed_in_row == 1:
            self._log.info("probe_suspect", **fields)
        if self._on_change is not None and self.verdict != before:
            try:
                self._on_change(self)
            except Exception as exc:
                self._log.error(
                    "probe_on_change_failed", endpoint=self.endpoint.label, error=_describe(exc)
                )

    async def _attempt(self, session: aiohttp.ClientSession, check: HttpCheck) -> tuple[bool, str]:
        """(passed, detail) of one request."""
        headers: CIMultiDict[str] = CIMultiDict()
        data: bytes | None = None
        if isinstance(check, SyntheticCheck):
            headers.extend(check.headers)
            if check.body is not None:
                self._seq = (self._seq + 1) % 10000
                now = datetime.now().astimezone()
                data = render_body(check.body, now, self._seq).encode()
                headers.setdefault("Content-Type", "application/json")
        headers["User-Agent"] = PROBE_USER_AGENT
        headers["X-Request-ID"] = f"probe-{uuid.uuid4().hex[:16]}"
        try:
            async with session.request(
                check.method,
                self.endpoint.url_for(check.path),
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=check.timeout_s),
                allow_redirects=False,
            ) as response:
                status = response.status
                body = await _read_capped(response)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, _describe(exc)
        failure = judge(check, status, body)
        return failure is None, f"status {status}" if failure is None else failure
