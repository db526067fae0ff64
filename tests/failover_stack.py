"""A gateway in front of a primary and a DR simulator, tuned so failures show in seconds."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

from tests.conftest import ServerProcess, Spawner, wait_until
from tests.gateway import admin_cli_ok, start_gateway

FAST_HEALTH: dict[str, Any] = {
    "breaker": {"consecutive_failures": 5, "open_s": 1.0, "max_open_s": 4.0},
    "probes": {"http": {"interval_s": 0.2, "timeout_s": 0.3, "rise": 2, "fall": 2}},
    "failback": {"hold_down_s": 1.0, "ramp_s": 1.0},
}


@dataclass
class Stack:
    gateway: ServerProcess
    primary: ServerProcess
    dr: ServerProcess
    kind: str

    @property
    def url(self) -> str:
        return self.gateway.url()

    def label(self, site: str) -> str:
        return f"{self.kind}/{site}"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.gateway.log_records() if r.get("event") == name]


def sim_call(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    """A control call to a simulator (``/_sim/...``), synchronous and quick."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url() + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def set_mode(stack: Stack, *args: str) -> None:
    """``resilgate mode ...`` against the gateway's admin API, as ops would run it."""
    admin_cli_ok("mode", *args, admin=stack.gateway)


def set_fault(server: ServerProcess, **fault: Any) -> None:
    sim_call(server, "PUT", "/_sim/fault", fault)


def traffic(server: ServerProcess) -> int:
    """Requests the simulator received, probes not counted."""
    stats = sim_call(server, "GET", "/_sim/stats")
    return int(stats["requests"]) - int(stats["probes"])


def start_stack(
    spawn: Spawner,
    kind: str,
    routes: list[dict[str, Any]],
    *,
    dr_read_only: bool = False,
    health: dict[str, Any] | None = None,
    name: str = "gateway",
    primary: ServerProcess | None = None,
    dr: ServerProcess | None = None,
    primary_url: str | None = None,
    env: dict[str, str] | None = None,
    **top: Any,
) -> Stack:
    primary = primary or spawn.simulator(kind, "primary")
    dr = dr or spawn.simulator(kind, "dr")
    endpoints = [
        {"name": "primary", "url": primary_url or primary.url(), "priority": 0},
        {"name": "dr", "url": dr.url(), "priority": 1, "read_only": dr_read_only},
    ]
    upstream = {"endpoints": endpoints, **(FAST_HEALTH if health is None else health)}
    gateway = start_gateway(spawn, {kind: upstream}, routes, name=name, env=env, **top)
    stack = Stack(gateway, primary, dr, kind)
    wait_until(lambda: probes_up(stack), 10, "probes to see both endpoints up")
    return stack


def probes_up(stack: Stack) -> bool:
    """Both simulators have been probed at least twice (the probes' rise count)."""
    return all(
        sim_call(server, "GET", "/_sim/stats")["probes"] >= 2
        for server in (stack.primary, stack.dr)
    )
