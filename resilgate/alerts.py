"""Webhooks to departments: what an alert says, and its delivery off the request path.

Every configured URL has its own bounded queue (the oldest alert is dropped when it is full)
and its own delivery task, which POSTs the alerts as JSON one after the other, in order, each
retried with exponential backoff up to ``max_attempts``. Alerts carry no patient data.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from yarl import URL

from resilgate.config import Alerts
from resilgate.incidents import Change, EarlyWarning
from resilgate.logs import get_logger
from resilgate.state.records import Verdict

log = get_logger("resilgate.alerts")
SIGNATURE = "X-Resilgate-Signature"
EVENT = "X-Resilgate-Event"
USER_AGENT = "resilgate-alerts"
# On shutdown, what is still queued gets one attempt within this time.
CLOSE_DEADLINE_S = 2.0


def backoff_s(attempt: int, config: Alerts) -> float:
    """The wait after failed attempt number ``attempt`` (from 1): doubling, capped."""
    return min(config.backoff_s * 2.0 ** min(attempt - 1, 64), config.max_backoff_s)


def retryable(status: int) -> bool:
    """No answer, a server error, a timeout or throttling may pass later; other 4xx never."""
    return status == 0 or status >= 500 or status in (408, 425, 429)


def signature(secret: str, body: bytes) -> str:
    """The value of ``X-Resilgate-Signature`` for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class _Alert:
    event: str
    body: bytes
    queued_at: float


