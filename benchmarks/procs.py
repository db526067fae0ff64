"""Processes a benchmark run starts, each in its own process group, all stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nobody listens on now (for servers that need a port in their config)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    """A started server: its process, its log and the ports it listens on."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def port(self, listener: str | None = None) -> int:
        return self.ports[listener] if listener else next(iter(self.ports.values()))

    def url(self, listener: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port(listener)}"

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def stop(self) -> None:
        """SIGCONT then SIGKILL to the whole group (a stopped process would not hear SIGTERM)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGCONT)
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def __repr__(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"<Proc {self.name} pid={self.pid} {state} ports={self.ports}>"


class Procs:
    """Starts servers into ``workdir`` and stops every one of them, by process group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        ports: dict[str, int] | None = None,
        ready_file: Path | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Proc:
        """Start ``argv``; ready when ``ready_file`` (resilgate's) exists or ``ports`` accept."""
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        proc = Proc(name, popen, log, dict(ports or {}))
        self.started.append(proc)

        def ready() -> bool:
            if popen.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{tail}")
            if ready_file is not None:
                return ready_file.exists()
            return all(accepts(port) for port in proc.ports.values())

        wait_for(ready, timeout_s, f"{name} to listen")
        if ready_file is not None:
            proc.ports = orjson.loads(ready_file.read_bytes())["listeners"]
        return proc

    def resilgate(
        self, name: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0
    ) -> Proc:
        """``python -m resilgate ARGS`` with a ready file."""
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        metrics = self.workdir / f"{name}.metrics"
        metrics.mkdir(exist_ok=True)
        return self.spawn(
            name,
            [sys.executable, "-m", "resilgate", *args, "--ready-file", str(ready)],
            ready_file=ready,
            env={"PROMETHEUS_MULTIPROC_DIR": str(metrics), **(env or {})},
            timeout_s=timeout_s,
        )

    def simulator(self, name: str, kind: str, site: str, port: int = 0) -> Proc:
        return self.resilgate(name, "simulate", kind, "--port", str(port), "--site", site)

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.started.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group ``pgid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command: state ppid pgrp ... utime (11th) stime (12th).
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks
