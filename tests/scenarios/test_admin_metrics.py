"""``/metrics`` of a two-worker gateway: every series ops alert on, all workers together."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, Spawner, wait_until_async
from tests.gateway import OPERATOR_TOKEN, VIEWER_TOKEN, start_gateway

ROUTES = [
    {
        "name": "fhir",
        "upstream": "echo",
        "match": {"path_prefix": "/fhir/"},
        "criticality": "core",
        "fallback": "journal",
    },
    {"name": "rest", "upstream": "echo", "match": {"path_prefix": "/"}},
]
SERIES = {
    # requests by route, upstream, endpoint and status class; latency
    "resilgate_requests": {"route", "upstream", "endpoint", "status_class"},
    "resilgate_request_duration_seconds": {"route"},
    "resilgate_breaker_state": {"endpoint", "state"},
    "resilgate_failovers": {"upstream", "from_endpoint", "to_endpoint"},
    "resilgate_retries": {"upstream", "kind", "allowed"},
    "resilgate_retry_budget_available": {"upstream"},
    "resilgate_fallbacks": {"route", "fallback", "outcome"},
    "resilgate_journal_open": {"queue"},
    "resilgate_store_up": set(),
    "resilgate_incident_level": set(),
}
REQUESTS = 200


def workers_seeing(gateway: ServerProcess, target: str) -> int:
    """Workers that logged seeing the forced mode of ``target``."""
    return len(
        {
            r["pid"]
            for r in gateway.log_records()
            if r.get("event") == "mode_seen" and r.get("target") == target
        }
    )


async def send(gateway: ServerProcess, count: int) -> None:
    """``count`` requests, half on each route, each on a new connection so that both workers
    (SO_REUSEPORT) take a share."""
    for n in range(count):
        async with aiohttp.ClientSession() as one:
            path = "/fhir/Patient/1" if n % 2 else "/other"
            async with one.get(gateway.url("public") + path) as response:
                await response.read()


async def test_metrics_of_all_workers_parse_and_hold_every_series(spawn: Spawner) -> None:
    sites = [spawn.simulator("echo", "primary"), spawn.simulator("echo", "dr")]
    endpoints = [
        {"name": site, "url": server.url(), "priority": n}
        for n, (site, server) in enumerate(zip(("primary", "dr"), sites, strict=True))
    ]
    gateway = start_gateway(spawn, {"echo": endpoints}, ROUTES, workers=2)
    admin = gateway.url("admin")
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        await send(gateway, REQUESTS // 2)
        sites[0].kill_group()  # the primary site goes dark: retries, then a failover to dr
        await send(gateway, REQUESTS // 4)
        change = {"mode": "fallback", "reason": "metrics test"}
        async with session.put(admin + "/modes/fhir", json=change, headers=operator) as response:
            assert response.status == 200
        await wait_until_async(
            lambda: workers_seeing(gateway, "fhir") == 2, 5, "both workers to apply the mode"
        )
        await send(gateway, REQUESTS // 4)

        async def scrape() -> dict[str, dict[str, object]]:
            async with session.get(admin + "/metrics", headers=headers) as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                text = await response.text()
            return {family.name: family for family in text_string_to_metric_families(text)}  # type: ignore[misc]

        async def journal_gauges_set() -> bool:
            return "resilgate_journal_open" in await scrape()

        await wait_until_async(journal_gauges_set, 10, "the watcher to export journal depth")
        families = await scrape()
        async with session.get(admin + "/status", headers=headers) as response:
            status = await response.json()

    missing = {name for name in SERIES if name not in families}
    assert not missing, sorted(families)
    for name, labels in SERIES.items():
        family = families[name]
        for sample in family.samples:  # type: ignore[attr-defined]
            assert labels <= set(sample.labels), (name, sample)
    requests = families["resilgate_requests"].samples  # type: ignore[attr-defined]
    total = sum(s.value for s in requests if s.name == "resilgate_requests_total")
    assert total == REQUESTS  # both workers' counts, no more, no less
    by_route = {
        s.labels["route"]: s.value
        for s in families["resilgate_request_duration_seconds"].samples  # type: ignore[attr-defined]
        if s.name.endswith("_count")
    }
    assert by_route == {"fhir": REQUESTS / 2, "rest": REQUESTS / 2}
    dr_states = {
        s.labels["state"]: s.value
        for s in families["resilgate_breaker_state"].samples  # type: ignore[attr-defined]
        if s.labels["endpoint"] == "echo/dr"
    }
    assert dr_states == {"closed": 2.0, "open": 0.0, "half_open": 0.0}  # one per worker
    served = {
        (s.labels["route"], s.labels["fallback"], s.labels["outcome"]): s.value
        for s in families["resilgate_fallbacks"].samples  # type: ignore[attr-defined]
        if s.name == "resilgate_fallbacks_total"
    }
    # Each forced fhir request: the journal fallback declines a read, the notice answers.
    assert served[("fhir", "notice", "served")] >= REQUESTS // 8, served
    failovers = {
        (s.labels["from_endpoint"], s.labels["to_endpoint"]): s.value
        for s in families["resilgate_failovers"].samples  # type: ignore[attr-defined]
        if s.name == "resilgate_failovers_total"
    }
    assert failovers[("echo/primary", "echo/dr")] >= 1, failovers
    workers = {
        replica
        for upstream in status["upstreams"]
        for endpoint in upstream["endpoints"]
        for replica in endpoint["fleet"]
    }
    print(f"{len(families)} families; {total:g} requests counted; workers seen {sorted(workers)}")
