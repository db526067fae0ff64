"""Scenario 6, degraded paths: what callers wait for while an upstream is down, and how fast
the write journal fills and drains.

- insurance down (both sites ``SIGKILL``ed): latency of a ``self-pay`` answer to a 2207
  settlement (its claim stored first), beside a live 2207 straight to the simulator and
  through the gateway;
- HIS down (both sites ``SIGKILL``ed): latency of a ``stale-cache`` read, beside live reads
  straight to the simulator and through the gateway;
- HIS down: journal appends per second (FHIR creates answered ``202``); then, with the HIS
  back, replays per second with ``replay_rate_per_s`` far above what the store and the HIS
  take; on SQLite (``synchronous=FULL``) and on Redis (AOF, ``appendfsync always``).

Latencies are of one client on one kept-alive connection, each call after the last.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import os
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from benchmarks.procs import Proc, Procs, wait_for
from benchmarks.targets import ADMIN_TOKEN_SHA256, HEALTH
from tests.his_routes import HIS_READ_ROUTE, HIS_WRITE_ROUTE, medication_order
from tests.insurance_calls import FIXMEDINS, envelope, settle_input
from tests.redis_server import RedisServer

CALL = "/fsi/api/callService"
FHIR = "application/fhir+json"
CLINICIAN = "X-Clinician"
TICKETS = "/_resilgate/tickets/"
INSURANCE_ROUTE: dict[str, Any] = {
    "name": "insurance-settlement",
    "upstream": "insurance",
    "criticality": "core",
    "fallback": "self-pay",
    "match": {"path": CALL, "methods": ["POST"], "body": {"field": "infno", "values": ["2207"]}},
    "retries": "never",
    "failure_body": {"format": "insurance_envelope"},
    "timeouts": {"connect_s": 0.5, "total_s": 2.0},
}
STALE_READS = [f"/fhir/Patient/p-{10000 + n}" for n in range(20)]
# Far above what one replayer does: the store and the HIS set the pace, not the pacing.
UNPACED_PER_S = 1_000_000.0
APPEND_CONCURRENCY = 16
REPLAY_DEADLINE_S = 120.0
REPLAY_TARGET_PER_S = 1000  # issue 7: 10,000 entries in under 10 s


@dataclass(frozen=True, slots=True)
class Sizes:
    """How many calls each measurement makes."""

    latency_calls: int
    journal_entries: int

    @classmethod
    def of(cls, full: bool) -> Sizes:
        return cls(2000, 10_000) if full else cls(300, 1000)


# -- figures (pure) --------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (``fraction`` in 0..1)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_figures(latencies_s: Sequence[float]) -> dict[str, float | int]:
    """Count, then p50, p99, max and mean in milliseconds."""
    ordered = sorted(latencies_s)
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def write_span_s(stamps: Sequence[str]) -> float:
    """Seconds from the first to the last of a simulator's ISO write stamps (ms resolution)."""
    if len(stamps) < 2:
        return 0.0
    times = [datetime.fromisoformat(stamp) for stamp in stamps]
    return (max(times) - min(times)).total_seconds()


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def times_direct(measured_ms: float, direct_ms: float) -> str:
    return f"x{measured_ms / direct_ms:.1f} of direct" if direct_ms > 0 else "-"


# -- calls -------------------------------------------------------------------------------------


@dataclass
class Timed:
    """A batch of calls: each one's latency, what was wrong with those that went wrong, wall
    time of the batch."""

    latencies_s: list[float]
    wrong: list[str]
    wall_s: float

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = latency_figures(self.latencies_s)
        figures["per_s"] = per_second(len(self.latencies_s), self.wall_s)
        figures["unexpected"] = len(self.wrong)
        if self.wrong:
            figures["first_unexpected"] = self.wrong[0][:300]
        return figures


# ``call(http, index)``: "" when the answer is the expected one, else what was wrong.
Call = Callable[[aiohttp.ClientSession, int], Awaitable[str]]


