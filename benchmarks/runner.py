"""One benchmark run: start the upstreams, measure each proxy, write JSON, markdown and plots."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import nginx, openloop, report, targets, wrk
from benchmarks.procs import REPO, Proc, Procs, group_cpu_s, wait_for


@dataclass(frozen=True)
class Plan:
    """How much of everything a run measures."""

    mode: str  # full | ci
    wrk_s: float
    warmup_s: float
    workers: tuple[int, ...]
    bodies: tuple[str, ...]
    one_connection: bool
    failover_rate_per_s: int
    failover_s: float
    event_at_s: float
    failback: bool
    extra_parts: bool


FULL = Plan("full", 10.0, 2.0, (1, 2), ("small", "large"), True, 500, 10.0, 3.0, True, True)
CI = Plan("ci", 4.0, 1.0, (2,), ("small",), False, 500, 8.0, 2.0, False, False)
TARGETS = ("resilgate", "nginx", "passthrough")
FAILOVER_TARGETS = ("resilgate", "nginx")
PARTS = ("degraded", "memory", "profile")  # modules of their own, run when present


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": importlib.import_module("uvloop").__version__,
        "nginx": nginx.nginx_version(),
        "wrk": wrk.wrk_version(),
        "resilgate_commit": commit or "unknown",
    }


def sim_stats(proc: Proc) -> dict[str, Any]:
    with urllib.request.urlopen(proc.url() + "/_sim/stats", timeout=5) as answer:
        stats: dict[str, Any] = json.loads(answer.read())
        return stats


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def steady(procs: Procs, plan: Plan) -> list[dict[str, Any]]:
    """Scenarios 1 and 2: wrk through each proxy (and directly) to a static nginx upstream."""
    upstream = nginx.start_static(procs, workers=1)
    endpoints = {"primary": upstream.url("primary"), "dr": upstream.url("dr")}
    runs: list[dict[str, Any]] = []

    async def measure(target: str, workers: int, base: str, pgid: int) -> None:
        await wrk.run(base + "/small", procs.workdir, connections=64, duration_s=plan.warmup_s)
        shapes = [(body, 64) for body in plan.bodies]
        if plan.one_connection and workers == 1:
            shapes.append(("small", 1))
        for body, connections in shapes:
            cpu_before = group_cpu_s(pgid)
            result = await wrk.run(
                f"{base}/{body}", procs.workdir, connections=connections, duration_s=plan.wrk_s
            )
            cpu_s = group_cpu_s(pgid) - cpu_before
            runs.append(
                {
                    "target": target,
                    "workers": workers,
                    "body": body,
                    "connections": connections,
                    **result.as_dict(),
                    # The proxy's own processes (the direct call: the static upstream's).
                    "cpu_us_per_request": round(cpu_s * 1e6 / max(result.requests, 1), 1),
                }
            )
            log(
                f"{target} x{workers} {body} c{connections}: {result.rps} rps, "
                f"p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, errors {result.errors}, "
                f"non-2xx {result.non_2xx}"
            )

    if plan.one_connection:
        await measure("direct", 1, upstream.url("primary"), upstream.pid)
    for workers in plan.workers:
        for kind in TARGETS:
            target = targets.start(
                procs, kind, f"{kind}-steady-{workers}w", workers, endpoints, health=False
            )
            try:
                await measure(kind, workers, target.url, target.proc.pid)
            finally:
                procs.stop(target.proc)
    procs.stop(upstream)
    direct = report.find_run(runs, target="direct", connections=1)
    for run in runs:
        if run["connections"] == 1 and direct is not None:
            run["added_p50_ms"] = round(run["p50_ms"] - direct["p50_ms"], 3)
            run["added_p99_ms"] = round(run["p99_ms"] - direct["p99_ms"], 3)
    return runs


def wait_probed(target: targets.Target, sims: dict[str, Proc], before: dict[str, int]) -> None:
    """resilgate's probes have seen every endpoint up (rise = 2 each)."""
    if target.kind != "resilgate":
        return
    wait_for(
        lambda: all(sim_stats(p)["probes"] >= before[n] + 2 for n, p in sims.items()),
        15,
        "probes to see both endpoints",
    )


