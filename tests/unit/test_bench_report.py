"""Benchmark figures from timelines, ratios, the summary table and the CI verdict."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import report
from benchmarks.openloop import Sample


def samples(spec: list[tuple[float, float, int, str]]) -> list[Sample]:
    return [Sample(sent, latency, status, by) for sent, latency, status, by in spec]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 99) == 99
    assert report.percentile(values, 99.9) == 100
    assert report.percentile([3.0], 99) == 3
    assert math.isnan(report.percentile([], 50))


def test_failover_figures_around_a_stopped_primary() -> None:
    timeline = samples(
        [
            (0.0, 0.001, 200, "primary"),
            (0.5, 0.001, 200, "primary"),
            (1.0, 2.0, 200, "dr"),  # waited for the timeout, then DR answered
            (1.1, 0.002, 504, ""),  # failed
            (1.2, 0.003, 200, "primary"),  # last primary answer
            (1.4, 0.002, 200, "dr"),
            (7.0, 0.001, 200, "dr"),  # outside the 5 s window
        ]
    )
    figures = report.failover_figures(timeline, event_s=1.0, dr="dr")
    assert figures["requests"] == 7
    assert figures["failed"] == 1
    assert figures["failed_after_event"] == 1
    assert figures["over_100ms"] == 1
    assert figures["max_ms_5s_after"] == 2000.0
    assert figures["p99_ms_5s_after"] == 2000.0
    assert figures["all_on_dr_after_s"] == pytest.approx(0.4)
    assert figures["settled_after_s"] == pytest.approx(2.0)  # the 2 s answer came back at 3.0


def test_a_clean_failover_is_on_dr_at_once_and_settled() -> None:
    timeline = samples([(0.0, 0.001, 200, "primary"), (1.0, 0.002, 200, "dr")])
    figures = report.failover_figures(timeline, event_s=0.9, dr="dr")
    assert figures["all_on_dr_after_s"] == pytest.approx(0.1)
    assert figures["settled_after_s"] == 0.0
    assert figures["failed"] == 0


def test_no_dr_at_the_end_means_never_all_on_dr() -> None:
    timeline = samples([(1.0, 0.002, 200, "dr"), (2.0, 0.002, 200, "primary")])
    assert report.failover_figures(timeline, event_s=0.5, dr="dr")["all_on_dr_after_s"] is None


def test_failback_counts_switches_of_the_majority_per_half_second() -> None:
    spec = [(0.1 * i, 0.001, 200, "primary") for i in range(10)]  # before the kill at 1.0
    spec += [(1.0 + 0.1 * i, 0.001, 200, "dr") for i in range(30)]  # 1.0 .. 3.9
    spec += [(4.0, 0.001, 200, "primary"), (4.1, 0.001, 200, "dr"), (4.2, 0.001, 200, "dr")]
    spec += [(4.5 + 0.1 * i, 0.001, 200, "primary") for i in range(20)]
    figures = report.failback_figures(samples(spec), killed_s=1.0, back_s=3.0, primary="primary")
    assert figures["failback_after_s"] == pytest.approx(1.0)
    assert figures["switches"] == 1
    assert figures["failed"] == 0


def test_flapping_counts_every_switch() -> None:
    spec = [(1.0 + 0.5 * i, 0.001, 200, "dr" if i % 2 == 0 else "primary") for i in range(5)]
    figures = report.failback_figures(samples(spec), killed_s=0.5, back_s=1.2, primary="primary")
    assert figures["switches"] == 4


def runs(resilgate_rps: float, nginx_rps: float = 60000.0) -> list[dict[str, Any]]:
    where = {"workers": 2, "body": "small", "connections": 64}
    return [
        {
            "target": "resilgate",
            "rps": resilgate_rps,
            "p50_ms": 2.0,
            "p99_ms": 9.0,
            "p999_ms": 20.0,
            **where,
        },
        {
            "target": "nginx",
            "rps": nginx_rps,
            "p50_ms": 0.5,
            "p99_ms": 3.0,
            "p999_ms": 5.0,
            **where,
        },
        {
            "target": "passthrough",
            "rps": 8000.0,
            "p50_ms": 1.5,
            "p99_ms": 6.0,
            "p999_ms": 9.0,
            **where,
        },
    ]


def results(resilgate_rps: float, stop_failed: int = 0, stop_max_ms: float = 80.0) -> Any:
    return {
        "steady": {"runs": runs(resilgate_rps)},
        "failover": {
            "kill": {"resilgate": {"failed": 0, "max_ms": 5.0}},
            "stop": {"resilgate": {"failed": stop_failed, "max_ms": stop_max_ms}},
        },
    }


def failing(checks: list[dict[str, Any]]) -> list[str]:
    return [c["check"] for c in checks if not c["ok"]]


def test_ci_passes_a_clean_run() -> None:
    floor_rps = report.THROUGHPUT_FLOOR_VS_NGINX * 60000
    assert failing(report.ci_checks(results(floor_rps + 100), try_timeout_s=2.0)) == []


def test_ci_fails_on_a_failed_request_a_slow_blackhole_or_low_throughput() -> None:
    floor_rps = report.THROUGHPUT_FLOOR_VS_NGINX * 60000
    assert failing(report.ci_checks(results(floor_rps + 100, stop_failed=3), 2.0)) == [
        "stop: no idempotent request fails"
    ]
    assert failing(report.ci_checks(results(floor_rps + 100, stop_max_ms=2251.0), 2.0)) == [
        "stop: worst latency within try timeout + 250 ms"
    ]
    assert failing(report.ci_checks(results(floor_rps - 100), 2.0)) == [
        "throughput resilgate/nginx at or above the floor"
    ]


def test_ci_fails_when_a_figure_is_missing() -> None:
    assert len(failing(report.ci_checks({}, 2.0))) == 4


def test_summary_rows_put_the_proxies_side_by_side_with_ratios() -> None:
    rows = report.steady_rows(runs(6000.0))
    rps = rows[0]
    assert rps["figure"] == "requests/s, 300 B, 2 worker(s), 64 conns"
    assert (rps["resilgate"], rps["nginx"], rps["passthrough"]) == (6000.0, 60000.0, 8000.0)
    assert rps["resilgate/nginx"] == 0.1
    assert rps["resilgate/passthrough"] == 0.75
    assert [r["figure"].split(",")[0] for r in rows[1:]] == ["p50 ms", "p99 ms", "p99.9 ms"]


def test_table_formats_numbers_and_missing_values() -> None:
    lines = report.table([{"a": 12345.6, "b": None, "c": True}, {"a": 0.5, "c": False}])
    assert lines[0] == "| a | b | c |"
    assert lines[2] == "| 12,346 | – | yes |"
    assert lines[3] == "| 0.5 | – | **no** |"
