"""Scenario 7, memory: resident memory (``VmRSS``) of each worker process, idle and while
holding 1,000 and 5,000 open client connections (each has sent one request and read its
answer, then stays open, kept alive), for resilgate and nginx with 1 and 2 workers, in front
of the same static nginx upstream.

The connections come from this process (its open-file limit is raised to the hard limit);
the servers inherit that limit. A 2-worker server's supervisor (resilgate's main process,
nginx's master) is reported apart from its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import nginx, targets
from benchmarks.procs import Proc, Procs, free_port

LEVELS = (1000, 5000)
OPENING_AT_ONCE = 200  # connections being opened at a time (the listen backlog is 1024)
SETTLE_S = 1.0
# nginx's shared config allows 4096 connections a worker; a worker here holds the clients
# and its upstream connections.
NGINX_WORKER_CONNECTIONS = 3 * max(LEVELS)
REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-memory\r\n\r\n"


# -- /proc ---------------------------------------------------------------------------------


def kib(path: str, field: str) -> int:
    """A ``Field:   123 kB`` line of a /proc file, in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in {path}")


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS``), pages shared with other processes included."""
    return kib(f"/proc/{pid}/status", "VmRSS")


def pss_kib(pid: int) -> int:
    """Proportional set size: each page shared by n processes counts 1/n (forked workers
    share the pages their parent had before the fork)."""
    return kib(f"/proc/{pid}/smaps_rollup", "Pss")


def workers_of(pid: int, kind: str) -> list[int]:
    """Worker processes forked by ``pid``: for nginx those titled "worker process", for
    resilgate those with its own command line (not helpers such as multiprocessing's
    resource tracker)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            line = Path(f"/proc/{child}/cmdline").read_bytes()
            if (b"worker process" in line) if kind == "nginx" else (line == own):
                found.append(int(child))
    return sorted(found)


def open_sockets(pid: int) -> int:
    count = 0
    with os.scandir(f"/proc/{pid}/fd") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                count += os.readlink(entry.path).startswith("socket:")
    return count


@dataclass(frozen=True, slots=True)
class Layout:
    """The processes of a server: who serves, and the supervisor when there is one."""

    workers: tuple[int, ...]
    supervisor: int | None

    @classmethod
    def of(cls, kind: str, proc: Proc, workers: int) -> Layout:
        if kind == "resilgate" and workers == 1:
            return cls((proc.pid,), None)  # one worker runs in the main process
        forked = workers_of(proc.pid, kind)
        if len(forked) != workers:
            raise RuntimeError(f"{kind}: {len(forked)} worker processes, expected {workers}")
        return cls(tuple(forked), proc.pid)

    def sample(self) -> dict[str, Any]:
        per_worker = [rss_kib(pid) for pid in self.workers]
        proportional = [pss_kib(pid) for pid in self.workers]
        sample: dict[str, Any] = {
            "rss_kib_per_worker": per_worker,
            "rss_mib_mean_per_worker": round(sum(per_worker) / len(per_worker) / 1024, 1),
            "pss_kib_per_worker": proportional,
            "pss_mib_mean_per_worker": round(sum(proportional) / len(proportional) / 1024, 1),
            "sockets_per_worker": [open_sockets(pid) for pid in self.workers],
        }
        if self.supervisor is not None:
            sample["supervisor_rss_mib"] = round(rss_kib(self.supervisor) / 1024, 1)
        return sample


# -- clients ---------------------------------------------------------------------------------


def raise_open_files(needed: int) -> int:
    """Raise this process's soft open-file limit towards ``needed`` (at most the hard limit);
    the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer with a Content-Length; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


class Clients:
    """Kept-alive client connections to one server, each after one answered request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.failed = 0

    async def grow_to(self, count: int) -> None:
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.failed += 1
                    return
                try:
                    writer.write(REQUEST)
                    async with asyncio.timeout(10):
                        status = await read_answer(reader)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                if status != 200:
                    self.failed += 1
                    writer.close()
                    return
                self.writers.append(writer)

        await asyncio.gather(*(one() for _ in range(count - len(self.writers))))

    def open(self) -> int:
        return sum(1 for w in self.writers if not w.is_closing())

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        self.writers.clear()


# -- the scenario ----------------------------------------------------------------------------


