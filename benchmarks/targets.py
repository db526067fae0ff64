"""The proxies under test, started in front of given upstreams: resilgate, nginx, passthrough."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDictProxy

from benchmarks import nginx
from benchmarks.openloop import Labeller
from benchmarks.procs import Proc, Procs, free_port

# Per-try timeouts of the benchmark route; nginx's proxy timeouts are set to the same.
TIMEOUTS = nginx.FailoverTimeouts(connect_s=1.0, total_s=2.0)
# Health settings of the failover upstream, tuned (like the scenario tests) so a failback
# shows within seconds; nginx's fail_timeout is set to the hold-down.
HEALTH: dict[str, Any] = {
    "breaker": {"consecutive_failures": 5, "open_s": 1.0, "max_open_s": 4.0},
    "probes": {"http": {"interval_s": 0.2, "timeout_s": 0.3, "rise": 2, "fall": 2}},
    "failback": {"hold_down_s": 2.0, "ramp_s": 2.0, "ramp_start": 0.1},
}
FAIL_TIMEOUT_S = HEALTH["failback"]["hold_down_s"]
ADMIN_TOKEN_SHA256 = hashlib.sha256(b"bench-admin-token-not-secret").hexdigest()


@dataclass
class Target:
    """A running proxy: where to send requests and how to tell who served them."""

    kind: str  # resilgate | nginx | passthrough
    proc: Proc
    label: Labeller

    @property
    def url(self) -> str:
        return self.proc.url("public" if self.kind == "resilgate" else None)


def resilgate_config(
    path: Path, workers: int, endpoints: dict[str, str], retries: str, health: bool
) -> Path:
    """A gateway with one upstream (``site``: endpoints by name, priority in given order) and
    one route taking every GET."""
    upstream: dict[str, Any] = {
        "endpoints": [
            {"name": name, "url": url, "priority": rank}
            for rank, (name, url) in enumerate(endpoints.items())
        ],
        **(HEALTH if health else {}),
    }
    config = {
        "listeners": {
            "public": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "workers": workers,
        "admin": {"tokens": [{"name": "bench", "role": "viewer", "sha256": ADMIN_TOKEN_SHA256}]},
        "state": {"backend": "sqlite", "path": str(path.with_suffix(".db"))},
        "drain_deadline_s": 2,
        "upstreams": {"site": upstream},
        "include_routes": [],
        "routes": [
            {
                "name": "bench-read",
                "upstream": "site",
                "criticality": "core",
                "match": {"path_prefix": "/", "methods": ["GET", "HEAD"]},
                "timeouts": {"connect_s": TIMEOUTS.connect_s, "total_s": TIMEOUTS.total_s},
                "retries": retries,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def resilgate_label(headers: CIMultiDictProxy[str]) -> str:
    """``site/dr`` -> ``dr``."""
    return headers.get("X-Resilgate-Upstream", "").rpartition("/")[2]


def nginx_labeller(ports: dict[int, str]) -> Labeller:
    """nginx's ``$upstream_addr`` lists every server tried; the last one answered."""

    def label(headers: CIMultiDictProxy[str]) -> str:
        last = headers.get(nginx.UPSTREAM_HEADER, "").split(",")[-1].strip()
        port = last.rpartition(":")[2]
        return ports.get(int(port), last) if port.isdigit() else last

    return label


def start(
    procs: Procs,
    kind: str,
    name: str,
    workers: int,
    endpoints: dict[str, str],
    *,
    retries: str = "by_method",
    health: bool = True,
) -> Target:
    """Start ``kind`` in front of ``endpoints`` (name -> base URL; the first is the primary)."""
    if kind == "resilgate":
        config = resilgate_config(
            procs.workdir / f"{name}.yaml", workers, endpoints, retries, health
        )
        proc = procs.resilgate(name, "serve", "--config", str(config), "--workers", str(workers))
        return Target(kind, proc, resilgate_label)
    hosts = {name_: url.removeprefix("http://") for name_, url in endpoints.items()}
    if kind == "nginx":
        primary, *rest = hosts.values()
        proc = nginx.start_proxy(
            procs, name, workers, primary, rest[0] if rest else None, TIMEOUTS, FAIL_TIMEOUT_S
        )
        by_port = {int(h.rpartition(":")[2]): n for n, h in hosts.items()}
        return Target(kind, proc, nginx_labeller(by_port))
    if kind == "passthrough":
        port = free_port()
        argv = [sys.executable, "-m", "benchmarks.passthrough", "--port", str(port)]
        argv += ["--upstream", next(iter(endpoints.values())), "--workers", str(workers)]
        proc = procs.spawn(name, argv, ports={"http": port})
        return Target(kind, proc, lambda headers: "")
    raise ValueError(f"unknown target {kind!r}")
