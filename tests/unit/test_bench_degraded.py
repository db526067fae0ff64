"""The pure figures of the degraded-path, memory and profile benchmarks: percentiles, replay
spans, memory per connection, and reading py-spy's collapsed stacks."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.degraded import latency_figures, per_second, percentile, write_span_s
from benchmarks.memory import per_connection_kib, read_answer
from benchmarks.profile import Profile, below, calls, frame_name, in_files


def test_percentiles_are_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_latency_figures_are_in_milliseconds_whatever_the_order() -> None:
    figures = latency_figures([0.003, 0.001, 0.002, 0.010])
    assert figures == {"n": 4, "p50_ms": 2.0, "p99_ms": 10.0, "max_ms": 10.0, "mean_ms": 4.0}


def test_the_replay_span_runs_from_the_first_write_to_the_last() -> None:
    stamps = [
        "2026-11-24T20:00:01.250+08:00",
        "2026-11-24T20:00:00.750+08:00",
        "2026-11-24T20:00:03.000+08:00",
    ]
    assert write_span_s(stamps) == 2.25
    assert write_span_s(stamps[:1]) == 0.0
    assert per_second(9, 2.25) == 4.0
    assert per_second(5, 0.0) == 0.0


def test_memory_per_connection_is_the_growth_of_all_workers() -> None:
    low = {"rss_kib_per_worker": [50_000, 52_000]}
    high = {"rss_kib_per_worker": [70_000, 72_000]}
    assert per_connection_kib(low, high, 4000) == 10.0


def test_an_answer_is_read_to_the_end_of_its_body() -> None:
    async def read() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + b"HTTP/1.1 ...")
        return await read_answer(reader), await reader.readexactly(4)

    assert asyncio.run(read()) == (200, b"HTTP")


RAW = """\
_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118);\
access_log (resilgate/app.py:114);meth (structlog/_native.py:172) 30
_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118);\
access_log (resilgate/app.py:112);Metrics.observe (resilgate/metrics.py:198);\
MmapedValue.inc (prometheus_client/values.py:116) 20
_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118);\
StreamWriter._write (aiohttp/http_writer.py:80) 50
Thread._bootstrap (threading.py:1002);_connection_worker_thread (aiosqlite/core.py:59) 40
"""


def test_collapsed_stacks_give_own_time_and_time_with_callees_of_the_main_thread() -> None:
    profile = Profile.parse(RAW.splitlines())
    assert profile.total == 100 and profile.other_threads == 40
    assert profile.top_own(2) == [
        {"function": "StreamWriter._write (aiohttp/http_writer.py)", "self_pct": 50.0},
        {"function": "meth (structlog/_native.py)", "self_pct": 30.0},
    ]
    assert profile.within()["access_log (resilgate/app.py)"] == 50  # once per stack
    assert profile.areas()["metrics (prometheus_client)"] == 20.0
    assert profile.percent(profile.matching(below("access_log", "structlog/"))) == 30.0
    assert profile.matching(calls("Metrics.observe")) == 20
    assert profile.matching(in_files("aiohttp/")) == 50
    assert profile.matching(below("Metrics.observe", "structlog/")) == 0


def test_frame_names_lose_their_line_numbers_only() -> None:
    assert frame_name("meth (structlog/_native.py:172)") == "meth (structlog/_native.py)"
    assert frame_name("<module> (<frozen runpy>)") == "<module> (<frozen runpy>)"
