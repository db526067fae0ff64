"""The stale cache: while the HIS is down, a clinician gets back what they read earlier,
marked stale with its age; nobody else gets it, and the store holds it only encrypted."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Spawner, wait_until
from tests.failover_stack import FAST_HEALTH, Stack, set_fault, sim_call, start_stack
from tests.gateway import primary, start_gateway
from tests.his_routes import HIS_READ_ROUTE

ENV = "RESILGATE_CACHE_KEYS"
KEYS = "t2:" + base64.b64encode(b"k" * 32).decode() + ",t1:" + base64.b64encode(b"j" * 32).decode()
ROUTES = [HIS_READ_ROUTE]
NOTICE = {"retry_after_s": 30}


def jwt(subject: str, signature: str = "c2lnbmVk") -> str:
    def segment(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{segment({'alg': 'RS256'})}.{segment({'sub': subject})}.{signature}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def database(stack: Stack) -> Path:
    return Path(stack.gateway.log_path).parent / "var" / "resilgate.db"


def cache_keys(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return [row[0] for row in connection.execute("SELECT key FROM cache")]


def cache_size(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return int(connection.execute("SELECT SUM(LENGTH(value)) FROM cache").fetchone()[0])


def kill_the_his(stack: Stack) -> None:
    for site in (stack.primary, stack.dr):
        os.kill(site.pid, signal.SIGKILL)


def assert_live(status: int, headers: dict[str, str]) -> None:
    assert status == 200 and headers["X-Resilgate-Upstream"].startswith("his/")
    assert "X-Resilgate-Degraded" not in headers


def assert_notice(status: int, headers: dict[str, str]) -> None:
    assert status == 503 and headers["X-Resilgate-Degraded"] == "notice"
    assert headers["Retry-After"] == "30" and "X-Resilgate-Upstream" not in headers


def assert_stale(status: int, headers: dict[str, str]) -> int:
    assert status == 200 and headers["X-Resilgate-Degraded"] == "stale-cache"
    assert "X-Resilgate-Upstream" not in headers and headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert "X-Resilgate-Fetched-At" in headers
    return int(headers["Age"])


async def test_an_earlier_read_is_served_stale_to_its_reader_only_and_kept_encrypted(
    spawn: Spawner,
) -> None:
    stack = start_stack(spawn, "his", ROUTES, env={ENV: KEYS}, fallbacks={"notice": NOTICE})
    db = database(stack)
    patient = "p-10001"
    url = f"{stack.url}/fhir/AllergyIntolerance?patient={patient}"
    dr_a, dr_b = jwt("dr-a"), jwt("dr-b")

    status, headers, _ = await get(url)  # no identity: never kept
    assert_live(status, headers)
    status, headers, live = await get(url, bearer(dr_a))
    assert_live(status, headers)
    wait_until(lambda: cache_keys(db), 5, "the copy to be kept")

    # The store holds the copy, and none of what it says or who read it.
    allergy = orjson.loads(live)["entry"][0]["resource"]
    record = [patient, allergy["code"]["text"], allergy["patient"]["display"]]
    assert all(text.encode() in live for text in record)
    stored = b"".join(part.read_bytes() for part in db.parent.glob("resilgate.db*"))
    for text in [*record, "dr-a", dr_a]:
        assert text.encode() not in stored, text
    assert not any(patient in key or "AllergyIntolerance" in key for key in cache_keys(db))

    kill_the_his(stack)
    status, headers, body = await get(url, bearer(dr_a))
    assert assert_stale(status, headers) >= 0 and body == live
    status, headers, body = await get(url, bearer(dr_b))
    assert_notice(status, headers)
    assert patient.encode() not in body
    forged = jwt("dr-a", signature="Zm9yZ2Vk")  # dr-a's subject, not dr-a's token
    assert_notice(*(await get(url, bearer(forged)))[:2])
    assert_notice(*(await get(url))[:2])
    assert len(cache_keys(db)) == 1  # the anonymous read was not kept
    declined = [r["reason"] for r in stack.events("stale_cache_declined")]
    assert declined == ["no copy", "no copy", "no identity"]
    logged = orjson.dumps(stack.gateway.log_records()).decode()
    assert patient not in logged and "dr-a" not in logged


async def test_live_answers_win_large_and_old_copies_are_not_served(spawn: Spawner) -> None:
    options = {"identity_header": "X-Clinician", "max_entry_bytes": 2048, "max_staleness_s": 4}
    stack = start_stack(
        spawn,
        "his",
        ROUTES,
        env={ENV: KEYS},
        fallbacks={"notice": NOTICE, "stale_cache": options},
    )
    db = database(stack)
    clinician = {"X-Clinician": "dr-a"}
    small = f"{stack.url}/fhir/Patient/p-10002"
    large = f"{stack.url}/fhir/Observation?patient=p-10002&category=laboratory"

    status, headers, big = await get(large, clinician)
    assert_live(status, headers)
    assert len(big) > 2048
    status, headers, record = await get(small, clinician)
    assert_live(status, headers)
    wait_until(lambda: cache_keys(db), 5, "the copy to be kept")

    # The HIS answers 404 now: that is the answer, not the copy kept before.
    for site in (stack.primary, stack.dr):
        set_fault(site, mode="error_rate", rate=1.0, status=404, path_prefix="/fhir/Patient/")
    status, headers, _ = await get(small, clinician)
    assert status == 404 and headers["X-Resilgate-Upstream"].startswith("his/")
    assert "X-Resilgate-Degraded" not in headers
    for site in (stack.primary, stack.dr):
        sim_call(site, "DELETE", "/_sim/fault")

    kill_the_his(stack)
    status, headers, body = await get(small, clinician)
    assert assert_stale(status, headers) <= 4 and body == record
    assert_notice(*(await get(large, clinician))[:2])  # too large to be kept
    assert len(cache_keys(db)) == 1

    async def too_old() -> bool:
        status, headers, _ = await get(small, clinician)
        if status == 200:
            assert_stale(status, headers)
            return False
        assert_notice(status, headers)
        return True

    await wait_for(too_old, 10, "the copy to grow older than max_staleness_s")


async def wait_for(condition: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """``wait_until`` for a condition that makes requests."""
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_cache_keeps_to_its_total_size_dropping_the_oldest_copies(
    spawn: Spawner,
) -> None:
    bound = 1300  # two sealed Patient resources (about 570 bytes each), not three
    options = {"identity_header": "X-Clinician", "max_total_bytes": bound}
    stack = start_stack(
        spawn, "his", ROUTES, env={ENV: KEYS}, fallbacks={"notice": NOTICE, "stale_cache": options}
    )
    db = database(stack)
    clinician = {"X-Clinician": "dr-a"}
    urls = [f"{stack.url}/fhir/Patient/p-1001{n}" for n in range(4)]
    records = []
    for url in urls:  # one at a time, so they expire in the order they were read
        kept = set(cache_keys(db))
        status, headers, record = await get(url, clinician)
        assert_live(status, headers)
        records.append(record)
        wait_until(lambda kept=kept: set(cache_keys(db)) - kept, 5, "the copy to be kept")
    assert len(cache_keys(db)) == 2 and cache_size(db) <= bound

    kill_the_his(stack)
    for url in urls[:2]:
        assert_notice(*(await get(url, clinician))[:2])
    for url, record in zip(urls[2:], records[2:], strict=True):
        status, headers, body = await get(url, clinician)
        assert_stale(status, headers)
        assert body == record


async def test_without_a_key_nothing_is_cached_and_the_notice_answers(spawn: Spawner) -> None:
    stack = start_stack(spawn, "his", ROUTES, env={ENV: ""}, fallbacks={"notice": NOTICE})
    url = f"{stack.url}/fhir/Patient/p-10003"
    status, headers, _ = await get(url, bearer(jwt("dr-a")))
    assert_live(status, headers)
    off = stack.events("stale_cache_off")
    assert len(off) == 1 and off[0]["level"] == "warning" and ENV in off[0]["reason"]
    kill_the_his(stack)
    assert_notice(*(await get(url, bearer(jwt("dr-a"))))[:2])
    assert cache_keys(database(stack)) == []


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ("k1:not-base64!", "key 'k1': not valid base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "key 'k1': 5 bytes after base64 decoding"),
    ],
)
def test_an_unusable_key_stops_the_gateway_with_a_clear_error(
    spawn: Spawner, keys: str, says: str
) -> None:
    with pytest.raises(AssertionError) as failed:
        start_gateway(spawn, {"his": primary("http://127.0.0.1:9")}, ROUTES, env={ENV: keys})
    assert f"error: fallbacks.stale_cache: environment variable {ENV}: {says}" in str(failed.value)


async def test_a_hung_his_gives_the_reader_the_stale_copy_not_an_error(spawn: Spawner) -> None:
    """Both sites stopped (SIGSTOP): the first read waits out its timeout at one site while
    the probes open the other's breaker, which then refuses the retry; the copy answers, not
    ``no_endpoint_available``."""
    health = {**FAST_HEALTH, "breaker": {"consecutive_failures": 5, "open_s": 30.0}}
    stack = start_stack(
        spawn, "his", ROUTES, health=health, env={ENV: KEYS}, fallbacks={"notice": NOTICE}
    )
    url = f"{stack.url}/fhir/Condition?patient=p-10002"
    status, headers, live = await get(url, bearer(jwt("dr-a")))
    assert_live(status, headers)
    wait_until(lambda: cache_keys(database(stack)), 5, "the copy to be kept")

    for site in (stack.primary, stack.dr):
        os.kill(site.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            status, headers, body = await get(url, bearer(jwt("dr-a")))
            assert_stale(status, headers)
            assert body == live
    finally:
        for site in (stack.primary, stack.dr):
            os.kill(site.pid, signal.SIGCONT)
