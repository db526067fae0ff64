"""Probes against real simulator processes: what an ops engineer sees when a system fails."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from structlog.testing import capture_logs

from resilgate.config import Probes
from resilgate.probes import EndpointProbes, ProbeVerdict
from resilgate.upstream import Endpoint
from tests.conftest import ServerProcess, Spawner, wait_until

T = TypeVar("T")

# The synthetic transactions shipped for the three simulated systems (upstreams.<name>.probes).
SHIPPED_PROBES = """
insurance:
  synthetic:
    method: POST
    path: /fsi/api/callService
    headers:
      Content-Type: application/json
    body: >-
      {"infno":"2206","msgid":"H31010400001{msgid_time}{seq4}","inf_time":"{inf_time}",
      "fixmedins_code":"H31010400001","fixmedins_name":"resilgate probe",
      "mdtrtarea_admvs":"310000","insuplc_admdvs":"310000","recer_sys_code":"resilgate",
      "infver":"V1.0","opter_type":"1","opter":"resilgate-probe","opter_name":"resilgate probe",
      "input":{"data":{"psn_no":"TEST0001","mdtrt_id":"MD250320001","chrg_bchno":"PROBE0001",
      "medfee_sumamt":1.00,"insutype":"310","med_type":"11","acct_used_flag":"0"}}}
    failure_body:
      format: insurance_envelope
his:
  synthetic:
    path: /fhir/AllergyIntolerance?patient=test-0001
    headers:
      Accept: application/fhir+json
    failure_body:
      format: fhir
registration:
  synthetic:
    path: /reg/v1/queues/TEST
"""

FAST = {"interval_s": 0.05, "timeout_s": 0.5, "rise": 2, "fall": 2}


class ProbeRunner:
    """Runs one endpoint's probes in an event loop of its own thread, so tests can wait_until."""

    def __init__(self, probes: EndpointProbes) -> None:
        self.probes = probes
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="probes")
        self._thread.start()
        self._task = self.call(self._start())

    async def _start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await self.probes.run(session)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def control(self, sim: ServerProcess, method: str, path: str, **body: Any) -> Any:
        """A call to the simulator's ``/_sim`` API; its JSON answer."""

        async def request() -> Any:
            async with (
                aiohttp.ClientSession() as http,
                http.request(method, sim.url() + path, json=body or None) as response,
            ):
                assert response.status == 200, await response.text()
                return await response.json()

        return self.call(request())

    def verdict_is(self, verdict: ProbeVerdict) -> bool:
        return self.probes.verdict == verdict

    def close(self) -> None:
        async def stop() -> None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextmanager
def probing(
    url: str, probes: dict[str, Any], label: tuple[str, str] = ("his", "primary")
) -> Iterator[tuple[ProbeRunner, list[ProbeVerdict]]]:
    """Probes of one endpoint running in the background; the endpoint verdicts seen so far."""
    changes: list[ProbeVerdict] = []
    endpoint = Endpoint(label[0], label[1], 0, False, url)
    runner = ProbeRunner(
        EndpointProbes(
            endpoint,
            Probes.model_validate(probes),
            on_change=lambda changed: changes.append(changed.verdict),
        )
    )
    try:
        yield runner, changes
    finally:
        runner.close()


def test_a_stopped_his_is_marked_down_and_up_again_when_it_resumes(spawn: Spawner) -> None:
    his = spawn.simulator("his")
    with probing(his.url(), {"http": FAST}) as (runner, changes):
        wait_until(lambda: runner.verdict_is("up"), 5, "the HIS to be probed up")
        his.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: runner.verdict_is("down"), 5, "the stopped HIS to be down")
            (http,) = runner.probes.checks
            assert repr(http).startswith("<CheckState his/primary http DOWN")
            assert "TimeoutError" in http.last_detail
        finally:
            his.signal(signal.SIGCONT)
        wait_until(lambda: runner.verdict_is("up"), 5, "the resumed HIS to be up again")
    assert changes == ["up", "down", "up"]


def test_the_synthetic_probe_sees_a_platform_error_that_the_http_check_misses(
    spawn: Spawner,
) -> None:
    his = spawn.simulator("his")
    probes = {
        "http": FAST,
        "synthetic": {
            **FAST,
            "path": "/fhir/Patient/test-0001",
            "failure_body": {"format": "fhir"},
        },
    }
    with capture_logs() as logs, probing(his.url(), probes) as (runner, changes):
        http, synthetic = runner.probes.checks
        wait_until(lambda: runner.verdict_is("up"), 5, "the HIS to be probed up")
        runner.control(his, "PUT", "/_sim/fault", mode="platform_error", path_prefix="/fhir/")
        wait_until(lambda: runner.verdict_is("down"), 5, "the failing HIS to be down")
        assert http.verdict == "up"  # /health still answers
        assert synthetic.last_detail == "OperationOutcome transient"
        runner.control(his, "DELETE", "/_sim/fault")
        wait_until(lambda: runner.verdict_is("up"), 5, "the recovered HIS to be up again")
        stats = runner.control(his, "GET", "/_sim/stats")
    assert changes == ["up", "down", "up"]
    assert stats["probes"] == stats["requests"] > 0
    events = [(e["event"], e["check"]) for e in logs if e.get("component") == "resilgate.probes"]
    assert ("probe_suspect", "synthetic") in events
    assert ("probe_down", "synthetic") in events
    assert ("probe_up", "synthetic") in events
    down = next(e for e in logs if e["event"] == "probe_down")
    assert down["log_level"] == "warning"
    assert down["endpoint"] == "his/primary"
    assert down["detail"] == "OperationOutcome transient"


@pytest.mark.parametrize("kind", ["insurance", "his", "registration"])
def test_shipped_synthetic_probes_pass_on_a_fresh_simulator_and_commit_nothing(
    spawn: Spawner, kind: str
) -> None:
    sim = spawn.simulator(kind)
    probes = yaml.safe_load(SHIPPED_PROBES)[kind]
    probes["synthetic"].update(FAST)
    probes["http"] = FAST
    with probing(sim.url(), probes, (kind, "primary")) as (runner, _):
        wait_until(lambda: runner.verdict_is("up"), 5, f"the {kind} probes to pass")
        runner.control(sim, "PUT", "/_sim/fault", mode="platform_error")
        wait_until(lambda: runner.verdict_is("down"), 5, f"{kind} platform error to be seen")
        runner.control(sim, "DELETE", "/_sim/fault")
        wait_until(lambda: runner.verdict_is("up"), 5, f"{kind} to be up again")
        log = runner.control(sim, "GET", "/_sim/writes")
    assert log == {"writes": [], "duplicates": []}


def test_an_endpoint_nobody_listens_on_is_down_with_the_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connecting is refused
    with probing(f"http://127.0.0.1:{port}", {"http": FAST}) as (runner, changes):
        wait_until(lambda: runner.verdict_is("down"), 5, "the closed port to be down")
        (http,) = runner.probes.checks
        assert http.last_detail.startswith("ClientConnectorError: ")
    assert changes == ["down"]
