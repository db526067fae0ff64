"""``GET /status``: one worker's view of every upstream, route, the store, journal and incident."""

from __future__ import annotations

import time
from typing import Any

from yarl import URL

from resilgate.admin.models import (
    EndpointView,
    IncidentView,
    ModeView,
    QueueView,
    RouteView,
    SelfPayView,
    Status,
    StoreView,
    UpstreamView,
)
from resilgate.fleet import REPUBLISH_S
from resilgate.health import EndpointHealth
from resilgate.logs import get_logger
from resilgate.ops import Ops
from resilgate.proxy import Gateway
from resilgate.state.records import ForcedMode, QueueStats

log = get_logger("resilgate.admin")


def mode_view(target: str, forced: ForcedMode | None) -> ModeView:
    if forced is None:
        return ModeView(target=target, mode="auto")
    return ModeView(
        target=target,
        mode=forced.mode,
        reason=forced.reason,
        actor=forced.actor,
        set_at=forced.set_at,
        expires_at=forced.expires_at,
    )


def _endpoint(health: EndpointHealth, fleet: dict[str, str], now: float) -> EndpointView:
    probes = health.probes
    endpoint = health.endpoint
    return EndpointView(
        label=endpoint.label,
        url=str(URL(endpoint.base).with_user(None)),  # never a password to viewers
        priority=endpoint.priority,
        read_only=endpoint.read_only,
        down=health.why_down(),
        breaker=health.breaker.state,
        breaker_detail=repr(health.breaker),
        probes=probes.verdict if probes is not None else "unknown",
        probe_detail=repr(probes) if probes is not None else "probes not started",
        share=round(health.share(now), 3),
        fenced=health.fenced,
        fleet=fleet,
    )


def queue_views(stats: list[QueueStats], now: float) -> list[QueueView]:
    return [
        QueueView(
            queue=q.queue,
            open=q.open,
            oldest_age_s=None if q.oldest_open_at is None else round(now - q.oldest_open_at, 3),
            dead=q.dead,
        )
        for q in stats
    ]


async def build_status(gateway: Gateway, ops: Ops) -> Status:
    """Built from this worker's state; the store is read once, for the journal's depth."""
    config, view = gateway.config, gateway.state
    wall, mono = time.time(), time.monotonic()

    def forced(target: str) -> ForcedMode | None:
        return view.mode_of(target) if view is not None else None

    fleet: dict[str, dict[str, str]] = {}
    # Live workers republish every REPUBLISH_S; older verdicts are of workers that are gone.
    fresh_after = wall - 2 * REPUBLISH_S - config.state.refresh_s
    for verdict in view.verdicts if view is not None else ():
        if verdict.at >= fresh_after:
            fleet.setdefault(verdict.endpoint, {})[verdict.replica] = verdict.state
    upstreams = [
        UpstreamView(
            name=name,
            mode=mode_view(name, forced(name)),
            endpoints=[_endpoint(h, fleet.get(h.endpoint.label, {}), mono) for h in rt.endpoints],
        )
        for name, rt in gateway.fleet.runtimes.items()
    ]
    all_down = {
        name: all(h.why_down() for h in rt.endpoints) for name, rt in gateway.fleet.runtimes.items()
    }
    routes = []
    for route in config.routes:
        mode = forced(route.name) or forced(route.upstream)
        routes.append(
            RouteView(
                name=route.name,
                upstream=route.upstream,
                criticality=route.criticality,
                fallback=route.fallback,
                mode=mode.mode if mode is not None else "auto",
                forced_by=mode.actor if mode is not None else None,
                degraded=(mode is not None and mode.mode in ("fallback", "maintenance"))
                or all_down[route.upstream],
            )
        )

    journal: list[QueueView] | None = None
    self_pay: SelfPayView | None = None
    if view is not None:
        try:
            journal = queue_views(await view.store.journal_stats(), wall)
        except Exception as exc:  # the store's health below says why
            log.debug("status_journal_unread", error=f"{type(exc).__name__}: {exc}"[:200])
    if journal is not None:
        # Queues are per upstream: one whose journaling routes are all self-pay holds claims.
        journaling = [
            r
            for r in config.routes
            if (fallback := gateway.fallbacks.of(r)) is not None and fallback.journals
        ]
        claims = {r.upstream for r in journaling if r.fallback == "self-pay"} - {
            r.upstream for r in journaling if r.fallback != "self-pay"
        }
        pending = [q for q in journal if q.queue in claims]
        ages = [q.oldest_age_s for q in pending if q.oldest_age_s is not None]
        self_pay = SelfPayView(
            pending=sum(q.open for q in pending), oldest_age_s=max(ages) if ages else None
        )

    incident: dict[str, Any] = ops.watcher.incident
    return Status(
        replica=gateway.fleet.replica,
        incident=IncidentView(
            level=int(incident.get("level", 0)),
            share=float(incident.get("share", 0.0)),
            requests=float(incident.get("requests", 0.0)),
            since=incident.get("since"),
        ),
        store=StoreView(
            backend=view.store.backend if view is not None else config.state.backend,
            healthy=view.healthy if view is not None else None,
            error=view.error if view is not None else "not open yet",
        ),
        upstreams=upstreams,
        routes=routes,
        journal=journal,
        self_pay=self_pay,
        warnings=list(ops.watcher.warnings),
        drills=ops.drills.running_ids(),
    )
