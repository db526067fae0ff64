"""wrk runs: throughput and latency percentiles, read from a Lua ``done`` hook's JSON line."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

MARK = "BENCH_RESULT "
# wrk calls done() once with the merged latency histogram (microseconds).
DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p99.9":%d,"max":%d,"mean":%.1f}}\\n',
    "%MARK%", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
""".replace("%MARK%", MARK)


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in milliseconds."""

    requests: int
    duration_s: float
    rps: float
    errors: int
    non_2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(stdout: str) -> WrkResult:
    """Read the result line the Lua hook wrote among wrk's own output."""
    for line in stdout.splitlines():
        if line.startswith(MARK):
            data = orjson.loads(line[len(MARK) :])
            break
    else:
        raise ValueError(f"no {MARK.strip()} line in wrk output:\n{stdout[-2000:]}")
    errors = data["errors"]
    latency = data["latency_us"]
    duration_s = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        duration_s=round(duration_s, 3),
        rps=round(data["requests"] / duration_s, 1) if duration_s > 0 else 0.0,
        errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        non_2xx=errors["status"],
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p99.9"] / 1000,
        max_ms=latency["max"] / 1000,
        mean_ms=round(latency["mean"] / 1000, 3),
    )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (make bench installs it)")
    return found


def wrk_version() -> str:
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].split(" [")[0] if lines else "unknown"  # "wrk debian/4.1.0-3+b2 [epoll] ..."


async def run(
    url: str, workdir: Path, *, connections: int, duration_s: float, threads: int = 2
) -> WrkResult:
    """``wrk`` against ``url``; bounded by ``duration_s`` (and killed 30 s after it)."""
    script = workdir / "bench-done.lua"
    if not script.exists():
        script.write_text(DONE_LUA)
    argv = [
        wrk_binary(),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration_s + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return parse(out.decode(errors="replace"))
