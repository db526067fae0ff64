"""Reading wrk's output: the result line the benchmarks' Lua ``done`` hook writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import nginx, wrk

# wrk 4.1.0 against a local server, with the hook (its own summary lines kept as they came).
OUTPUT = """Running 1s test @ http://127.0.0.1:18931/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.96ms  413.04us   4.29ms   76.40%
    Req/Sec     2.04k   117.14     2.27k    72.73%
  2231 requests in 1.10s, 821.37KB read
Requests/sec:   2029.10
Transfer/sec:    747.04KB
BENCH_RESULT {"requests":2231,"duration_us":1099502,"bytes":841087,"errors":{"connect":1,\
"read":2,"write":0,"status":7,"timeout":3},"latency_us":{"p50":890,"p90":1447,"p99":2330,\
"p99.9":3509,"max":4294,"mean":955.1}}
"""


def test_the_hook_line_gives_rate_percentiles_and_errors() -> None:
    result = wrk.parse(OUTPUT)
    assert result.requests == 2231
    assert result.duration_s == 1.1
    assert result.rps == pytest.approx(2029.1, abs=0.1)
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.p999_ms) == (
        0.89,
        1.447,
        2.33,
        3.509,
    )
    assert result.max_ms == 4.294
    assert result.mean_ms == 0.955
    assert result.errors == 6  # connect + read + write + timeout
    assert result.non_2xx == 7


def test_output_without_the_hook_line_is_an_error_that_shows_it() -> None:
    with pytest.raises(ValueError, match="unable to connect"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_the_hook_prints_every_percentile_the_parser_reads() -> None:
    for key in ('"p50"', '"p90"', '"p99"', '"p99.9"', '"max"', '"mean"', '"status"'):
        assert key in wrk.DONE_LUA
    assert wrk.MARK in wrk.DONE_LUA


@pytest.mark.parametrize("size", [nginx.SMALL_BYTES, nginx.LARGE_BYTES])
def test_static_bodies_are_json_of_the_stated_size(size: int) -> None:
    import json

    body = nginx.json_body(size)
    assert len(body) == size
    assert json.loads(body)["resourceType"] == "Patient"


def test_the_reference_proxy_fails_over_like_the_route() -> None:
    conf = nginx.proxy_conf(
        Path("/tmp/x"),
        8080,
        2,
        "127.0.0.1:1",
        "127.0.0.1:2",
        nginx.FailoverTimeouts(connect_s=1.0, total_s=2.0),
        fail_timeout_s=2.0,
    )
    assert "server 127.0.0.1:2 backup;" in conf
    assert "proxy_next_upstream error timeout http_502 http_503;" in conf
    assert "proxy_connect_timeout 1000ms;" in conf
    assert "proxy_read_timeout 2000ms;" in conf
    assert "keepalive 256;" in conf
    assert "daemon off;" in conf
    assert "fail_timeout=2s" in conf
