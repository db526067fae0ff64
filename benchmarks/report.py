"""Figures from raw measurements, the CI verdict and the markdown summary. Pure: no I/O."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.openloop import Sample

# resilgate's requests/s over nginx's (2 workers each, 300 B, 64 connections, wrk 4 s) in the
# same run must not fall below this. Measured with `python -m benchmarks run --ci` on the 2-core
# dev machine while other test suites ran beside it, seven runs: 0.051 to 0.112, median 0.067
# (resilgate 2,800-6,300 requests/s, nginx 43,000-67,000). The floor is the lowest less a
# margin for noise on a shared machine; it fails a hot path about 40 % slower than the median.
THROUGHPUT_FLOOR_VS_NGINX = 0.04
# The worst answer in the blackhole (SIGSTOP) scenario may exceed the route's try timeout by
# at most this much (one timed-out try, then the DR answer).
BLACKHOLE_SLACK_S = 0.25
SLOW_S = 0.1
AFTER_EVENT_S = 5.0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1) if math.isfinite(seconds) else math.nan


def failover_figures(samples: Sequence[Sample], event_s: float, dr: str) -> dict[str, Any]:
    """Figures around a failure of the primary at ``event_s`` (seconds from the stream start)
    when ``dr`` labels the answers the DR site served."""
    after = [s for s in samples if s.sent_s >= event_s]
    window = [s for s in after if s.sent_s < event_s + AFTER_EVENT_S]
    latencies = [s.latency_s for s in window]
    # The first send time from which every request was answered by DR.
    dr_from = None
    for sample in reversed(after):
        if sample.failed or sample.served_by != dr:
            break
        dr_from = sample.sent_s
    # When the last answer that was not a quick DR answer came back.
    unsettled = [
        s.sent_s + s.latency_s - event_s
        for s in after
        if s.failed or s.served_by != dr or s.latency_s > SLOW_S
    ]
    return {
        "requests": len(samples),
        "failed": sum(1 for s in samples if s.failed),
        "failed_after_event": sum(1 for s in after if s.failed),
        "over_100ms": sum(1 for s in samples if s.latency_s > SLOW_S),
        "max_ms": _ms(max((s.latency_s for s in samples), default=math.nan)),
        "max_ms_5s_after": _ms(max(latencies, default=math.nan)),
        "p99_ms_5s_after": _ms(percentile(latencies, 99)),
        "all_on_dr_after_s": None if dr_from is None else round(max(0.0, dr_from - event_s), 3),
        "settled_after_s": round(max(unsettled, default=0.0), 3),
    }


def majority_by_bucket(samples: Iterable[Sample], bucket_s: float) -> list[str]:
    """The label that served most answers in each ``bucket_s`` of send time, in time order."""
    buckets: dict[int, list[str]] = {}
    for sample in samples:
        buckets.setdefault(int(sample.sent_s // bucket_s), []).append(sample.served_by)
    return [max(set(b), key=b.count) for _, b in sorted(buckets.items())]


def failback_figures(
    samples: Sequence[Sample], killed_s: float, back_s: float, primary: str
) -> dict[str, Any]:
    """The primary killed at ``killed_s`` and listening again at ``back_s``: how long until it
    served again, and how often the serving endpoint (majority per 0.5 s) switched after the
    failover (1 is a clean failback)."""
    returned = [s.sent_s for s in samples if s.sent_s >= back_s and s.served_by == primary]
    after_kill = [s for s in samples if s.sent_s >= killed_s + 0.05]
    shape = majority_by_bucket(after_kill, 0.5)
    return {
        "requests": len(samples),
        "failed": sum(1 for s in samples if s.failed),
        "failback_after_s": round(returned[0] - back_s, 3) if returned else None,
        "switches": sum(1 for a, b in itertools.pairwise(shape) if a != b),
        "shape": shape,
    }


def find_run(runs: Iterable[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    for run in runs:
        if all(run.get(key) == value for key, value in where.items()):
            return run
    return None


def figure(run: dict[str, Any] | None, key: str) -> float | None:
    value = None if run is None else run.get(key)
    return None if value is None else float(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return round(a / b, 3)


def throughput_ratio(runs: Sequence[dict[str, Any]], workers: int, other: str) -> float | None:
    """resilgate's rps over ``other``'s, small body at 64 connections, same workers."""
    mine = find_run(runs, target="resilgate", workers=workers, body="small", connections=64)
    theirs = find_run(runs, target=other, workers=workers, body="small", connections=64)
    return ratio(figure(mine, "rps"), figure(theirs, "rps"))


def ci_checks(results: dict[str, Any], try_timeout_s: float) -> list[dict[str, Any]]:
    """The conditions ``make bench-ci`` fails on, each with what was measured."""
    checks = []
    failover = results.get("failover", {})
    for scenario in ("kill", "stop"):
        figures = failover.get(scenario, {}).get("resilgate")
        failed = None if figures is None else figures["failed"]
        checks.append(
            {
                "check": f"{scenario}: no idempotent request fails",
                "measured": failed,
                "limit": 0,
                "ok": failed == 0,
            }
        )
    stop = failover.get("stop", {}).get("resilgate")
    worst = None if stop is None else stop["max_ms"]
    limit_ms = round((try_timeout_s + BLACKHOLE_SLACK_S) * 1000, 1)
    checks.append(
        {
            "check": "stop: worst latency within try timeout + 250 ms",
            "measured": worst,
            "limit": limit_ms,
            "ok": worst is not None and worst <= limit_ms,
        }
    )
    measured = throughput_ratio(results.get("steady", {}).get("runs", []), 2, "nginx")
    checks.append(
        {
            "check": "throughput resilgate/nginx at or above the floor",
            "measured": measured,
            "limit": THROUGHPUT_FLOOR_VS_NGINX,
            "ok": measured is not None and measured >= THROUGHPUT_FLOOR_VS_NGINX,
        }
    )
    return checks


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table of ``rows``; columns in first-seen key order."""
    if not rows:
        return []
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


