"""A real Redis master, its replica and a Sentinel watching them, on loopback TCP ports
(Sentinel hands out host:port addresses, so unix sockets alone will not do)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import wait_until
from tests.redis_server import REDIS_SERVER, RedisServer, _kill_if_running

MASTER_NAME = "hospital"
REDIS_PASSWORD = "test-redis-password"  # a test fixture's, for a server that lives one test
SENTINEL_PASSWORD = "test-sentinel-password"
START_ATTEMPTS = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _on_free_port(start: Callable[[int], None]) -> int:
    """Start a server on a port that was free a moment ago; another process may take it in
    between, so a failed start is tried again on another port."""
    for attempt in range(START_ATTEMPTS):
        port = _free_port()
        try:
            start(port)
            return port
        except AssertionError:
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


class SentinelProcess:
    """One redis-server in sentinel mode, monitoring ``MASTER_NAME``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, master_port: int, timeout: float = 10.0) -> None:
        conf = self.directory / "sentinel.conf"  # Sentinel rewrites it: a fresh one each time
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"logfile {self.directory / 'sentinel.log'}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel auth-pass {MASTER_NAME} {REDIS_PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        weakref.finalize(self, _kill_if_running, self.proc)
        self.port = port
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"sentinel exited: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"sentinel silent after {timeout}s: {self._log_tail()}")
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=SENTINEL_PASSWORD, socket_timeout=2
        )

    def close(self) -> None:
        if self.proc is not None:
            _kill_if_running(self.proc)

    def _answers(self) -> bool:
        with contextlib.suppress(redis.RedisError), self.client() as client:
            return bool(client.ping())
        return False

    def _log_tail(self) -> str:
        try:
            return (self.directory / "sentinel.log").read_text()[-3000:]
        except OSError:
            return "(no log)"


@dataclass
class SentinelSet:
    """A master and its replica (both with a password) and one Sentinel (quorum 1)."""

    master: RedisServer
    replica: RedisServer
    sentinel: SentinelProcess

    def master_port(self) -> int:
        with self.sentinel.client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            return int(port)

    def data_client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(server.socket_path), password=REDIS_PASSWORD)


def _replica_in_sync(replica: RedisServer) -> bool:
    with redis.Redis(unix_socket_path=str(replica.socket_path), password=REDIS_PASSWORD) as c:
        return c.info("replication").get("master_link_status") == "up"


def _sentinel_sees_replica(sentinel: SentinelProcess) -> bool:
    with sentinel.client() as client:
        replicas = client.sentinel_slaves(MASTER_NAME)
    return any(not r.get("is_disconnected") and not r.get("is_sdown") for r in replicas)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    auth = ("--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD)
    quick = ("--repl-diskless-sync-delay", "0")  # the replica syncs at once, not after 5 s
    made: list[RedisServer] = []
    running: dict[str, RedisServer] = {}

    def data_server(name: str, replica_of: int | None) -> Callable[[int], None]:
        def start(port: int) -> None:
            follow = ("--replicaof", "127.0.0.1", str(replica_of)) if replica_of else ()
            args = (*auth, *quick, *follow)
            server = RedisServer(tmp_path / f"{name}-{port}", port=port, args=args)
            made.append(server)
            server.start()
            running[name] = server

        return start

    sentinel = SentinelProcess(tmp_path / "sentinel")
    try:
        master_port = _on_free_port(data_server("master", None))
        _on_free_port(data_server("replica", master_port))
        master, replica = running["master"], running["replica"]
        wait_until(lambda: _replica_in_sync(replica), 15, "the replica to catch up")
        _on_free_port(lambda port: sentinel.start(port, master_port))
        wait_until(lambda: _sentinel_sees_replica(sentinel), 15, "the sentinel to find the replica")
        yield SentinelSet(master, replica, sentinel)
    finally:
        sentinel.close()
        for server in made:
            server.close()
