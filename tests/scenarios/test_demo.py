"""`resilgate demo` (what `make run` starts): every simulated system answers through the gateway."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import REPO, ServerProcess, Spawner, wait_until


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def start_demo(spawn: Spawner, tmp_path: Path) -> tuple[ServerProcess, list[int]]:
    """The shipped example config, run by `resilgate demo` on free ports."""
    shutil.copy(REPO / "resilgate.yaml", tmp_path / "resilgate.yaml")
    shutil.copytree(REPO / "routes", tmp_path / "routes")
    demo = spawn.start(
        "demo",
        ["demo", "--config", str(tmp_path / "resilgate.yaml"), "--ephemeral", "--workers", "1"],
        timeout=60,
    )
    simulator_pids = [
        orjson.loads(ready.read_bytes())["pid"]
        for ready in (tmp_path / "var" / "demo").glob("*.ready.json")
        if not ready.name.startswith("gateway")
    ]
    assert len(simulator_pids) == 6
    return demo, simulator_pids


async def test_demo_serves_every_system_and_stops_cleanly(spawn: Spawner, tmp_path: Path) -> None:
    demo, simulator_pids = start_demo(spawn, tmp_path)
    envelope = {
        "infno": "1101",
        "msgid": "H31010400001202503200912000001",
        "inf_time": "2025-03-20 09:12:00",
        "fixmedins_code": "H31010400001",
        "opter": "kiosk-07",
        "opter_type": "2",
        "insuplc_admdvs": "310000",
        "input": {"data": {"psn_no": "TEST0001"}},
    }
    async with aiohttp.ClientSession() as client:
        async with client.get(demo.url() + "/fhir/Patient/test-0001") as resp:
            assert resp.status == 200
            assert resp.headers["X-Resilgate-Upstream"] == "his/primary"
            assert (await resp.json(content_type=None))["id"] == "test-0001"
        async with client.get(demo.url() + "/reg/v1/departments") as resp:
            assert resp.status == 200
            assert resp.headers["X-Resilgate-Upstream"] == "registration/primary"
        async with client.post(
            demo.url() + "/fsi/api/callService", data=orjson.dumps(envelope)
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Resilgate-Upstream"] == "insurance/primary"
            assert (await resp.json(content_type=None))["infcode"] == "0"

    def synthetic_up() -> set[str]:
        return {
            r["endpoint"]
            for r in demo.log_records()
            if r.get("event") == "probe_up" and r.get("check") == "synthetic"
        }

    # The shipped synthetic probes (HIS allergy read, registration board, insurance 2206 for
    # the test patient) pass against the simulators on every endpoint.
    wait_until(lambda: len(synthetic_up()) == 6, 15, "every synthetic probe to pass")
    demo.signal(signal.SIGTERM)
    assert demo.proc.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(pid) for pid in simulator_pids), 10, "simulators to stop")


def test_killed_demo_takes_its_simulators_along(spawn: Spawner, tmp_path: Path) -> None:
    demo, simulator_pids = start_demo(spawn, tmp_path)
    demo.signal(signal.SIGKILL)
    # the next `make run` must find the ports free again
    wait_until(lambda: not any(alive(pid) for pid in simulator_pids), 10, "simulators to stop")