TARGETS = ("resilgate", "nginx", "passthrough")


def steady_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per figure: the three proxies side by side and resilgate's two ratios."""
    rows = []

    def row(title: str, key: str, **where: Any) -> None:
        values = {t: figure(find_run(runs, target=t, **where), key) for t in TARGETS}
        if all(v is None for v in values.values()):
            return
        rows.append(
            {
                "figure": title,
                **values,
                "resilgate/nginx": ratio(values["resilgate"], values["nginx"]),
                "resilgate/passthrough": ratio(values["resilgate"], values["passthrough"]),
            }
        )

    for workers in (1, 2):
        for body in ("small", "large"):
            size = "300 B" if body == "small" else "16 KiB"
            where = {"workers": workers, "body": body, "connections": 64}
            row(f"requests/s, {size}, {workers} worker(s), 64 conns", "rps", **where)
            row(f"CPU µs per request, {size}, {workers} worker(s)", "cpu_us_per_request", **where)
            if workers == 2 and body == "small":
                for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
                    row(f"{name} ms, 300 B, 2 workers, 64 conns", key, **where)
    for key, name in (("added_p50_ms", "p50"), ("added_p99_ms", "p99")):
        row(f"added latency {name} ms over direct, 1 conn", key, connections=1)
    return rows


def failover_rows(failover: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    names = {"kill": "primary SIGKILL", "stop": "primary SIGSTOP"}
    for scenario, name in names.items():
        for target, f in failover.get(scenario, {}).items():
            rows.append(
                {
                    "scenario": name,
                    "proxy": target,
                    "requests": f["requests"],
                    "failed": f["failed"],
                    "over 100 ms": f["over_100ms"],
                    "max ms (5 s after)": f["max_ms_5s_after"],
                    "p99 ms (5 s after)": f["p99_ms_5s_after"],
                    "all on DR after s": f["all_on_dr_after_s"],
                    "settled after s": f["settled_after_s"],
                }
            )
    return rows


def failback_rows(failover: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "proxy": target,
            "requests": f["requests"],
            "failed": f["failed"],
            "primary serves again after s": f["failback_after_s"],
            "endpoint switches": f["switches"],
        }
        for target, f in failover.get("failback", {}).items()
    ]


def summary_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# resilgate benchmarks",
        "",
        f"{machine['cores']} cores, {machine['cpu']}; Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}, {machine['nginx']}, {machine['wrk']}; "
        f"mode: {results['mode']}; {results['started']}.",
        "",
        "## Throughput and latency (wrk, loopback, static nginx upstream)",
        "",
        *table(steady_rows(results.get("steady", {}).get("runs", []))),
    ]
    failover = results.get("failover", {})
    if failover.get("kill") or failover.get("stop"):
        rate = results["config"]["failover_rate_per_s"]
        lines += ["", f"## Failover under {rate} GETs/s (open loop, HIS simulators)", ""]
        lines += table(failover_rows(failover))
    if failover.get("failback"):
        lines += ["", "## Failback after the primary returns", "", *table(failback_rows(failover))]
    for part in ("degraded", "memory", "profile"):
        rows = results.get(part, {}).get("summary_rows")
        if rows:
            lines += ["", f"## {part.capitalize()}", "", *table(rows)]
    checks = results.get("ci", {}).get("checks")
    if checks:
        lines += ["", "## CI checks", "", *table(checks)]
    return "\n".join(lines) + "\n"
