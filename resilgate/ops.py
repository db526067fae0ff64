"""One worker's ops machinery next to its gateway: traffic counting, the watcher (incident
level, early warning, alerts, mode expiry) and drills."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from resilgate.alerts import AlertSender
from resilgate.drills import DrillRunner
from resilgate.outcomes import RequestOutcome
from resilgate.proxy import Gateway
from resilgate.state.store import StateStore
from resilgate.traffic import TrafficWindow
from resilgate.watch import Watcher


@dataclass
class Ops:
    """Built at start-up with the gateway; reached through the public app's ``OPS`` key."""

    traffic: TrafficWindow
    alerts: AlertSender
    watcher: Watcher
    drills: DrillRunner

    def record(self, outcome: RequestOutcome) -> None:
        """Every answered request: the incident window and running drills count it."""
        self.traffic.record(outcome)
        self.drills.record(outcome)

    def __repr__(self) -> str:
        return f"<Ops {self.watcher!r} {self.drills!r}>"


OPS = web.AppKey("ops", Ops)


def build_ops(gateway: Gateway) -> Ops:
    """A worker's ops machinery, tied to its gateway."""
    config = gateway.config

    def store() -> StateStore | None:
        return gateway.state.store if gateway.state is not None else None

    gateway.fleet.metrics.expect_queues(gateway.replayer.queues)
    traffic = TrafficWindow(config.incident.window_s)
    alerts = AlertSender(config.alerts)
    watcher = Watcher(
        config,
        gateway.fleet.replica,
        gateway.fleet,
        lambda: gateway.state,
        traffic,
        alerts,
        gateway.fleet.metrics,
    )
    drills = DrillRunner(config, gateway.fleet.replica, store)
    return Ops(traffic, alerts, watcher, drills)
