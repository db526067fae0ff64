"""An emergency drill on the HIS: ops force its fallback for a few seconds through the admin
API while clinicians keep reading and ordering; the drill lifts itself, and its report counts
what the clients saw. Real gateway (two workers) and HIS simulator processes."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import Spawner, wait_until, wait_until_async
from tests.failover_stack import Stack, start_stack
from tests.gateway import OPERATOR_TOKEN
from tests.his_routes import HIS_READ_ROUTE, HIS_WRITE_ROUTE, medication_order

FHIR = "application/fhir+json"
KEYS = "t1:" + base64.b64encode(b"k" * 32).decode()
ROUTES = [HIS_WRITE_ROUTE, HIS_READ_ROUTE]
CLINICIAN = {"X-Clinician": "dr-a"}
READ_BEFORE = "/fhir/Patient/p-10002"  # dr-a read it before the drill: a stale copy is kept
DRILL_S = 3.0
GRACE_S = 2.0
LOOPS = 4
PACE_S = 0.02  # between two requests of one client loop: about 200 requests/s in all


def order(n: int) -> bytes:
    return orjson.dumps(medication_order(n))


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it, with the wall-clock time it was sent and answered."""

    sent: float
    received: float
    status: int
    degraded: str | None
    upstream: str | None


class Clinicians:
    """Loops of requests on the HIS routes, each on a new connection (so both workers get
    some): a record read before (stale copy), a read without identity (nothing kept for it:
    the notice), and a new order (journaled). ``pause`` holds them with none in flight."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.go = asyncio.Event()
        self.go.set()
        self.in_flight = 0
        self.stopped = False

    async def run(self) -> None:
        await asyncio.gather(*(self._loop(n) for n in range(LOOPS)))

    async def pause(self) -> None:
        self.go.clear()
        await wait_until_async(self._idle, 10, "requests in flight to end")

    async def _idle(self) -> bool:
        return self.in_flight == 0

    def resume(self) -> None:
        self.go.set()

    async def _loop(self, n: int) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            while not self.stopped:
                await self.go.wait()
                if not self.go.is_set():
                    continue  # woken by a resume that a pause has undone since
                self.in_flight += 1
                try:
                    self.answers.append(await self._request(http, n))
                finally:
                    self.in_flight -= 1
                n += 1
                await asyncio.sleep(PACE_S)

    async def _request(self, http: aiohttp.ClientSession, n: int) -> Answer:
        kind = n % 3
        if kind == 0:
            request = http.get(self.url + READ_BEFORE, headers=CLINICIAN)
        elif kind == 1:
            request = http.get(self.url + "/fhir/Patient/p-10003")
        else:
            headers = {"Content-Type": FHIR, **CLINICIAN}
            request = http.post(
                self.url + "/fhir/MedicationRequest", data=order(n), headers=headers
            )
        sent = time.time()
        async with request as response:
            await response.read()
            received = time.time()
            return Answer(
                sent,
                received,
                response.status,
                response.headers.get("X-Resilgate-Degraded"),
                response.headers.get("X-Resilgate-Upstream"),
            )


async def admin(
    http: aiohttp.ClientSession, stack: Stack, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    url = stack.gateway.url("admin") + path
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


def cache_keys(stack: Stack) -> list[str]:
    db = Path(stack.gateway.log_path).parent / "var" / "resilgate.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return [row[0] for row in connection.execute("SELECT key FROM cache")]


async def test_a_drill_on_the_his_lifts_itself_and_reports_what_clients_saw(
    spawn: Spawner,
) -> None:
    stack = start_stack(
        spawn,
        "his",
        ROUTES,
        dr_read_only=True,
        env={"RESILGATE_CACHE_KEYS": KEYS},
        workers=2,
        fallbacks={"stale_cache": {"identity_header": "X-Clinician"}},
        drills={"restore_grace_s": GRACE_S},
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + READ_BEFORE, headers=CLINICIAN) as response:
            assert response.status == 200 and "X-Resilgate-Upstream" in response.headers
        wait_until(lambda: cache_keys(stack), 5, "the record's copy to be kept")

        clients = Clinicians(stack.url)
        stream = asyncio.create_task(clients.run())
        await wait_until_async(lambda: _answered(clients, 30), 10, "traffic before the drill")
        # Nothing in flight while the drill starts: each request was sent, as the gateway
        # saw it, either before the drill started or after.
        await clients.pause()
        before = len(clients.answers)
        status, drill = await admin(
            http,
            stack,
            "POST",
            "/drills",
            {"target": "his", "mode": "fallback", "duration_s": DRILL_S, "reason": "HIS drill"},
        )
        clients.resume()
        assert status == 201, drill
        assert (drill["target"], drill["mode"], drill["state"]) == ("his", "fallback", "running")
        assert drill["ends_at"] == drill["started_at"] + DRILL_S

        async def finished() -> dict[str, Any] | None:
            status, found = await admin(http, stack, "GET", f"/drills/{drill['id']}")
            assert status == 200, found
            return found if found["state"] == "finished" else None

        wait_s = DRILL_S + GRACE_S + 5
        await wait_until_async(finished, wait_s, "the drill to finish")
        clients.stopped = True
        await stream
        done = await finished()
        assert done is not None
        mode = await admin(http, stack, "GET", "/modes/his")
        audit = await admin(http, stack, "GET", "/audit?limit=50")
        _, listed = await admin(http, stack, "GET", "/drills")

    started, ends = drill["started_at"], drill["ends_at"]
    report = done["report"]
    answers = clients.answers
    assert all(a.degraded is None and a.status < 300 for a in answers[:before])
    # Every degraded answer was to a request sent during the drill, and only those count.
    degraded = [a for a in answers if a.degraded is not None]
    assert degraded and all(started <= a.sent < ends for a in degraded)
    assert report["fallback_serves"] == dict(Counter(a.degraded for a in degraded))
    assert set(report["fallback_serves"]) == {"journal", "stale-cache", "notice"}
    errors = [a for a in answers if a.status >= 500]
    assert report["client_errors"] == len(errors) == report["fallback_serves"]["notice"]
    # A request sent before the end but answered after it may have reached the gateway
    # after the end (then it is not the drill's): only those may be counted or not.
    surely = [a for a in answers[before:] if a.received <= ends]
    maybe = [a for a in answers if a.sent < ends < a.received]
    assert all(a.degraded is not None or a.status < 300 for a in maybe)
    assert len(surely) <= report["requests"] <= len(surely) + len(maybe)
    live = [a for a in surely if a.upstream is not None]
    maybe_live = [a for a in maybe if a.upstream is not None]
    assert len(live) <= report["served_live"] <= len(live) + len(maybe_live)
    assert sum(report["statuses"].values()) == report["requests"]
    assert report["statuses"]["5xx"] == len(errors)
    assert report["workers"] == 2
    assert 0 < report["switch_to_degraded_s"] < 1.5
    assert 0 < report["switch_back_s"] < 1
    # The drill lifted itself: live answers again, and no mode left.
    after = [a for a in answers if a.sent >= ends]
    assert after and all(a.upstream is not None and a.status < 300 for a in after)
    assert mode[0] == 200 and (mode[1]["mode"], mode[1]["actor"]) == ("auto", None)
    assert [d["id"] for d in listed["drills"]] == [drill["id"]]
    assert listed["drills"][0]["report"] == report
    status, trail = audit
    assert status == 200
    by_action = {r["action"]: r for r in trail["records"] if r["target"] == "his"}
    start, end = by_action["drill.start"], by_action["drill.end"]
    assert (start["actor"], start["reason"]) == ("test-operator", "HIS drill")
    assert orjson.loads(start["detail"])["drill"] == drill["id"]
    assert end["actor"] == "resilgate"
    assert orjson.loads(end["detail"])["report"] == report
    print(
        f"\n[drill] requests={report['requests']} fallback_serves={report['fallback_serves']} "
        f"client_errors={report['client_errors']} switch_to_s={report['switch_to_degraded_s']} "
        f"switch_back_s={report['switch_back_s']} workers={report['workers']} "
        f"straddling_the_end={len(maybe)}"
    )


async def _answered(clients: Clinicians, count: int) -> bool:
    return len(clients.answers) >= count
