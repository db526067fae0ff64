"""Metrics: what each method records, the failover definition on a fake clock, and all workers'
values exposed together (real forked processes sharing a metrics directory)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilgate.config import Config, Upstream
from resilgate.fleet import Fleet
from resilgate.health import UpstreamRuntime
from resilgate.metrics import Metrics, traffic_leader
from resilgate.metrics_dir import ENV, prepare
from resilgate.outcomes import RequestOutcome
from resilgate.state.memory import MemoryStore
from resilgate.state.records import ForcedMode, QueueStats
from resilgate.state.view import StateView
from resilgate.upstream import Cluster, clusters_from
from tests.conftest import REPO, wait_until_async

HOLD_DOWN_S = 10.0
RAMP_S = 20.0
OPEN_S = 5.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels (the parser checks it)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def rendered(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return samples(body.decode())


def outcome(
    route: str | None = "his-read",
    served_by: str | None = "his/primary",
    degraded: str | None = None,
    status: int = 200,
    duration_s: float = 0.003,
) -> RequestOutcome:
    upstream = "his" if route else None
    return RequestOutcome(route, "core", upstream, served_by, degraded, status, duration_s, 0.0)


def test_observe_counts_requests_by_route_upstream_endpoint_and_status_class() -> None:
    metrics = Metrics()
    metrics.observe(outcome())
    metrics.observe(outcome(duration_s=0.2))
    metrics.observe(outcome(served_by=None, degraded="journal", status=202))
    metrics.observe(outcome(served_by=None, status=503))
    metrics.observe(outcome(route=None, served_by=None, status=404))
    found = rendered(metrics)
    requests = "resilgate_requests_total"
    labels = {"route": "his-read", "upstream": "his"}
    assert value(found, requests, **labels, endpoint="his/primary", status_class="2xx") == 2
    assert value(found, requests, **labels, endpoint="fallback:journal", status_class="2xx") == 1
    assert value(found, requests, **labels, endpoint="none", status_class="5xx") == 1
    unmatched = {"route": "unmatched", "upstream": "none", "endpoint": "none"}
    assert value(found, requests, **unmatched, status_class="4xx") == 1
    duration = "resilgate_request_duration_seconds"
    assert value(found, f"{duration}_bucket", route="his-read", le="0.001") == 0
    assert value(found, f"{duration}_bucket", route="his-read", le="0.005") == 3
    assert value(found, f"{duration}_bucket", route="his-read", le="0.25") == 4
    assert value(found, f"{duration}_bucket", route="his-read", le="30.0") == 4
    assert value(found, f"{duration}_count", route="his-read") == 4
    assert value(found, f"{duration}_sum", route="his-read") == pytest.approx(0.209)


def test_breaker_state_is_one_for_the_current_state_only() -> None:
    metrics = Metrics()
    metrics.set_breaker("his/primary", "closed")
    metrics.set_breaker("his/primary", "open")
    found = rendered(metrics)
    states = {
        state: value(found, "resilgate_breaker_state", endpoint="his/primary", state=state)
        for state in ("closed", "open", "half_open")
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0}


def test_a_failover_is_a_change_of_leader_and_no_leader_changes_nothing() -> None:
    metrics = Metrics()
    metrics.note_leader("his", "his/primary")  # where traffic starts: no failover
    metrics.note_leader("his", "his/primary")
    metrics.note_leader("his", "his/dr")
    metrics.note_leader("his", None)  # nothing takes traffic for a while
    metrics.note_leader("his", "his/dr")
    metrics.note_leader("his", "his/primary")
    found = rendered(metrics)
    failovers = "resilgate_failovers_total"
    there = {"from_endpoint": "his/primary", "to_endpoint": "his/dr"}
    back = {"from_endpoint": "his/dr", "to_endpoint": "his/primary"}
    assert value(found, failovers, upstream="his", **there) == 1
    assert value(found, failovers, upstream="his", **back) == 1
    assert sum(v for (name, _), v in found.items() if name == failovers) == 2


def test_retry_budget_gauges_show_taken_and_still_available() -> None:
    metrics = Metrics()
    metrics.set_retry_budget("his", 3, 30)
    metrics.set_retry_budget("ins", 12, 10)  # the floor fell with traffic: none left, not -2
    found = rendered(metrics)
    assert value(found, "resilgate_retry_budget_used", upstream="his") == 3
    assert value(found, "resilgate_retry_budget_available", upstream="his") == 27
    assert value(found, "resilgate_retry_budget_available", upstream="ins") == 0


def test_journal_gauges_follow_the_queues_and_zero_those_that_emptied() -> None:
    metrics = Metrics()
    now = 10_000.0
    metrics.set_journal(
        [QueueStats("his-writes", 4, now - 90.0, 1), QueueStats("registrations", 2, now - 5, 0)],
        now,
    )
    found = rendered(metrics)
    assert value(found, "resilgate_journal_open", queue="his-writes") == 4
    assert value(found, "resilgate_journal_oldest_age_seconds", queue="his-writes") == 90
    assert value(found, "resilgate_journal_dead", queue="his-writes") == 1
    metrics.set_journal([QueueStats("his-writes", 0, None, 1)], now + 60)
    found = rendered(metrics)
    assert value(found, "resilgate_journal_open", queue="his-writes") == 0
    assert value(found, "resilgate_journal_oldest_age_seconds", queue="his-writes") == 0
    assert value(found, "resilgate_journal_dead", queue="his-writes") == 1
    assert value(found, "resilgate_journal_open", queue="registrations") == 0
    assert value(found, "resilgate_journal_oldest_age_seconds", queue="registrations") == 0


def test_store_and_incident_gauges() -> None:
    metrics = Metrics()
    metrics.set_store_up(False)
    metrics.set_incident(2, 0.35)
    found = rendered(metrics)
    assert value(found, "resilgate_store_up") == 0
    assert value(found, "resilgate_incident_level") == 2
    assert value(found, "resilgate_incident_share") == pytest.approx(0.35)
    metrics.set_store_up(True)
    assert value(rendered(metrics), "resilgate_store_up") == 1


# -- the traffic leader ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def runtime(clock: FakeClock) -> UpstreamRuntime:
    upstream = Upstream.model_validate(
        {
            "endpoints": [
                {"name": "primary", "url": "http://127.0.0.1:1", "priority": 0},
                {"name": "dr", "url": "http://127.0.0.1:2", "priority": 1},
            ],
            "failback": {"hold_down_s": HOLD_DOWN_S, "ramp_s": RAMP_S, "ramp_start": 0.1},
            "breaker": {"open_s": OPEN_S, "max_open_s": 40, "open_jitter": 0},
        }
    )
    cluster = Cluster.from_config("his", upstream)
    return UpstreamRuntime.build(cluster, upstream, clock=clock, rng=random.Random(0))


def test_the_leader_moves_to_dr_when_the_primary_goes_down_and_back_past_half_its_ramp() -> None:
    clock = FakeClock()
    his = runtime(clock)
    primary, dr = his.endpoints

    def leader() -> str | None:
        return traffic_leader(his.endpoints, clock.now, None)

    assert leader() == "his/primary"
    primary.breaker.trip("test")
    assert leader() == "his/dr"
    clock.now += OPEN_S  # half-open: the hold-down starts
    assert leader() == "his/dr"
    clock.now += HOLD_DOWN_S  # ramping from 10 %
    assert leader() == "his/dr"
    clock.now += RAMP_S * 0.4  # 46 % of the traffic
    assert leader() == "his/dr"
    clock.now += RAMP_S * 0.2  # 64 %
    assert leader() == "his/primary"
    dr.fenced = True
    primary.fenced = True
    assert leader() is None


def test_the_leader_ignores_load_and_follows_a_forced_upstream_mode() -> None:
    clock = FakeClock()
    his = runtime(clock)
    primary = his.endpoints[0]
    primary.load.in_flight = primary.load.max_in_flight  # full for a moment: no failover
    assert traffic_leader(his.endpoints, clock.now, None) == "his/primary"
    assert traffic_leader(his.endpoints, clock.now, "dr") == "his/dr"
    primary.breaker.trip("test")
    assert traffic_leader(his.endpoints, clock.now, "primary") == "his/primary"
    assert traffic_leader(his.endpoints, clock.now, "fallback") is None
    assert traffic_leader(his.endpoints, clock.now, "maintenance") is None


# -- the fleet's wiring ------------------------------------------------------------------------


def fleet_config() -> Config:
    return Config.model_validate(
        {
            "upstreams": {
                "his": {
                    "endpoints": [
                        {"name": "primary", "url": "http://127.0.0.1:1", "priority": 0},
                        {"name": "dr", "url": "http://127.0.0.1:2", "priority": 1},
                    ]
                }
            },
            "routes": [{"name": "his-read", "upstream": "his", "match": {"path_prefix": "/"}}],
        }
    )


def test_fleet_sets_breaker_gauges_and_zero_failovers_at_start_and_follows_transitions() -> None:
    metrics = Metrics()
    fleet = Fleet(fleet_config(), clusters_from(fleet_config()), metrics)
    found = rendered(metrics)
    for endpoint in ("his/primary", "his/dr"):
        assert value(found, "resilgate_breaker_state", endpoint=endpoint, state="closed") == 1
        assert value(found, "resilgate_breaker_state", endpoint=endpoint, state="open") == 0
    for there, back in (("his/primary", "his/dr"), ("his/dr", "his/primary")):
        failover = {"upstream": "his", "from_endpoint": there, "to_endpoint": back}
        assert value(found, "resilgate_failovers_total", **failover) == 0
    fleet.health("his/primary").breaker.trip("test")
    found = rendered(metrics)
    assert value(found, "resilgate_breaker_state", endpoint="his/primary", state="open") == 1
    assert value(found, "resilgate_breaker_state", endpoint="his/primary", state="closed") == 0
    assert value(found, "resilgate_breaker_state", endpoint="his/dr", state="closed") == 1


async def test_fleet_tick_exports_retry_budget_and_counts_a_forced_failover() -> None:
    metrics = Metrics()
    config = fleet_config()
    fleet = Fleet(config, clusters_from(config), metrics)
    view = StateView(MemoryStore())
    running = asyncio.create_task(fleet.run(view))

    async def gauge(name: str, **labels: str) -> float | None:
        return value(rendered(metrics), name, **labels)

    try:
        await wait_until_async(
            lambda: gauge("resilgate_retry_budget_available", upstream="his"),
            what="the retry budget exported",
        )
        assert await gauge("resilgate_retry_budget_used", upstream="his") == 0
        view.modes = {"his": ForcedMode("his", "dr", "drill", "test", time.time(), None)}
        failover = {"upstream": "his", "from_endpoint": "his/primary", "to_endpoint": "his/dr"}
        await wait_until_async(
            lambda: gauge("resilgate_failovers_total", **failover), what="a failover counted"
        )
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# -- all workers together ----------------------------------------------------------------------

# Run in a fresh interpreter: prometheus_client picks file-backed values at its first import.
WORKERS = """
import multiprocessing, os, sys
from pathlib import Path
import orjson
from resilgate import metrics_dir

