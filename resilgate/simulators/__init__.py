"""Simulated hospital upstreams: HIS (FHIR R4), registration/queues, medical insurance.

Each simulator is an aiohttp application with seeded deterministic data, a synthetic test
patient for probes, a fault-injection control API under ``/_sim`` and a log of every write it
applied. ``echo`` is a generic upstream for proxy-rule tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from resilgate.readyfile import write_ready_file


@dataclass(frozen=True)
class SimulatorOptions:
    """What every simulator is built from."""

    kind: str
    site: str
    seed: int


AppFactory = Callable[[SimulatorOptions], web.Application]


SIMULATOR_KINDS = ("his", "registration", "insurance", "echo")
SITES = ("primary", "dr")


def build_app(options: SimulatorOptions) -> web.Application:
    """Build the application of one simulator kind (a module of this package)."""
    if options.kind not in SIMULATOR_KINDS:
        raise ValueError(f"unknown simulator {options.kind!r}")
    module = importlib.import_module(f"resilgate.simulators.{options.kind}")
    factory: AppFactory = module.build_app
    return factory(options)


async def serve_simulator(
    options: SimulatorOptions, host: str, port: int, ready_file: Path | None
) -> None:
    """Serve one simulator until SIGTERM or SIGINT."""
    # Long FHIR searches are legal; a handler stops when its client leaves, so /_sim/stats
    # counts only requests somebody still waits for.
    runner = web.AppRunner(
        build_app(options),
        access_log=None,
        shutdown_timeout=2.0,
        handler_cancellation=True,
        max_line_size=65536,
        max_field_size=65536,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    if ready_file is not None:
        write_ready_file(ready_file, {"http": bound_port})
    print(f"simulator {options.kind}/{options.site} listening on http://{host}:{bound_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run_simulator(
    options: SimulatorOptions, host: str, port: int, ready_file: Path | None = None
) -> None:
    uvloop.run(serve_simulator(options, host, port, ready_file))
