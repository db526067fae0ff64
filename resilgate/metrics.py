"""Prometheus metrics of one worker, in its own registry (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """The counters the engine updates; exposed by the admin API."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.breaker_transitions = Counter(
            "resilgate_breaker_transitions",
            "Circuit breaker state changes, by endpoint and new state.",
            ["endpoint", "state"],
            registry=self.registry,
        )
        self.retries = Counter(
            "resilgate_retries",
            "Retries and hedges on another endpoint, by upstream and whether the budget allowed.",
            ["upstream", "kind", "allowed"],
            registry=self.registry,
        )
        self.no_endpoint = Counter(
            "resilgate_no_endpoint",
            "Requests no endpoint could take (all down, fenced or full), by route.",
            ["route"],
            registry=self.registry,
        )
        self.probe_changes = Counter(
            "resilgate_probe_verdicts",
            "Probe verdict changes, by endpoint and new verdict.",
            ["endpoint", "verdict"],
            registry=self.registry,
        )

        self.fallbacks = Counter(
            "resilgate_fallbacks",
            "Fallback answers by route, fallback and outcome (served, declined, failed, "
            "observe_skipped).",
            ["route", "fallback", "outcome"],
            registry=self.registry,
        )
        self.replays = Counter(
            "resilgate_replays",
            "Journal entries replayed, by queue and how they ended.",
            ["queue", "state"],
            registry=self.registry,
        )

    def __repr__(self) -> str:
        return f"<Metrics {len(list(self.registry.collect()))} families>"