path = metrics_dir.prepare(Path(sys.argv[1]))
from resilgate.metrics import Metrics, worker_exited
from resilgate.outcomes import RequestOutcome


def worker(n, ready, stop):
    metrics = Metrics()
    for _ in range(n):
        outcome = RequestOutcome("his-read", "core", "his", "his/primary", None, 200, 0.003, 0)
        metrics.observe(outcome)
    metrics.set_breaker("his/primary", "open" if n == 2 else "closed")
    metrics.set_incident(n, n / 10)
    ready.put(os.getpid())
    stop.wait()


if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    ready, stop = context.Queue(), context.Event()
    workers, pids = [], []
    for n in (1, 2):  # one after the other: the second sets the incident level last
        workers.append(context.Process(target=worker, args=(n, ready, stop)))
        workers[-1].start()
        pids.append(ready.get(timeout=30))
    live = Metrics().render()[0].decode()
    stop.set()
    for process in workers:
        process.join(timeout=30)
    worker_exited(pids[1])
    after = Metrics().render()[0].decode()
    sys.stdout.buffer.write(orjson.dumps({"dir": str(path), "live": live, "after": after}))
"""


def python(script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``script`` in a new interpreter without a metrics directory unless ``env`` names one."""
    clean = {k: v for k, v in os.environ.items() if k != ENV} | (env or {})
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=clean,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_workers_metrics_are_exposed_together_and_a_dead_workers_live_gauges_drop(
    tmp_path: Path,
) -> None:
    done = python(WORKERS, str(tmp_path))
    assert done.returncode == 0, done.stderr.decode()
    result = orjson.loads(done.stdout)
    assert Path(result["dir"]).parent == tmp_path
    live, after = samples(result["live"]), samples(result["after"])

    requests = {
        "route": "his-read",
        "upstream": "his",
        "endpoint": "his/primary",
        "status_class": "2xx",
    }
    assert value(live, "resilgate_requests_total", **requests) == 3
    assert value(live, "resilgate_request_duration_seconds_count", route="his-read") == 3
    breaker = {"endpoint": "his/primary"}
    assert value(live, "resilgate_breaker_state", **breaker, state="closed") == 1
    assert value(live, "resilgate_breaker_state", **breaker, state="open") == 1
    assert value(live, "resilgate_incident_level") == 2  # set last
    # Counters keep a dead worker's counts; its live gauges are gone.
    assert value(after, "resilgate_requests_total", **requests) == 3
    assert value(after, "resilgate_breaker_state", **breaker, state="open") == 0
    assert value(after, "resilgate_breaker_state", **breaker, state="closed") == 1
    assert value(after, "resilgate_incident_level") == 1
    assert not Path(result["dir"]).exists(), "the private directory outlives the gateway"


