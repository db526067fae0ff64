"""A real redis-server for tests, listening only on a unix socket (no port to race for).

Other test modules use the fixtures by importing them into their namespace
(``from tests.redis_server import redis_server``), or all tests do through
``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


class RedisServer:
    """One redis-server process keeping its data in ``directory``; restartable on that data."""

    def __init__(
        self,
        directory: Path,
        persistence: Sequence[str] = DURABLE,
        port: int = 0,
        args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.persistence = tuple(persistence)
        self.port = port  # 0: the unix socket only
        self.args = tuple(args)
        self.directory.mkdir(parents=True, exist_ok=True)
        socket_path = self.directory / "redis.sock"
        self._short_dir: Path | None = None
        if len(str(socket_path)) > SOCKET_PATH_MAX:
            self._short_dir = Path(tempfile.mkdtemp(prefix="redis-", dir="/tmp"))
            socket_path = self._short_dir / "redis.sock"
        self.socket_path = socket_path
        self.log_path = self.directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "not running"
        return f"<RedisServer {self.url} {state}>"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start and return once the server answers PING (its AOF loaded)."""
        assert not self.running, f"{self!r} already running"
        self.socket_path.unlink(missing_ok=True)
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.persistence,
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        weakref.finalize(self, _kill_if_running, self.proc)  # also when a test forgets stop()
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.proc.returncode}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server silent after {timeout}s:\n{self._log_tail()}")
            time.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the process with ``sig`` and reap it (by PID only)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot act on TERM
                os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        self.kill(signal.SIGTERM)

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same directory and socket (a killed server is reaped first)."""
        if self.running:
            self.stop()
        self.kill()
        self.start(timeout)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block: the socket stays open but nothing answers."""
        assert self.proc is not None and self.running
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Kill the server if it runs and remove the short socket directory, if one was made."""
        self.kill()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                # "-LOADING" while reading the AOF; "-NOAUTH" from a server with a password
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return "(no log)"


def _kill_if_running(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Make (not start) servers in fresh directories; all are killed after the test."""
    made: list[RedisServer] = []

    def make(persistence: Sequence[str] = DURABLE) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(made)}", persistence)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A running, durable (AOF, fsync always) redis-server on a unix socket."""
    server = redis_factory()
    server.start()
    return server
