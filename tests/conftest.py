"""Harness shared by all tests: real processes on ephemeral loopback ports, condition waits."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.redis_server import redis_factory, redis_server  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def wait_until_async(
    condition: Callable[[], Any], within_s: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` (sync, or async) on the running loop until it returns a truthy value,
    which is returned, or ``within_s`` passes."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class ServerProcess:
    """A resilgate server or simulator running as its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self, listener: str | None = None) -> int:
        listeners: dict[str, int] = self.ready["listeners"]
        if listener is None:
            return next(iter(listeners.values()))
        return listeners[listener]

    def url(self, listener: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port(listener)}"

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                records.append(orjson.loads(line))
        return records

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


class Spawner:
    """Starts servers for one test and kills every one of them, by process group, afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServerProcess] = []

    def start(
        self, name: str, args: list[str], timeout: float = 20.0, env: dict[str, str] | None = None
    ) -> ServerProcess:
        ready_file = self.tmp_path / f"{name}.ready.json"
        log_path = self.tmp_path / f"{name}.log"
        ready_file.unlink(missing_ok=True)
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "resilgate", *args, "--ready-file", str(ready_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
            # Its metrics files stay in the test's directory even if it is killed outright.
            env={
                **os.environ,
                "PROMETHEUS_MULTIPROC_DIR": str(self.tmp_path / f"{name}.metrics"),
                **(env or {}),
            },
        )
        log.close()

        def is_ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            return ready_file.exists()

        wait_until(is_ready, timeout, f"{name} to listen")
        server = ServerProcess(name, proc, orjson.loads(ready_file.read_bytes()), log_path)
        self.started.append(server)
        return server

    def simulator(self, kind: str, site: str = "primary", *extra: str) -> ServerProcess:
        return self.start(
            f"sim-{kind}-{site}-{len(self.started)}",
            ["simulate", kind, "--port", "0", "--site", site, *extra],
        )

    def close(self) -> None:
        for server in reversed(self.started):
            server.kill_group()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.close()


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawner]:
    """For servers that a whole module of read-only tests can share."""
    spawner = Spawner(tmp_path_factory.mktemp("servers"))
    yield spawner
    spawner.close()
