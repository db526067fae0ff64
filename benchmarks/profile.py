"""Where a resilgate worker's CPU goes at steady state: py-spy samples of a one-worker
gateway under wrk load (64 connections, GET of 300 B from the static nginx upstream, the
route and endpoints of scenario 1), beside CPU time per request of the gateway and of the
bare aiohttp pass-through proxy measured the same way.

Only the event loop's thread is counted: py-spy takes a thread blocked on a queue (aiosqlite's
worker waiting for work) for a busy one. ``--gil`` would hide that thread too, but also the
loop's own system calls that release the GIL, such as writing log lines to a file.

py-spy stops the process for each sample, and a stop lands when a system call returns, so code
that makes many cheap ones looks costlier than it is (prometheus-client's ``os.getpid()`` on
every metric update: several % of samples, no measurable CPU when removed). Take the shares as
where to look, and measure a change by CPU time per request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import nginx, targets, wrk
from benchmarks.procs import Procs

SAMPLES_PER_S = 250
CONNECTIONS = 64
OWN_CODE = ("resilgate/", "fallbacks/")
OTHER_THREAD = "Thread._bootstrap "  # the outermost frame of every thread but the main one
# Package of a frame's file -> the area it is counted in; the first match wins.
AREAS = (
    ("aiohttp/http_writer.py", "socket writes (aiohttp http_writer)"),
    ("aiohttp/web_", "aiohttp server"),
    ("aiohttp/client", "aiohttp client"),
    ("aiohttp/connector.py", "aiohttp client"),
    ("aiohttp/", "aiohttp other"),
    ("structlog/", "logging (structlog)"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("resilgate/", "resilgate"),
    ("fallbacks/", "resilgate"),
    ("asyncio/", "asyncio and uvloop"),
    ("uvloop/", "asyncio and uvloop"),
    ("yarl/", "yarl and multidict"),
    ("multidict/", "yarl and multidict"),
)
Predicate = Callable[[list[str]], bool]


def calls(*functions: str) -> Predicate:
    """A stack with one of ``functions`` on it (``"Metrics.observe"``)."""
    starts = tuple(f"{name} (" for name in functions)
    return lambda stack: any(frame.startswith(starts) for frame in stack)


def in_files(marker: str) -> Predicate:
    """A stack with a frame in a file whose path contains ``marker``."""
    return lambda stack: any(marker in frame for frame in stack)


def below(caller: str, *markers: str) -> Predicate:
    """A stack where ``caller`` calls, directly or not, code in a file whose path contains
    one of ``markers``."""
    start = f"{caller} ("

    def test(stack: list[str]) -> bool:
        for index, frame in enumerate(stack):
            if frame.startswith(start):
                return any(m in f for f in stack[index + 1 :] for m in markers)
        return False

    return test


# Parts of the hot path worth watching (share of samples, callees included).
WATCH: tuple[tuple[str, Predicate], ...] = (
    ("access log line (access_log's logging)", below("access_log", "structlog/", "/logs.py")),
    ("every log line (structlog)", in_files("structlog/")),
    ("Metrics.observe", calls("Metrics.observe")),
    ("every metric update (prometheus_client)", in_files("prometheus_client/")),
    ("Ops.record (TrafficWindow, drills)", calls("Ops.record")),
    ("endpoint choice (candidates, plan)", calls("EndpointHealth.candidate", "plan")),
    ("header filtering (resilgate/headers.py)", in_files("resilgate/headers.py")),
    ("attempt task and asyncio.wait (_Exchange.run)", below("_Exchange.run", "asyncio/")),
    ("upstream request (aiohttp client)", below("_Exchange._send", "aiohttp/")),
    ("answer to the client (finish_response)", calls("RequestHandler.finish_response")),
)


# Parts of resilgate's own that the summary shows (the aiohttp hops are the bare proxy's too).
SUMMARY_WATCH = (
    "access log line (access_log's logging)",
    "Metrics.observe",
    "attempt task and asyncio.wait (_Exchange.run)",
    "endpoint choice (candidates, plan)",
    "header filtering (resilgate/headers.py)",
)


# -- collapsed stacks (pure) -------------------------------------------------------------------


def frame_name(frame: str) -> str:
    """``meth (aiohttp/web_app.py:12)`` -> ``meth (aiohttp/web_app.py)`` (py-spy already
    shortens paths to their package)."""
    head, colon, line = frame.rpartition(":")
    return f"{head})" if colon and line.rstrip(")").isdigit() else frame


def area_of(frame: str) -> str:
    for marker, area in AREAS:
        if marker in frame:
            return area
    return "other (stdlib, C)"


@dataclass
class Profile:
    """py-spy's raw (collapsed) output: stacks outermost first, each with its sample count."""

    stacks: list[tuple[list[str], int]] = field(default_factory=list)
    other_threads: int = 0  # samples of threads other than the main one, left out

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        profile = cls()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if stack.startswith(OTHER_THREAD):
                profile.other_threads += int(count)
                continue
            profile.stacks.append(([frame_name(f) for f in stack.split(";")], int(count)))
        return profile

    @classmethod
    def read(cls, path: Path) -> Profile:
        with path.open() as lines:
            return cls.parse(lines)

    @property
    def total(self) -> int:
        return sum(count for _, count in self.stacks)

    def percent(self, count: int) -> float:
        return round(100.0 * count / self.total, 1) if self.total else 0.0

    def own_time(self) -> Counter[str]:
        """Samples per function at the top of the stack (its own time)."""
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            counts[frames[-1]] += count
        return counts

    def within(self) -> Counter[str]:
        """Samples per function anywhere on the stack (its time with its callees')."""
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            for name in set(frames):
                counts[name] += count
        return counts

    def matching(self, predicate: Predicate) -> int:
        return sum(count for frames, count in self.stacks if predicate(frames))

    def areas(self) -> dict[str, float]:
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            counts[area_of(frames[-1])] += count
        return {area: self.percent(n) for area, n in counts.most_common()}

    def top_own(self, n: int) -> list[dict[str, Any]]:
        return [
            {"function": name, "self_pct": self.percent(count)}
            for name, count in self.own_time().most_common(n)
        ]

    def top_own_code(self, n: int) -> list[dict[str, Any]]:
        """Our functions by time with callees, the outermost frames (middlewares) left out."""
        within, own = self.within(), self.own_time()
        ours = [
            (name, count)
            for name, count in within.most_common()
            if any(code in name for code in OWN_CODE) and self.percent(count) < 30
        ]
        return [
            {
                "function": name,
                "inclusive_pct": self.percent(count),
                "self_pct": self.percent(own[name]),
            }
            for name, count in ours[:n]
        ]

    def watched(self) -> dict[str, float]:
        return {label: self.percent(self.matching(test)) for label, test in WATCH}