async def one_server(
    procs: Procs, kind: str, workers: int, upstream: str, levels: Sequence[int]
) -> dict[str, Any]:
    """Idle, then at each of ``levels`` open connections, then with them closed."""
    name = f"{kind}-memory-{workers}w"
    endpoints = {"primary": upstream}
    if kind == "nginx":
        port = free_port()
        conf = nginx.proxy_conf(
            procs.workdir / name,
            port,
            workers,
            upstream.removeprefix("http://"),
            None,
            targets.TIMEOUTS,
            targets.FAIL_TIMEOUT_S,
        )
        bigger = conf.replace(
            "worker_connections 4096;", f"worker_connections {NGINX_WORKER_CONNECTIONS};"
        )
        if bigger == conf:
            raise RuntimeError("nginx config: worker_connections not found to raise")
        proc = nginx.start(procs, name, bigger, {"http": port})
    else:
        proc = targets.start(procs, kind, name, workers, endpoints, health=False).proc
    try:
        layout = Layout.of(kind, proc, workers)
        clients = Clients(proc.port("public" if kind == "resilgate" else None))
        await clients.grow_to(20)  # warm: code paths and pools in use once
        await clients.close()
        await asyncio.sleep(SETTLE_S)
        samples: dict[str, Any] = {"idle": layout.sample()}
        for level in levels:
            started = time.monotonic()
            await clients.grow_to(level)
            opened_s = time.monotonic() - started
            await asyncio.sleep(SETTLE_S)
            samples[str(level)] = {
                **layout.sample(),
                "open": clients.open(),
                "failed": clients.failed,
                "opening_s": round(opened_s, 2),
            }
        await clients.close()
        await asyncio.sleep(SETTLE_S)
        samples["closed_again"] = layout.sample()
    finally:
        procs.stop(proc)
    low, high = str(levels[0]), str(levels[-1])
    return {
        "kind": kind,
        "workers": workers,
        "samples": samples,
        "kib_per_connection": per_connection_kib(samples[low], samples[high], int(high) - int(low)),
    }


def per_connection_kib(low: dict[str, Any], high: dict[str, Any], more: int) -> float:
    """Resident memory of all workers together per connection opened between two samples."""
    grown: int = sum(high["rss_kib_per_worker"]) - sum(low["rss_kib_per_worker"])
    return round(grown / more, 2)


async def measure(workdir: Path, full: bool) -> dict[str, Any]:
    """Every figure of scenario 7, with its rows for the summary table (``full`` changes
    nothing: the short run already fits its time)."""
    limit = raise_open_files(2 * max(LEVELS) + 1000)
    procs = Procs(workdir)
    runs: list[dict[str, Any]] = []
    try:
        upstream = nginx.start_static(procs, workers=1)
        for workers in (1, 2):
            for kind in ("resilgate", "nginx"):
                runs.append(await one_server(procs, kind, workers, upstream.url("primary"), LEVELS))
    finally:
        procs.close()
    return {
        "levels": list(LEVELS),
        "open_files_limit": limit,
        "upstream": "static nginx, /small (300 B)",
        "runs": runs,
        "summary_rows": summary_rows(runs),
    }


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    by = {(run["kind"], run["workers"]): run for run in runs}
    rows = []
    for workers in (1, 2):
        ours, theirs = by.get(("resilgate", workers)), by.get(("nginx", workers))
        if ours is None:
            continue
        scenario = f"memory, {workers} worker{'s' if workers > 1 else ''}"
        for level in ("idle", *map(str, LEVELS)):
            mine = ours["samples"][level]
            reference = theirs["samples"][level] if theirs else None
            notes = [
                f"x{mine['rss_mib_mean_per_worker'] / reference['rss_mib_mean_per_worker']:.1f}"
                " of nginx"
                if reference
                else "nginx not measured",
                f"PSS {mine['pss_mib_mean_per_worker']:.1f} MiB",
            ]
            if level != "idle":
                notes.append(f"{mine['open']} open, {mine['failed']} failed")
            if "supervisor_rss_mib" in mine:
                notes.append(f"supervisor {mine['supervisor_rss_mib']} MiB")
            rows.append(
                {
                    "scenario": scenario,
                    "figure": "RSS MiB/worker "
                    + ("idle" if level == "idle" else f"at {int(level):,} connections"),
                    "resilgate": f"{mine['rss_mib_mean_per_worker']:.1f}",
                    "reference": f"{reference['rss_mib_mean_per_worker']:.1f} nginx"
                    if reference
                    else "-",
                    "note": "; ".join(notes),
                }
            )
        rows.append(
            {
                "scenario": scenario,
                "figure": "KiB per open connection",
                "resilgate": f"{ours['kib_per_connection']:.1f}",
                "reference": f"{theirs['kib_per_connection']:.1f} nginx" if theirs else "-",
                "note": f"RSS growth of all workers from {LEVELS[0]:,} to {LEVELS[-1]:,}",
            }
        )
    return rows


if __name__ == "__main__":
    import sys
    import tempfile

    import orjson

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers (user nobody) read the static files in it
        figures = asyncio.run(measure(Path(tmp), "--full" in sys.argv))
    sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