async def failover(
    procs: Procs, plan: Plan, kind: str, scenario: str, retries: str
) -> tuple[dict[str, Any], openloop.Timeline]:
    """Scenarios 3-5 for one proxy: ``kill``, ``stop`` or ``failback`` of the primary HIS
    simulator under a fixed rate of FHIR reads."""
    sims = {
        "primary": procs.simulator(f"{kind}-{scenario}-primary", "his", "primary"),
        "dr": procs.simulator(f"{kind}-{scenario}-dr", "his", "dr"),
    }
    before = {n: int(sim_stats(p)["probes"]) for n, p in sims.items()}
    target = targets.start(
        procs,
        kind,
        f"{kind}-{scenario}",
        2,
        {n: p.url() for n, p in sims.items()},
        retries=retries,
    )
    primary = sims["primary"]
    loop = asyncio.get_running_loop()
    restarted: list[asyncio.Future[tuple[Proc, float]]] = []

    def start_again() -> tuple[Proc, float]:
        name = f"{kind}-{scenario}-primary-again"
        again = procs.simulator(name, "his", "primary", primary.port())
        return again, time.monotonic()

    def kill() -> None:
        primary.signal(signal.SIGKILL)

    def stop() -> None:
        primary.signal(signal.SIGSTOP)

    def restart() -> None:
        restarted.append(loop.run_in_executor(None, start_again))

    events: dict[float, Callable[[], None]]
    rate, duration = plan.failover_rate_per_s, plan.failover_s
    if scenario == "kill":
        events = {plan.event_at_s: kill}
    elif scenario == "stop":
        events = {plan.event_at_s: stop}
    else:
        rate, duration = 100, 12.0
        events = {1.0: kill, 3.0: restart}
    try:
        wait_probed(target, sims, before)
        url = target.url + "/fhir/Patient/test-0001"
        warm = await openloop.stream(url, target.label, 100, 1.0)
        if any(s.failed for s in warm.samples):
            raise RuntimeError(f"{kind} {scenario}: warm-up requests failed")
        timeline = await openloop.stream(url, target.label, rate, duration, events)
        if restarted:
            timeline.mark("back", (await restarted[0])[1])
    finally:
        if primary.popen.poll() is None:
            primary.signal(signal.SIGCONT)
        again = [f.result()[0] for f in restarted if f.done() and not f.exception()]
        for proc in [target.proc, *sims.values(), *again]:
            if proc in procs.started:
                procs.stop(proc)
    samples, fired = timeline.samples, timeline.events
    if scenario == "failback":
        figures = report.failback_figures(samples, fired["kill"], fired["back"], "primary")
    else:
        figures = report.failover_figures(samples, fired[scenario], "dr")
    figures["rate_per_s"] = rate
    log(f"{kind} {scenario}: {figures}")
    return figures, timeline


def prepare(out: Path) -> Path:
    """``out`` and an empty ``out/work`` for the logs and configs of this run's processes."""
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    return workdir


async def run(out: Path, plan: Plan, retries: str) -> int:
    """Measure everything in ``plan``; write results.json, summary.md and plots to ``out``.
    Returns the exit status: 1 in CI mode when a check failed."""
    workdir = prepare(out)
    began = time.monotonic()
    results: dict[str, Any] = {
        "mode": plan.mode,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "config": {
            **asdict(plan),
            "route_timeouts": asdict(targets.TIMEOUTS),
            "route_retries": retries,
            "resilgate_health": targets.HEALTH,
            "nginx_fail_timeout_s": targets.FAIL_TIMEOUT_S,
        },
        "timings_s": {},
    }
    procs = Procs(workdir)
    timelines: dict[str, openloop.Timeline] = {}
    try:
        t0 = time.monotonic()
        results["steady"] = {"runs": await steady(procs, plan)}
        results["timings_s"]["steady"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        scenarios = ["kill", "stop", *(["failback"] if plan.failback else [])]
        failover_results: dict[str, dict[str, Any]] = {s: {} for s in scenarios}
        for scenario in scenarios:
            for kind in FAILOVER_TARGETS:
                figures, timeline = await failover(procs, plan, kind, scenario, retries)
                failover_results[scenario][kind] = figures
                timelines[f"{scenario}-{kind}"] = timeline
        results["failover"] = failover_results
        results["timings_s"]["failover"] = round(time.monotonic() - t0, 1)
    finally:
        procs.close()
    failed_parts: list[str] = []
    if plan.extra_parts:
        for part in PARTS:
            if importlib.util.find_spec(f"benchmarks.{part}") is None:
                log(f"benchmarks/{part}.py not present: skipped")
                continue
            t0 = time.monotonic()
            (workdir / part).mkdir(exist_ok=True)
            try:
                module = importlib.import_module(f"benchmarks.{part}")
                results[part] = await module.measure(workdir / part, plan.mode == "full")
            except Exception as error:  # the other figures are still worth writing
                log(f"benchmarks/{part}.py failed: {error!r}")
                results[part] = {"error": repr(error)}
                failed_parts.append(part)
            results["timings_s"][part] = round(time.monotonic() - t0, 1)
    results["ci"] = {"checks": report.ci_checks(results, targets.TIMEOUTS.total_s)}
    results["ci"]["passed"] = all(c["ok"] for c in results["ci"]["checks"])
    from benchmarks import plots

    results["plots"] = plots.write_all(out, timelines)
    raw = {
        name: {"events": t.events, "samples": [asdict(s) for s in t.samples]}
        for name, t in timelines.items()
    }
    (out / "timelines.json").write_text(json.dumps(raw) + "\n")
    results["timings_s"]["total"] = round(time.monotonic() - began, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    summary = report.summary_markdown(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    for check in results["ci"]["checks"]:
        print(
            f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']}: "
            f"measured {check['measured']}, limit {check['limit']}"
        )
    log(
        f"wrote {out}/results.json, summary.md, timelines.json and {len(results['plots'])} plots "
        f"in {results['timings_s']['total']} s"
    )
    if plan.mode == "ci" and not results["ci"]["passed"]:
        return 1
    return 1 if failed_parts else 0


def main_run(out: Path, ci: bool, retries: str) -> int:
    import uvloop

    return uvloop.run(run(out.resolve(), CI if ci else FULL, retries))


if __name__ == "__main__":
    sys.exit(main_run(Path("benchmarks/results"), False, "by_method"))
