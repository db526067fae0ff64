"""The watcher of one worker: shares its traffic with the fleet; as the fleet's leader, decides
the incident level and early warnings, sends alerts and lifts expired modes.

Every tick (about a second) each worker publishes its traffic window and its breakers' windows
under ``traffic/<replica>`` (a few seconds' time to live, so a worker that died drops out), and
tries the fleet lease ``watcher``. The holder sums all the reports, steps the incident level and
the warnings (:mod:`resilgate.incidents`) from the state kept in ``incident/current``, writes
that document, and only then alerts: a later leader reads what was decided, so nothing is sent
twice. Every worker reads the document back for ``/status`` and its metrics. A store outage
stops all of this (logged once) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import orjson

from resilgate.alerts import AlertSender, cleared_event, incident_event, opened_event, warning_event
from resilgate.config import Breaker, Config
from resilgate.drills import is_drill_mode
from resilgate.fleet import Fleet
from resilgate.incidents import (
    Change,
    EarlyWarning,
    IncidentState,
    WarningChange,
    check_warnings,
    measure,
    newly_open,
    step,
    sum_endpoints,
)
from resilgate.logs import get_logger
from resilgate.metrics import Metrics
from resilgate.state.records import AuditRecord, QueueStats, Verdict
from resilgate.state.store import StateStore, StoreUnavailable
from resilgate.state.view import StateView
from resilgate.traffic import TrafficWindow

log = get_logger("resilgate.watch")
TICK_S = 1.0
LEASE = "watcher"
LEASE_TTL_S = 3.0  # a leader that stops ticking is replaced within this time
TRAFFIC_TTL_S = 5.0
JOURNAL_EVERY_S = 5.0
# Replicas republish their verdicts every 30 s (fleet.REPUBLISH_S): an open verdict older
# than this belongs to a replica that left, and is not announced.
VERDICT_FRESH_S = 60.0
INCIDENT = ("incident", "current")
ACTOR = "resilgate"
# A drill's mode is lifted by its runner (which audits drill.end); the watcher takes over only
# this long after the restore grace, when no worker seems to be left to finish the drill.
DRILL_MODE_SPARE_S = 60.0


def _loads(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


class Watcher:
    """Runs in every worker; ``incident`` and ``warnings`` are what ``/status`` shows."""

    def __init__(
        self,
        config: Config,
        replica: str,
        fleet: Fleet,
        view: Callable[[], StateView | None],
        traffic: TrafficWindow,
        alerts: AlertSender,
        metrics: Metrics,
        *,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.replica = replica
        self.incident: dict[str, Any] = {"level": 0, "share": 0.0, "requests": 0.0, "since": None}
        self.warnings: list[dict[str, Any]] = []
        self.leader = False
        self._fleet = fleet
        self._view = view
        self._traffic = traffic
        self._alerts = alerts
        self._metrics = metrics
        self._tick_s = tick_s
        self._clock = clock
        self._store_ok: bool | None = None

    def __repr__(self) -> str:
        role = "leader" if self.leader else "follower"
        return (
            f"<Watcher {self.replica} {role}, level {self.incident.get('level', 0)} "
            f"share {float(self.incident.get('share', 0.0)):.2f}, {len(self.warnings)} warnings>"
        )

    async def run(self) -> None:
        """Tick until cancelled; give the lease up on the way out."""
        try:
            while True:
                await self.tick()
                await asyncio.sleep(self._tick_s)
        finally:
            view = self._view()
            if self.leader and view is not None:
                with contextlib.suppress(Exception):
                    await view.store.release(LEASE, self.replica)

    async def tick(self) -> None:
        """One round: publish, lead if the lease is ours, read the incident document."""
        view = self._view()
        if view is None:
            return
        now = self._clock()
        store = view.store
        try:
            await self._publish(store, now)
            if await store.lease(LEASE, self.replica, LEASE_TTL_S, now):
                if not self.leader:
                    log.info("watcher_leading", replica=self.replica)
                self.leader = True
                doc = await self._lead(view, now)
            else:
                self.leader = False
                doc = _loads(await store.doc_get(*INCIDENT))
        except StoreUnavailable as exc:  # keep what was last read; the next tick tries again
            self.leader = False
            self._mark(False, str(exc)[:200])
            return
        except Exception:  # a bug: logged, and the next tick tries again
            self.leader = False
            log.exception("watcher_tick_failed", replica=self.replica)
            return
        self._mark(True)
        if doc:
            self._show(doc, now)

    # -- every worker ---------------------------------------------------------------------

    async def _publish(self, store: StateStore, now: float) -> None:
        endpoints: dict[str, dict[str, Any]] = {}
        for runtime in self._fleet.runtimes.values():
            for health in runtime.endpoints:
                failed, slow, calls = health.breaker.window()
                endpoints[health.endpoint.label] = {
                    "failed": failed,
                    "slow": slow,
                    "calls": calls,
                    "state": health.breaker.state,
                }
        report = {"at": now, "traffic": self._traffic.summary(), "endpoints": endpoints}
        await store.doc_put("traffic", self.replica, orjson.dumps(report), ttl_s=TRAFFIC_TTL_S)

    def _show(self, doc: Mapping[str, Any], now: float) -> None:
        keys = ("level", "share", "requests", "since", "window_s", "leader", "at")
        self.incident = {key: doc.get(key) for key in keys}
        self.warnings = [dict(w) for w in doc.get("warnings", [])]
        self._metrics.set_incident(int(doc.get("level", 0)), float(doc.get("share", 0.0)))
        journal = [QueueStats(**queue) for queue in doc.get("journal", [])]
        self._metrics.set_journal(journal, now)

    def _mark(self, ok: bool, error: str = "") -> None:
        if ok != self._store_ok:
            if ok:
                log.info("watcher_store_ok", replica=self.replica)
            else:
                # Once per outage: nothing is measured or alerted until the store is back.
                log.warning("watcher_store_unreachable", replica=self.replica, error=error)
        self._store_ok = ok
        self._metrics.set_store_up(ok)

    # -- the leader -----------------------------------------------------------------------

    async def _lead(self, view: StateView, now: float) -> dict[str, Any]:
        store = view.store
        reports = [_loads(raw) for raw in (await store.doc_list("traffic")).values()]
        prior = _loads(await store.doc_get(*INCIDENT))
        incident = self.config.incident
        measured = measure((r.get("traffic", {}) for r in reports), incident.weights)
        state, change = step(IncidentState.from_json(prior), measured, now, incident)
        active = [EarlyWarning.from_json(w) for w in prior.get("warnings", [])]
        warnings, warning_changes = check_warnings(
            {w.key: w for w in active},
            sum_endpoints(r.get("endpoints", {}) for r in reports),
            self._breaker_of,
            self.config.alerts.warning_fraction,
            now,
        )
        announced, opened = newly_open(prior.get("opened", []), view.verdicts, now, VERDICT_FRESH_S)
        journal, journal_at = prior.get("journal", []), float(prior.get("journal_at", 0.0))
        if now - journal_at >= JOURNAL_EVERY_S:
            try:
                journal = [asdict(queue) for queue in await store.journal_stats()]
                journal_at = now
            except Exception as exc:  # the last stats stay; tried again next tick
                log.debug("journal_stats_unread", error=f"{type(exc).__name__}: {exc}"[:200])
        doc = {
            **state.to_json(),
            "window_s": incident.window_s,
            "warnings": [w.to_json() for w in warnings.values()],
            "opened": sorted(announced),
            "journal": journal,
            "journal_at": journal_at,
            "leader": self.replica,
            "at": now,
        }
        await store.doc_put(*INCIDENT, orjson.dumps(doc))
        # Only now that the document says so: a later leader will not send these again.
        self._alert(change, warning_changes, opened, now)
        try:
            await self._expire_modes(view, now)
        except Exception as exc:  # tried again next tick; the document is written already
            log.warning("mode_expiry_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        return doc

    def _breaker_of(self, label: str) -> Breaker | None:
        upstream, _, endpoint = label.partition("/")
        config = self.config.upstreams.get(upstream)
        if config is None or all(e.name != endpoint for e in config.endpoints):
            return None  # reported by a replica with another configuration
        return config.breaker

    def _alert(
        self,
        change: Change | None,
        warning_changes: list[WarningChange],
        opened: list[Verdict],
        now: float,
    ) -> None:
        gateway = self.replica
        for raised in (c for c in warning_changes if c.raised):
            w = raised.warning
            log.warning("early_warning", endpoint=w.endpoint, kind=w.kind, rate=round(w.rate, 3))
            self._alerts.send(warning_event(w, now, gateway))
        for verdict in opened:
            self._alerts.send(opened_event(verdict, gateway))
        for cleared in (c for c in warning_changes if not c.raised):
            w = cleared.warning
            log.info("warning_cleared", endpoint=w.endpoint, kind=w.kind, reason=cleared.reason)
            self._alerts.send(cleared_event(w, cleared.reason, now, gateway))
        if change is not None:
            log.warning(
                "incident_level_changed",
                level=change.level,
                previous=change.previous,
                share=round(change.share, 3),
                requests=round(change.requests, 1),
            )
            self._alerts.send(incident_event(change, self.config.incident.window_s, gateway))

    async def _expire_modes(self, view: StateView, now: float) -> None:
        """Delete modes past their expiry, each audited as ``mode.expired``; a drill's only
        once its runner should long have lifted it."""
        spare_s = self.config.drills.restore_grace_s + DRILL_MODE_SPARE_S
        for mode in list(view.modes.values()):
            if mode.expires_at is None:
                continue
            if mode.expires_at + (spare_s if is_drill_mode(mode) else 0.0) > now:
                continue
            if not await view.store.delete_mode_if(mode):
                continue  # changed or cleared since the view read it: not ours to lift
            detail = f"mode={mode.mode} set_by={mode.actor} set_reason={mode.reason}"
            record = AuditRecord(now, ACTOR, "mode.expired", mode.target, "expiry reached", detail)
            await view.store.audit_append(record)
            log.info("mode_expired", target=mode.target, mode=mode.mode, set_by=mode.actor)
