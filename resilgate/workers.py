"""Worker processes: one event loop each, all sharing the public port with SO_REUSEPORT.

A single worker runs in the main process. With more, the main process reserves the port, forks
the workers, restarts one that dies, and on SIGTERM lets each drain before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.context import ForkProcess
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from types import FrameType

import uvloop
from aiohttp import web

from resilgate.app import build_app
from resilgate.config import Config
from resilgate.logs import configure_logging, get_logger
from resilgate.readyfile import write_ready_file

log = get_logger("resilgate.workers")
_PR_SET_PDEATHSIG = 1


def worker_count(config: Config, override: int | None) -> int:
    wanted = override if override is not None else config.workers
    return wanted or len(os.sched_getaffinity(0))


async def run_worker(config: Config, port: int, on_ready: Callable[[int], None]) -> None:
    """Serve the public listener until SIGTERM/SIGINT, then drain within the deadline."""
    listener = config.listeners.public
    runner = web.AppRunner(
        build_app(config),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.drain_deadline_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, listener.host, port, reuse_port=True, backlog=1024)
    await site.start()
    bound_port: int = runner.addresses[0][1]
    log.info("listening", host=listener.host, port=bound_port, pid=os.getpid())
    on_ready(bound_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", deadline_s=config.drain_deadline_s, pid=os.getpid())
    await runner.cleanup()
    log.info("stopped", pid=os.getpid())


def _worker_main(config: Config, port: int, ready: SimpleQueue[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # If the supervisor is killed outright, drain instead of lingering.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    uvloop.run(run_worker(config, port, lambda _port: ready.put(os.getpid())))


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 resolves once and every worker joins that port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Keeps ``count`` workers running on one port; stops them all on SIGTERM."""

    def __init__(self, config: Config, count: int, ready_file: Path | None) -> None:
        self.config = config
        self.count = count
        self.ready_file = ready_file
        self._context = multiprocessing.get_context("fork")
        self._ready: SimpleQueue[int] = self._context.SimpleQueue()
        self._stopping = False
        self.workers: list[ForkProcess] = []

    def __repr__(self) -> str:
        alive = sum(worker.is_alive() for worker in self.workers)
        return f"<Supervisor {alive}/{self.count} workers alive stopping={self._stopping}>"

    def _start_worker(self, port: int) -> ForkProcess:
        worker = self._context.Process(
            target=_worker_main, args=(self.config, port, self._ready), daemon=False
        )
        worker.start()
        return worker

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        listener = self.config.listeners.public
        reserved = _reserve_port(listener.host, listener.port)
        port: int = reserved.getsockname()[1]
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.workers = [self._start_worker(port) for _ in range(self.count)]
        for _ in range(self.count):
            self._ready.get()
        if self.ready_file is not None:
            write_ready_file(self.ready_file, {"public": port})
        log.info("supervisor_ready", workers=self.count, port=port, pid=os.getpid())

        while not self._stopping:
            wait([worker.sentinel for worker in self.workers], timeout=0.5)
            for index, worker in enumerate(self.workers):
                if not worker.is_alive() and not self._stopping:
                    log.error("worker_died", pid=worker.pid, exitcode=worker.exitcode)
                    self.workers[index] = self._start_worker(port)
        return self._stop_all(reserved)

    def _stop_all(self, reserved: socket.socket) -> int:
        for worker in self.workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        grace = self.config.drain_deadline_s + 5
        for worker in self.workers:
            worker.join(grace)
            if worker.is_alive():
                log.error("worker_killed_after_deadline", pid=worker.pid)
                worker.kill()
                worker.join()
        reserved.close()
        failed = [worker.exitcode for worker in self.workers if worker.exitcode != 0]
        log.info("supervisor_stopped", failed_workers=len(failed))
        return 0 if not failed else 1


def serve(config: Config, workers: int | None = None, ready_file: Path | None = None) -> int:
    """Run the gateway until SIGTERM; the exit code is 0 after a clean drain."""
    configure_logging()
    count = worker_count(config, workers)
    if count == 1:

        def announce(port: int) -> None:
            if ready_file is not None:
                write_ready_file(ready_file, {"public": port})

        uvloop.run(run_worker(config, config.listeners.public.port, announce))
        return 0
    return Supervisor(config, count, ready_file).run()