# -- measuring ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_request(pid: int, url: str, workdir: Path, seconds: float) -> dict[str, Any]:
    """A wrk run against ``url``, and the CPU time ``pid`` spent per request meanwhile."""
    before = cpu_seconds(pid)
    result = await wrk.run(url, workdir, connections=CONNECTIONS, duration_s=seconds)
    spent = cpu_seconds(pid) - before
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors + result.non_2xx,
        "cpu_us_per_request": round(spent / max(1, result.requests) * 1e6, 1),
    }


async def sample(pid: int, seconds: float, out: Path) -> Profile:
    """py-spy's samples of ``pid`` for ``seconds``."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [binary, "record", "--pid", str(pid), "--duration", str(round(seconds))]
    argv += ["--rate", str(SAMPLES_PER_S), "--format", "raw", "--output", str(out)]
    spy = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        said, _ = await asyncio.wait_for(spy.communicate(), seconds + 30)
    except TimeoutError:
        spy.kill()
        await spy.wait()
        raise
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {said.decode()[-1000:]}")
    return Profile.read(out)


async def measure(workdir: Path, full: bool) -> dict[str, Any]:
    """The profile of a one-worker gateway at steady state, with its summary rows."""
    seconds = 10.0 if full else 5.0
    procs = Procs(workdir)
    results: dict[str, Any] = {"seconds": seconds, "connections": CONNECTIONS, "workers": 1}
    try:
        upstream = nginx.start_static(procs, workers=1)
        endpoints = {"primary": upstream.url("primary"), "dr": upstream.url("dr")}
        for kind in ("passthrough", "resilgate"):
            target = targets.start(procs, kind, f"{kind}-profiled", 1, endpoints, health=False)
            url = target.url + "/small"
            await wrk.run(url, workdir, connections=CONNECTIONS, duration_s=2)  # warm
            results[kind] = await cpu_per_request(target.proc.pid, url, workdir, seconds)
            if kind == "resilgate":
                profiled = asyncio.create_task(
                    sample(target.proc.pid, seconds, workdir / "py-spy.txt")
                )
                load = await wrk.run(url, workdir, connections=CONNECTIONS, duration_s=seconds)
                results["rps_while_sampled"] = load.rps
                try:
                    profile = await profiled
                except RuntimeError as exc:
                    results["error"] = str(exc)
                else:
                    results.update(report(profile))
            procs.stop(target.proc)
    finally:
        procs.close()
    results["summary_rows"] = summary_rows(results)
    return results


def report(profile: Profile) -> dict[str, Any]:
    own_code = profile.top_own_code(25)
    return {
        "samples": profile.total,
        "other_thread_samples_left_out": profile.other_threads,
        "areas_pct": profile.areas(),
        "watched_pct": profile.watched(),
        "top_self": profile.top_own(30),
        "top_own_code": own_code,
    }


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    ours, bare = results["resilgate"], results["passthrough"]
    scenario = f"profile, 1 worker, wrk {CONNECTIONS} connections"
    rows = [
        {
            "scenario": scenario,
            "figure": "CPU µs per request",
            "resilgate": f"{ours['cpu_us_per_request']:.0f}",
            "reference": f"{bare['cpu_us_per_request']:.0f} bare aiohttp proxy",
            "note": f"{ours['rps']:.0f} vs {bare['rps']:.0f} requests/s (this run, user + "
            "system time of the proxy process)",
        }
    ]
    if "error" in results:
        rows.append(
            {
                "scenario": scenario,
                "figure": "profile",
                "resilgate": "-",
                "reference": "-",
                "note": results["error"],
            }
        )
        return rows
    watched = results["watched_pct"]
    for label in SUMMARY_WATCH:
        rows.append(
            {
                "scenario": scenario,
                "figure": f"% of samples: {label}",
                "resilgate": f"{watched[label]:.1f}",
                "reference": "-",
                "note": f"py-spy, {results['samples']} samples of the event loop's thread",
            }
        )
    return rows


if __name__ == "__main__":
    import tempfile

    import orjson

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers (user nobody) read the static files in it
        figures = asyncio.run(measure(Path(tmp), "--full" in sys.argv))
    sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