def test_metrics_refuse_a_directory_named_after_prometheus_client_was_imported(
    tmp_path: Path,
) -> None:
    late = (
        "import os, sys, prometheus_client\n"
        f"os.environ[{ENV!r}] = sys.argv[1]\n"
        "from resilgate.metrics import Metrics\n"
        "Metrics()\n"
    )
    done = python(late, str(tmp_path))
    assert done.returncode == 1
    assert b"StartupError: PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported" in (
        done.stderr
    )


# -- the directory -----------------------------------------------------------------------------


def test_prepare_makes_a_private_directory_when_none_is_named(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    path = prepare(tmp_path, environ)
    assert path.is_dir() and path.parent == tmp_path
    assert environ == {ENV: str(path)}


def test_prepare_wipes_an_earlier_runs_values_and_keeps_other_files(tmp_path: Path) -> None:
    named = tmp_path / "metrics"
    named.mkdir()
    (named / "counter_4242.db").write_bytes(b"stale")
    (named / "gauge_livesum_4242.db").write_bytes(b"stale")
    (named / "README").write_text("not ours to delete")
    assert prepare(environ={ENV: str(named)}) == named
    assert sorted(p.name for p in named.iterdir()) == ["README"]


def test_prepare_creates_a_named_directory_that_does_not_exist(tmp_path: Path) -> None:
    named = tmp_path / "run" / "metrics"
    assert prepare(environ={ENV: str(named)}) == named
    assert named.is_dir()


def test_prepare_removes_the_directories_of_gateways_that_died_uncleanly(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tmp_path / f"resilgate-metrics-{dead.stdout.strip()}-abc"
    living = tmp_path / f"resilgate-metrics-{os.getpid()}-def"
    for path in (orphan, living):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"x")
    fresh = prepare(tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([living.name, fresh.name])