class _Outbox:
    """The alerts waiting for one webhook URL (not the one being delivered), and counters."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        parsed = URL(url)
        # Only host and port in logs: a webhook's path or query often holds its token.
        self.where = f"{parsed.host}:{parsed.port}"
        self.queue: deque[_Alert] = deque()
        self.size = size
        self.wake = asyncio.Event()
        self.delivered = self.failed = self.dropped = 0

    def __repr__(self) -> str:
        return (
            f"{self.where} {len(self.queue)} queued, {self.delivered} delivered, "
            f"{self.failed} failed, {self.dropped} dropped"
        )


class AlertSender:
    """Sends alerts to every configured webhook; ``send`` never blocks or raises.

    ``run`` delivers until cancelled; ``close`` then gives what is still queued one attempt.
    With the environment variable ``secret_env`` set, every POST is signed (HMAC-SHA256 of
    the body in ``X-Resilgate-Signature: sha256=<hex>``).
    """

    def __init__(self, config: Alerts, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._secret = (os.environ if env is None else env).get(config.secret_env) or None
        self._outboxes = [_Outbox(str(url), config.queue_size) for url in config.webhooks]

    def __repr__(self) -> str:
        signed = "signed" if self._secret else "unsigned"
        return f"<AlertSender {signed}: {'; '.join(map(repr, self._outboxes)) or 'no webhooks'}>"

    def send(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` (a JSON-able dict with an ``event`` name) for every webhook."""
        name = str(event.get("event", "alert"))
        alert = _Alert(name, orjson.dumps(event), time.monotonic())
        for box in self._outboxes:
            if len(box.queue) >= box.size:
                gone = box.queue.popleft()
                box.dropped += 1
                log.warning(
                    "alert_dropped",
                    to=box.where,
                    alert=gone.event,
                    waited_s=round(alert.queued_at - gone.queued_at, 1),
                    note="queue full",
                )
            box.queue.append(alert)
            box.wake.set()

    async def run(self) -> None:
        """Deliver queued alerts until cancelled."""
        if not self._outboxes:
            return
        async with self._session() as session:
            tasks = [asyncio.create_task(self._deliver(session, box)) for box in self._outboxes]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Give the alerts still queued one attempt each within ``CLOSE_DEADLINE_S``, up to a
        webhook's first failure; log what is left."""
        pending = [box for box in self._outboxes if box.queue]
        if not pending:
            return
        async with self._session() as session:
            flushing = [asyncio.create_task(self._flush(session, box)) for box in pending]
            await asyncio.wait(flushing, timeout=CLOSE_DEADLINE_S)
            for task in flushing:
                task.cancel()
            await asyncio.gather(*flushing, return_exceptions=True)
        for box in pending:
            if box.queue:
                log.warning("alerts_undelivered", to=box.where, alerts=len(box.queue))
                box.queue.clear()

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def _deliver(self, session: aiohttp.ClientSession, box: _Outbox) -> None:
        while True:
            while not box.queue:
                box.wake.clear()
                await box.wake.wait()
            alert = box.queue.popleft()
            try:
                await self._attempts(session, box, alert)
            except asyncio.CancelledError:
                box.queue.appendleft(alert)  # for close() to try once more
                raise

    async def _flush(self, session: aiohttp.ClientSession, box: _Outbox) -> None:
        while box.queue:
            alert = box.queue.popleft()
            status, error = await self._post(session, box, alert)
            self._count(box, alert, 1, status, error)
            if error:
                return  # a failing webhook: the rest is logged as undelivered at once

    async def _attempts(self, session: aiohttp.ClientSession, box: _Outbox, alert: _Alert) -> None:
        attempt = 0
        while True:
            attempt += 1
            status, error = await self._post(session, box, alert)
            if not error or attempt >= self.config.max_attempts or not retryable(status):
                self._count(box, alert, attempt, status, error)
                return
            wait_s = backoff_s(attempt, self.config)
            log.info(
                "alert_retry",
                to=box.where,
                alert=alert.event,
                attempt=attempt,
                error=error,
                retry_in_s=round(wait_s, 2),
            )
            await asyncio.sleep(wait_s)

    async def _post(
        self, session: aiohttp.ClientSession, box: _Outbox, alert: _Alert
    ) -> tuple[int, str]:
        """One POST: the answer's status (0 for none) and what went wrong ("" if nothing)."""
        headers = {"Content-Type": "application/json", EVENT: alert.event, "User-Agent": USER_AGENT}
        if self._secret:
            headers[SIGNATURE] = signature(self._secret, alert.body)
        try:
            async with session.post(box.url, data=alert.body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, type(exc).__name__
        return status, "" if 200 <= status < 300 else f"HTTP {status}"

    def _count(self, box: _Outbox, alert: _Alert, attempts: int, status: int, error: str) -> None:
        waited_s = round(time.monotonic() - alert.queued_at, 2)
        if not error:
            box.delivered += 1
            log.info(
                "alert_delivered",
                to=box.where,
                alert=alert.event,
                attempts=attempts,
                status=status,
                after_s=waited_s,
            )
        else:
            box.failed += 1
            log.warning(
                "alert_failed",
                to=box.where,
                alert=alert.event,
                attempts=attempts,
                error=error,
                after_s=waited_s,
            )


# -- what the alerts say ----------------------------------------------------------------------

_LEVEL_EN = {0: "none", 1: "level 1", 2: "level 2", 3: "level 3"}
_LEVEL_ZH = {0: "无", 1: "一级", 2: "二级", 3: "三级"}
_KIND_EN = {"failure_rate": "failure rate", "slow_rate": "slow-call rate"}
_KIND_ZH = {"failure_rate": "失败率", "slow_rate": "慢调用率"}


def _event(name: str, at: float, gateway: str, en: str, zh: str, **fields: Any) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    return {
        "event": name,
        "at": stamp,
        "gateway": gateway,
        **fields,
        "message_en": en,
        "message_zh": zh,
    }


def _pct(rate: float) -> str:
    return f"{rate * 100:.0f}%"


def incident_event(change: Change, window_s: float, gateway: str) -> dict[str, Any]:
    """``incident_level``: the level moved (up at once, down after the calm period)."""
    share, window = _pct(change.share), f"{window_s:g}"
    requests = round(change.requests)
    en = (
        f"Incident {_LEVEL_EN[change.level]} (was {_LEVEL_EN[change.previous]}): {share} of "
        f"weighted requests failed or degraded in the last {window} s ({requests} requests)."
    )
    zh = (
        f"应急响应等级: {_LEVEL_ZH[change.level]} (此前: {_LEVEL_ZH[change.previous]})。"
        f"最近 {window} 秒内 {share} 的加权请求失败或降级 (共 {requests} 次)。"
    )
    return _event(
        "incident_level",
        change.at,
        gateway,
        en,
        zh,
        level=change.level,
        previous=change.previous,
        share=round(change.share, 4),
        requests=round(change.requests, 1),
        window_s=window_s,
    )


def warning_event(warning: EarlyWarning, at: float, gateway: str) -> dict[str, Any]:
    """``early_warning``: an endpoint's rate is climbing towards its breaker's threshold."""
    label, rate = warning.endpoint, _pct(warning.rate)
    threshold, opens = _pct(warning.threshold), _pct(warning.breaker_rate)
    en = (
        f"Early warning: {label} {_KIND_EN[warning.kind]} {rate} over {warning.calls} calls "
        f"(warning at {threshold}, its circuit breaker opens at {opens})."
    )
    zh = (
        f"预警: {label} {_KIND_ZH[warning.kind]} {rate}, 共 {warning.calls} 次调用 "
        f"(预警线 {threshold}, 熔断线 {opens})。"
    )
    return _event("early_warning", at, gateway, en, zh, **_warning_fields(warning))


def cleared_event(warning: EarlyWarning, reason: str, at: float, gateway: str) -> dict[str, Any]:
    """``warning_cleared``: the warning no longer holds; ``reason`` says why."""
    label, rate = warning.endpoint, _pct(warning.rate)
    en = f"Warning cleared: {label} {_KIND_EN[warning.kind]} now {rate} ({reason})."
    why = _REASON_ZH.get(reason, reason)
    zh = f"预警解除: {label} {_KIND_ZH[warning.kind]} 现为 {rate} ({why})。"
    return _event("warning_cleared", at, gateway, en, zh, reason=reason, **_warning_fields(warning))


_REASON_ZH = {
    "rate fell": "比率已回落",
    "too little traffic to tell": "流量过少, 无法判断",
    "breaker no longer closed": "熔断器已接管",
    "endpoint no longer reported": "端点不再上报",
}


def _warning_fields(warning: EarlyWarning) -> dict[str, Any]:
    return {
        "endpoint": warning.endpoint,
        "kind": warning.kind,
        "rate": round(warning.rate, 4),
        "threshold": round(warning.threshold, 4),
        "breaker_rate": warning.breaker_rate,
        "calls": warning.calls,
    }


def opened_event(verdict: Verdict, gateway: str) -> dict[str, Any]:
    """``breaker_opened``: a replica's breaker of an endpoint opened."""
    label, replica = verdict.endpoint, verdict.replica
    en = f"Circuit breaker opened: {label} at {replica}; its traffic goes elsewhere or degrades."
    zh = f"熔断: {label} 的熔断器已在 {replica} 打开, 流量已切换或降级。"
    return _event("breaker_opened", verdict.at, gateway, en, zh, endpoint=label, replica=replica)