async def timed_calls(call: Call, count: int, concurrency: int = 1) -> Timed:
    """``count`` calls, ``concurrency`` at a time, on kept-alive connections."""
    latencies: list[float] = []
    wrong: list[str] = []
    indexes = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def caller(http: aiohttp.ClientSession) -> None:
        for index in indexes:
            started = time.perf_counter()
            try:
                problem = await call(http, index)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            latencies.append(time.perf_counter() - started)
            if problem:
                wrong.append(problem)

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        await asyncio.gather(*(caller(http) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return Timed(latencies, wrong, wall_s)


def expect(
    status: int, degraded: str | None, got: int, headers: Mapping[str, str], body: bytes
) -> str:
    seen = headers.get("X-Resilgate-Degraded")
    return "" if got == status and seen == degraded else f"{got} {seen}: {body[:200]!r}"


# -- processes -------------------------------------------------------------------------------


def gateway_config(
    path: Path, upstreams: dict[str, Any], routes: list[dict[str, Any]], **top: Any
) -> Path:
    """A one-worker gateway's config on loopback port 0; its SQLite store beside ``path``."""
    config = {
        "listeners": {
            "public": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "workers": 1,
        "admin": {"tokens": [{"name": "bench", "role": "viewer", "sha256": ADMIN_TOKEN_SHA256}]},
        "state": {"backend": "sqlite", "path": str(path.with_suffix(".db"))},
        "drain_deadline_s": 2,
        "upstreams": upstreams,
        "include_routes": [],
        "routes": routes,
        **top,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(
    procs: Procs,
    name: str,
    upstreams: dict[str, Any],
    routes: list[dict[str, Any]],
    env: dict[str, str] | None = None,
    **top: Any,
) -> Proc:
    config = gateway_config(procs.workdir / f"{name}.yaml", upstreams, routes, **top)
    return procs.resilgate(name, "serve", "--config", str(config), "--workers", "1", env=env)


def sites(procs: Procs, kind: str) -> tuple[Proc, Proc]:
    """A primary and a DR simulator of ``kind``."""
    return (
        procs.simulator(f"{kind}-primary", kind, "primary"),
        procs.simulator(f"{kind}-dr", kind, "dr"),
    )


def upstream_of(*servers: Proc) -> dict[str, Any]:
    endpoints = [
        {"name": name, "url": server.url(), "priority": rank}
        for rank, (name, server) in enumerate(zip(("primary", "dr"), servers, strict=False))
    ]
    return {"endpoints": endpoints, **HEALTH}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return orjson.loads(answer.read())


def served_requests(server: Proc) -> int:
    """Requests a simulator answered, its probes not counted."""
    stats = get_json(server.url() + "/_sim/stats")
    return int(stats["requests"]) - int(stats["probes"])


def log_events(server: Proc, event: str) -> list[dict[str, Any]]:
    lines = server.log.read_bytes().splitlines()
    records = (orjson.loads(line) for line in lines if line.startswith(b"{"))
    return [r for r in records if r.get("event") == event]


def probed_up(*servers: Proc) -> None:
    """Every server has been probed twice (the probes' rise)."""
    wait_for(
        lambda: all(get_json(s.url() + "/_sim/stats")["probes"] >= 2 for s in servers), 10, "probes"
    )


def kill_and_see_down(procs: Procs, gateway: Proc, *servers: Proc) -> None:
    """``SIGKILL`` the servers; return once the gateway's probes have seen each one down."""
    for server in servers:
        server.signal(signal.SIGKILL)
        procs.stop(server)
    down = len(servers)
    wait_for(lambda: len(log_events(gateway, "probe_down")) >= down, 10, "probes to see down")


async def until(condition: Callable[[], bool], deadline: float, every_s: float) -> bool:
    """Poll ``condition`` until it holds (True) or the monotonic ``deadline`` passes."""
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- insurance down: self-pay ------------------------------------------------------------------


class Msgids:
    """Fresh insurance msgids; their sequence stays below the gateway's own (9000-9999)."""

    def __init__(self) -> None:
        self._sequence = itertools.count(1)

    def __call__(self) -> str:
        return f"{FIXMEDINS}{time.strftime('%Y%m%d%H%M%S')}{next(self._sequence) % 9000:04d}"


def settle(url: str, msgids: Msgids, batch: str, degraded: str | None) -> Call:
    """A 2207 settlement of 12.30 on the test visit, each call its own fee batch."""

    async def call(http: aiohttp.ClientSession, index: int) -> str:
        data = settle_input(12.30, f"{batch}-{index}", acct_used_flag="0")
        body = orjson.dumps(envelope("2207", msgids(), data))
        headers = {"Content-Type": "application/json"}
        async with http.post(url + CALL, data=body, headers=headers) as response:
            answer = await response.read()
            problem = expect(200, degraded, response.status, response.headers, answer)
            if not problem and b'"infcode":"0"' not in answer:
                problem = f"not settled: {answer[:200]!r}"
            return problem

    return call


async def self_pay(procs: Procs, sizes: Sizes) -> dict[str, Any]:
    insurance = sites(procs, "insurance")
    gateway = start_gateway(
        procs, "gw-self-pay", {"insurance": upstream_of(*insurance)}, [INSURANCE_ROUTE]
    )
    probed_up(*insurance)
    msgids, n = Msgids(), sizes.latency_calls
    direct = await timed_calls(settle(insurance[0].url(), msgids, "D", None), n)
    live = await timed_calls(settle(gateway.url("public"), msgids, "L", None), n)
    kill_and_see_down(procs, gateway, *insurance)
    degraded = await timed_calls(settle(gateway.url("public"), msgids, "S", "self-pay"), n)
    return {
        "calls": n,
        "direct_to_simulator": direct.figures(),
        "through_gateway_live": live.figures(),
        "self_pay": degraded.figures(),
    }


# -- HIS down: stale cache ---------------------------------------------------------------------


def fhir_read(url: str, degraded: str | None) -> Call:
    """GETs of ``STALE_READS`` in turn, by one clinician."""

    async def call(http: aiohttp.ClientSession, index: int) -> str:
        path = STALE_READS[index % len(STALE_READS)]
        async with http.get(url + path, headers={CLINICIAN: "dr-bench"}) as response:
            answer = await response.read()
            return expect(200, degraded, response.status, response.headers, answer)

    return call


def cached_copies(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM cache").fetchone()[0])


async def stale_cache(procs: Procs, sizes: Sizes) -> dict[str, Any]:
    his = sites(procs, "his")
    keyring = "bench:" + base64.b64encode(os.urandom(32)).decode()
    gateway = start_gateway(
        procs,
        "gw-stale-cache",
        {"his": upstream_of(*his)},
        [HIS_READ_ROUTE],
        env={"RESILGATE_CACHE_KEYS": keyring},
        fallbacks={"stale_cache": {"identity_header": CLINICIAN}},
    )
    probed_up(*his)
    n = sizes.latency_calls
    direct = await timed_calls(fhir_read(his[0].url(), None), n)
    live = await timed_calls(fhir_read(gateway.url("public"), None), n)
    database = procs.workdir / "gw-stale-cache.db"
    wait_for(lambda: cached_copies(database) >= len(STALE_READS), 10, "every copy kept")
    kill_and_see_down(procs, gateway, *his)
    stale = await timed_calls(fhir_read(gateway.url("public"), "stale-cache"), n)
    return {
        "calls": n,
        "distinct_reads": len(STALE_READS),
        "direct_to_simulator": direct.figures(),
        "through_gateway_live": live.figures(),
        "stale_cache": stale.figures(),
    }


# -- HIS down: journal append; HIS back: replay ------------------------------------------------


def medication_order_bytes(n: int) -> bytes:
    return orjson.dumps(medication_order(n))


def journal_write(url: str, tickets: list[str]) -> Call:
    """POSTs of new medication orders; each one's ticket goes to ``tickets``."""

    async def call(http: aiohttp.ClientSession, index: int) -> str:
        body, headers = medication_order_bytes(index), {"Content-Type": FHIR}
        async with http.post(url + "/fhir/MedicationRequest", data=body, headers=headers) as r:
            answer = await r.read()
            problem = expect(202, "journal", r.status, r.headers, answer)
        if not problem:
            tickets.append(orjson.loads(answer)["ticket"])
        return problem

    return call


def ticket_state(gateway: Proc, ticket: str) -> str:
    state: str = get_json(gateway.url("public") + TICKETS + ticket)["state"]
    return state


async def journal(
    procs: Procs, sizes: Sizes, backend: str, redis_url: str | None = None
) -> dict[str, Any]:
    """Append ``sizes.journal_entries`` writes while the HIS is down, then replay them."""
    his = procs.simulator(f"his-{backend}", "his", "primary")
    state: dict[str, Any] = {"backend": backend, "path": str(procs.workdir / f"{backend}.db")}
    if redis_url is not None:
        state["redis_url"] = redis_url
    options = {"replay_rate_per_s": UNPACED_PER_S, "claim_lease_s": 2, "retry_after_s": 0.5}
    gateway = start_gateway(
        procs,
        f"gw-journal-{backend}",
        {"his": upstream_of(his)},
        [HIS_WRITE_ROUTE],
        state=state,
        fallbacks={"journal": options},
    )
    probed_up(his)
    port = his.port()
    kill_and_see_down(procs, gateway, his)

    n, tickets = sizes.journal_entries, list[str]()
    appended = await timed_calls(
        journal_write(gateway.url("public"), tickets), n, APPEND_CONCURRENCY
    )

    gateway_cpu_s = cpu_seconds(gateway.pid)
    back_at = time.monotonic()
    back = procs.simulator(f"his-{backend}-back", "his", "primary", port)
    deadline = back_at + REPLAY_DEADLINE_S
    first_at: list[float] = []

    def all_answered() -> bool:
        answered = served_requests(back)
        if answered and not first_at:
            first_at.append(time.monotonic())
        return answered >= len(tickets)

    await until(all_answered, deadline, 0.05)
    # The HIS has answered the last one; the gateway records its outcome a moment later.
    await until(lambda: ticket_state(gateway, tickets[-1]) == "applied", deadline, 0.02)
    done_at = time.monotonic()
    gateway_cpu_s = cpu_seconds(gateway.pid) - gateway_cpu_s
    his_cpu_s = cpu_seconds(back.pid)
    log = get_json(back.url() + "/_sim/writes")
    writes = [w for w in log["writes"] if w["kind"] == "MedicationRequest.create"]
    span_s = write_span_s([w["at"] for w in writes])
    keys = sorted(w["key"].rpartition("|")[2] for w in writes)
    return {
        "backend": backend,
        "entries": n,
        "append": {**appended.figures(), "concurrency": APPEND_CONCURRENCY},
        "replay": {
            "applied_at_his": len(writes),
            "duplicates_at_his": len(log["duplicates"]),
            "each_once": keys == sorted(tickets),
            "first_to_last_write_s": round(span_s, 3),
            "per_s": per_second(max(0, len(writes) - 1), span_s),
            "his_back_to_first_write_s": round((first_at or [done_at])[0] - back_at, 3),
            "his_back_to_all_applied_s": round(done_at - back_at, 3),
            # Which side set the pace: CPU seconds each spent from the HIS's return to the end.
            "gateway_cpu_s": round(gateway_cpu_s, 2),
            "his_cpu_s": round(his_cpu_s, 2),
        },
    }


async def journal_on_redis(procs: Procs, sizes: Sizes) -> dict[str, Any]:
    redis = RedisServer(procs.workdir / "redis")
    redis.start()
    try:
        return await journal(procs, sizes, "redis", redis.url)
    finally:
        redis.close()


# -- the scenario ------------------------------------------------------------------------------

Part = Callable[[Procs, Sizes], Awaitable[dict[str, Any]]]
PARTS: dict[str, Part] = {
    "self_pay": self_pay,
    "stale_cache": stale_cache,
    "journal_sqlite": lambda procs, sizes: journal(procs, sizes, "sqlite"),
    "journal_redis": journal_on_redis,
}


async def measure(workdir: Path, full: bool) -> dict[str, Any]:
    """Every figure of scenario 6, with its rows for the summary table."""
    sizes = Sizes.of(full)
    results: dict[str, Any] = {
        "latency_calls": sizes.latency_calls,
        "journal_entries": sizes.journal_entries,
        "concurrency": 1,
    }
    for name, part in PARTS.items():
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        procs = Procs(directory)
        try:
            results[name] = await part(procs, sizes)
        finally:
            procs.close()
    results["summary_rows"] = summary_rows(results)
    return results


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    latencies = [
        ("insurance down: self-pay 2207", "self_pay", "claim stored before the answer"),
        ("HIS down: stale-cache read", "stale_cache", "decrypted copy"),
    ]
    for scenario, name, note in latencies:
        part = results[name]
        for figure in ("p50_ms", "p99_ms"):
            measured, direct = part[name][figure], part["direct_to_simulator"][figure]
            live = part["through_gateway_live"][figure]
            rows.append(
                {
                    "scenario": scenario,
                    "figure": f"{figure.partition('_')[0]} ms",
                    "resilgate": f"{measured:.2f}",
                    "reference": f"{direct:.2f} direct to the simulator",
                    "note": f"{note}; {times_direct(measured, direct)}; live through the "
                    f"gateway {live:.2f}",
                }
            )
    for backend in ("sqlite", "redis"):
        part = results[f"journal_{backend}"]
        append, replay = part["append"], part["replay"]
        rows.append(
            {
                "scenario": f"HIS down: journal append ({backend})",
                "figure": "entries/s",
                "resilgate": f"{append['per_s']:.0f}",
                "reference": "-",
                "note": f"{part['entries']} POSTs, {append['concurrency']} at a time; "
                f"p50 {append['p50_ms']:.1f} ms, p99 {append['p99_ms']:.1f} ms",
            }
        )
        rows.append(
            {
                "scenario": f"HIS back: journal replay ({backend})",
                "figure": "entries/s",
                "resilgate": f"{replay['per_s']:.0f}",
                "reference": f"target {REPLAY_TARGET_PER_S} (10,000 in 10 s)",
                "note": f"{replay['applied_at_his']} of {part['entries']} applied in "
                f"{replay['first_to_last_write_s']:.1f} s; HIS back to all applied "
                f"{replay['his_back_to_all_applied_s']:.1f} s; CPU s meanwhile: gateway "
                f"{replay['gateway_cpu_s']:.1f}, HIS {replay['his_cpu_s']:.1f}",
            }
        )
    return rows


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-degraded-") as tmp:
        figures = asyncio.run(measure(Path(tmp), "--full" in sys.argv))
    sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
