"""``resilgate demo``: simulated primary and DR sites of every upstream, plus the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydantic import AnyHttpUrl

from resilgate.admin.auth import new_token, token_hash
from resilgate.config import AdminToken, Config, Endpoint, Listener, Listeners
from resilgate.sealing import new_key_text
from resilgate.simulators import SIMULATOR_KINDS
from resilgate.workers import die_with_parent, serve

START_DEADLINE_S = 20.0


@dataclass
class _Simulator:
    upstream: str
    endpoint: Endpoint
    process: subprocess.Popen[bytes]
    ready_file: Path
    port: int = 0


def _start(upstream: str, endpoint: Endpoint, ephemeral: bool, workdir: Path) -> _Simulator:
    ready_file = workdir / f"{upstream}-{endpoint.name}.ready.json"
    ready_file.unlink(missing_ok=True)
    port = 0 if ephemeral else (endpoint.url.port or 80)
    site = "primary" if endpoint.priority == 0 else "dr"
    log = (workdir / f"{upstream}-{endpoint.name}.log").open("wb")
    command = [sys.executable, "-m", "resilgate", "simulate", upstream]
    command += ["--host", endpoint.url.host or "127.0.0.1", "--port", str(port), "--site", site]
    command += ["--ready-file", str(ready_file)]
    # die_with_parent: a killed demo must not leave simulators holding the demo's ports.
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads here)
    )
    log.close()
    return _Simulator(upstream, endpoint, process, ready_file)


def _wait_ready(simulators: list[_Simulator]) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    for sim in simulators:
        while not sim.ready_file.exists():
            if sim.process.poll() is not None:
                raise RuntimeError(
                    f"simulator {sim.upstream}/{sim.endpoint.name} exited "
                    f"(is port {sim.endpoint.url.port} taken?)"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulator {sim.upstream}/{sim.endpoint.name} did not start")
            time.sleep(0.05)
        sim.port = orjson.loads(sim.ready_file.read_bytes())["listeners"]["http"]


def _stop(simulators: list[_Simulator]) -> None:
    for sim in simulators:
        if sim.process.poll() is None:
            os.kill(sim.process.pid, signal.SIGTERM)
    for sim in simulators:
        try:
            sim.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sim.process.kill()
            sim.process.wait()


def _with_ports(
    config: Config, simulators: list[_Simulator], port: int | None, ephemeral: bool
) -> Config:
    by_site = {(sim.upstream, sim.endpoint.name): sim.port for sim in simulators}
    upstreams = {}
    for name, upstream in config.upstreams.items():
        endpoints = []
        for endpoint in upstream.endpoints:
            url = AnyHttpUrl.build(
                scheme="http",
                host=endpoint.url.host or "127.0.0.1",
                port=by_site[name, endpoint.name],
            )
            endpoints.append(endpoint.model_copy(update={"url": url}))
        upstreams[name] = upstream.model_copy(update={"endpoints": endpoints})
    listeners = config.listeners
    if port is not None:
        admin = listeners.admin
        if ephemeral:
            admin = Listener(host=admin.host, port=0)
        listeners = Listeners(public=Listener(host=listeners.public.host, port=port), admin=admin)
    return config.model_copy(update={"upstreams": upstreams, "listeners": listeners})


def _banner(config: Config, simulators: list[_Simulator], port: int) -> str:
    gateway = f"http://{config.listeners.public.host}:{port}"
    lines = ["", "resilgate demo: simulated hospital upstreams behind the gateway", ""]
    for sim in simulators:
        label = f"{sim.upstream}/{sim.endpoint.name}"
        lines.append(
            f"  {label:<22} http://127.0.0.1:{sim.port}  "
            f"(pid {sim.process.pid}; faults: PUT /_sim/fault)"
        )
    lines += [
        f"  {'gateway':<22} {gateway}",
        "",
        "Try:",
        f"  curl -i {gateway}/fhir/Patient/test-0001",
        f"  curl -i '{gateway}/fhir/AllergyIntolerance?patient=test-0001'",
        f"  curl -i {gateway}/reg/v1/departments",
        f"  curl -i -X POST {gateway}/fsi/api/callService -H 'Content-Type: application/json' \\",
        '       -d \'{"infno":"1101","msgid":"H31010400001202503200912000001",'
        '"input":{"data":{"psn_no":"TEST0001"}}}\'',
        "Every answer names who served it in X-Resilgate-Upstream. Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def _demo_cache_key(config: Config) -> str | None:
    """Give the gateway a random stale-cache key for this run if none is configured (the
    workers inherit it); a note saying so, or None."""
    options = config.fallbacks.stale_cache
    uses_cache = any(route.fallback == "stale-cache" for route in config.routes)
    if not uses_cache or options.keys_file is not None or os.environ.get(options.keys_env):
        return None
    os.environ[options.keys_env] = new_key_text("demo")
    return (
        f"demo: no stale-cache key configured ({options.keys_env}): using a random key held "
        "in memory for this run only; cached copies do not outlive it"
    )


def _demo_admin_token(config: Config) -> tuple[Config, str | None]:
    """Give the demo an operator token for this run if the config has none; the config to
    serve and a note that shows the token (a demo's token is random and dies with it)."""
    if config.admin.tokens or config.admin.tokens_file is not None:
        return config, None
    token = new_token()
    entry = AdminToken(name="demo-operator", role="operator", sha256=token_hash(token))
    admin = config.admin.model_copy(update={"tokens": [entry]})
    listener = config.listeners.admin
    note = (
        "demo: no admin tokens configured: this run's operator token is below (random, for "
        "this run only)\n"
        f"  export RESILGATE_ADMIN_URL=http://{listener.host}:{listener.port}\n"
        f"  export RESILGATE_ADMIN_TOKEN={token}\n"
        "  resilgate status"
    )
    return config.model_copy(update={"admin": admin}), note


def run_demo(
    config: Config,
    port: int | None = None,
    ephemeral: bool = False,
    workers: int | None = None,
    ready_file: Path | None = None,
) -> int:
    """Start a simulator for every endpoint of the config, then serve until SIGTERM/SIGINT."""
    unknown = sorted(set(config.upstreams) - set(SIMULATOR_KINDS))
    if unknown:
        print(f"demo: no simulator for upstream {', '.join(unknown)}", file=sys.stderr)
        return 2
    workdir = config.resolve(Path("var/demo"))
    workdir.mkdir(parents=True, exist_ok=True)
    simulators: list[_Simulator] = []
    try:
        for name, upstream in config.upstreams.items():
            for endpoint in upstream.endpoints:
                simulators.append(_start(name, endpoint, ephemeral, workdir))
        _wait_ready(simulators)
        live = _with_ports(config, simulators, 0 if ephemeral else port, ephemeral)
        note = _demo_cache_key(live)
        if note is not None:
            print(note, flush=True)
        live, token_note = _demo_admin_token(live)
        if token_note is not None and not ephemeral:
            print(token_note, flush=True)
        gateway_ready = ready_file or workdir / "gateway.ready.json"
        gateway_ready.unlink(missing_ok=True)
        if ephemeral or port == 0:
            # The port is only known once the gateway listens; the banner follows it.
            print("demo: gateway port is in", gateway_ready, flush=True)
        else:
            print(_banner(live, simulators, live.listeners.public.port), flush=True)
        return serve(live, workers, gateway_ready)
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(simulators)
