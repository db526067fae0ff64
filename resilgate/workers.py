"""Worker processes: one event loop each, all sharing the public port with SO_REUSEPORT.

A single worker runs in the main process. With more, the main process reserves the port, forks
the workers, restarts one that dies (backing off when it keeps dying), and on SIGTERM lets every
worker drain before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkProcess
from pathlib import Path
from types import FrameType

import uvloop
from aiohttp import web

from resilgate.admin.api import build_admin_app, mark_draining
from resilgate.app import build_app
from resilgate.config import Config
from resilgate.errors import StartupError
from resilgate.logs import configure_logging, get_logger
from resilgate.metrics import worker_exited
from resilgate.readyfile import write_ready_file

log = get_logger("resilgate.workers")
_PR_SET_PDEATHSIG = 1
START_DEADLINE_S = 30.0
MAX_RESTART_DELAY_S = 30.0
# After the drain, a worker closes its store, flushes alerts (bounded by their timeout) and logs.
CLEANUP_S = 10.0


def stop_deadline_s(config: Config) -> float:
    """The longest a stop takes from SIGTERM until every worker is gone: the not-ready notice,
    the drain, then clean-up; a worker still alive then is killed. A platform's grace period
    (Kubernetes' terminationGracePeriodSeconds, after any preStop pause) must be longer."""
    return config.drain_notice_s + config.drain_deadline_s + CLEANUP_S


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports of a worker's listeners."""

    public: int
    admin: int

    def as_dict(self) -> dict[str, int]:
        return {"public": self.public, "admin": self.admin}


class ListenError(StartupError):
    """The public listener cannot be opened; the message says which address and why."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def available_cpus() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota if any."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def worker_count(config: Config, override: int | None) -> int:
    wanted = override if override is not None else config.workers
    return wanted or available_cpus()


def _describe(exc: OSError, name: str, host: str, port: int) -> str:
    reason = {
        errno.EADDRINUSE: "address already in use (another gateway or program holds the port)",
        errno.EADDRNOTAVAIL: "address not available on this machine",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"listeners.{name} ({host}:{port}): {reason}"


async def _listen(runner: web.AppRunner, name: str, host: str, port: int, reuse_port: bool) -> int:
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(_describe(exc, name, host, port)) from exc
    bound: int = runner.addresses[-1][1]
    log.info("listening", listener=name, host=host, port=bound, pid=os.getpid())
    return bound


async def run_worker(
    config: Config, ports: Ports, on_ready: Callable[[Ports], None], reuse_port: bool
) -> None:
    """Serve the public and admin listeners until SIGTERM/SIGINT, then drain within the
    deadline (the admin listener says not ready from the first moment of draining)."""
    public_app = build_app(config)
    admin_app = build_admin_app(public_app)
    runner = web.AppRunner(
        public_app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.drain_deadline_s,
        handler_cancellation=True,
        max_line_size=config.max_header_bytes,
        max_field_size=config.max_header_bytes,
    )
    admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await admin_runner.setup()
        listeners = config.listeners
        bound = Ports(
            await _listen(runner, "public", listeners.public.host, ports.public, reuse_port),
            await _listen(admin_runner, "admin", listeners.admin.host, ports.admin, reuse_port),
        )
        on_ready(bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        mark_draining(admin_app)
        if config.drain_notice_s:
            log.info("not_ready", notice_s=config.drain_notice_s, pid=os.getpid())
            await asyncio.sleep(config.drain_notice_s)  # still serving: the LB stops sending
        log.info("draining", deadline_s=config.drain_deadline_s, pid=os.getpid())
    finally:
        await runner.cleanup()
        await admin_runner.cleanup()
    log.info("stopped", pid=os.getpid())


def _worker_main(config: Config, ports: Ports, ready: Connection) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent()  # if the supervisor is killed outright, drain instead of lingering
    try:
        uvloop.run(run_worker(config, ports, lambda _ports: ready.send(os.getpid()), True))
    except StartupError as exc:
        log.error("cannot_start", reason=str(exc))
        sys.exit(1)


def _reserve_port(name: str, host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 resolves once and every worker joins that port.

    A first bind without SO_REUSEPORT fails if anyone already holds the port, so a second
    gateway cannot silently take half of the connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ListenError(_describe(exc, name, host, port)) from exc
    return sock


class Supervisor:
    """Keeps ``count`` workers running on one port; stops them all on SIGTERM."""

    def __init__(self, config: Config, count: int, ready_file: Path | None) -> None:
        self.config = config
        self.count = count
        self.ready_file = ready_file
        self._context = multiprocessing.get_context("fork")
        # Workers report "listening" on one pipe; small messages are written atomically.
        self._ready, self._report = self._context.Pipe(duplex=False)
        self._stopping = False
        self.workers: list[ForkProcess] = []
        self._started_at: dict[int, float] = {}
        self._restart_delay = 0.0

    def __repr__(self) -> str:
        # exitcode, not is_alive(): a forked child may render this (is_alive asserts parenthood)
        alive = sum(worker.exitcode is None for worker in self.workers)
        return f"<Supervisor {alive}/{self.count} workers alive stopping={self._stopping}>"

    def _start_worker(self, ports: Ports) -> ForkProcess:
        worker = self._context.Process(
            target=_worker_main, args=(self.config, ports, self._report), daemon=False
        )
        worker.start()
        assert worker.pid is not None
        self._started_at[worker.pid] = time.monotonic()
        return worker

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        # Pass it on at once (the loop below notices only at its next wake-up, up to 0.5 s
        # later): every worker's /readyz must turn 503 the moment the pod is told to stop.
        for worker in self.workers:
            if worker.pid is not None and worker.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _await_ready(self) -> bool:
        """Wait until every worker listens; False if one died first or a stop was asked."""
        pending = self.count
        deadline = time.monotonic() + START_DEADLINE_S
        while pending:
            if self._stopping or time.monotonic() > deadline:
                return False
            sentinels = [worker.sentinel for worker in self.workers]
            ready = wait([self._ready, *sentinels], timeout=0.2)
            if any(worker.sentinel in ready for worker in self.workers):
                return False
            if self._ready in ready:
                self._ready.recv()
                pending -= 1
        return True

    def run(self) -> int:
        listeners = self.config.listeners
        reserved = [
            _reserve_port("public", listeners.public.host, listeners.public.port),
            _reserve_port("admin", listeners.admin.host, listeners.admin.port),
        ]
        ports = Ports(reserved[0].getsockname()[1], reserved[1].getsockname()[1])
        port = ports.public
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.workers = [self._start_worker(ports) for _ in range(self.count)]
        if not self._await_ready():
            event = "stopped_during_startup" if self._stopping else "workers_failed_to_start"
            log.error(event, workers=self.count, port=port)
            self._stop_all(reserved)
            if not self._stopping:
                print(
                    "error: workers failed to start (the cannot_start lines say why)",
                    file=sys.stderr,
                )
            return 1
        if self.ready_file is not None:
            write_ready_file(self.ready_file, ports.as_dict())
        log.info(
            "supervisor_ready",
            workers=self.count,
            port=port,
            admin_port=ports.admin,
            pid=os.getpid(),
        )

        while not self._stopping:
            wait([self._ready, *(worker.sentinel for worker in self.workers)], timeout=0.5)
            while self._ready.poll():  # restarted workers report in too
                self._ready.recv()
            for index, worker in enumerate(self.workers):
                if not worker.is_alive() and not self._stopping:
                    self.workers[index] = self._restart(worker, ports)
        return self._stop_all(reserved)

    def _restart(self, dead: ForkProcess, ports: Ports) -> ForkProcess:
        if dead.pid is not None:
            worker_exited(dead.pid)  # its live gauges (breaker states, budgets) leave the sums
        lived = time.monotonic() - self._started_at.pop(dead.pid or 0, 0.0)
        # A worker that dies right after starting would otherwise be restarted in a hot loop.
        self._restart_delay = (
            min(max(1.0, self._restart_delay * 2), MAX_RESTART_DELAY_S) if lived < 5 else 0.0
        )
        log.error(
            "worker_died",
            pid=dead.pid,
            exitcode=dead.exitcode,
            lived_s=round(lived, 1),
            restart_in_s=self._restart_delay,
        )
        if self._restart_delay:
            wait([], timeout=self._restart_delay)
        return self._start_worker(ports)

    def _stop_all(self, reserved: list[socket.socket]) -> int:
        for worker in self.workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_deadline_s(self.config)
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("worker_killed_after_deadline", pid=worker.pid)
                worker.kill()
                worker.join()
        for sock in reserved:
            sock.close()
        failed = [worker.exitcode for worker in self.workers if worker.exitcode != 0]
        log.info("supervisor_stopped", failed_workers=len(failed))
        return 0 if not failed else 1


def serve(config: Config, workers: int | None = None, ready_file: Path | None = None) -> int:
    """Run the gateway until SIGTERM; the exit code is 0 after a clean drain."""
    configure_logging()
    count = worker_count(config, workers)
    try:
        if count == 1:

            def announce(ports: Ports) -> None:
                if ready_file is not None:
                    write_ready_file(ready_file, ports.as_dict())

            listeners = config.listeners
            ports = Ports(listeners.public.port, listeners.admin.port)
            uvloop.run(run_worker(config, ports, announce, False))
            return 0
        return Supervisor(config, count, ready_file).run()
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
