"""The local-queue fallback in one process, on a real store: which requests it answers, retries
with ``Idempotency-Key`` (with and without the store), calling nobody twice, and running dry
without ever repeating a number."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from fallbacks.local_queue import LocalQueue
from fallbacks.queue_board import called_key
from fallbacks.queue_registration import keyed_tickets
from resilgate.config import Config
from resilgate.errors import StartupError
from resilgate.fallback import FallbackRequest, FallbackServices, UpstreamClient
from resilgate.metrics import Metrics
from resilgate.sealing import new_key_text
from resilgate.state.memory import MemoryStore
from resilgate.state.redis import RedisStore
from resilgate.state.store import StateStore
from tests.conftest import wait_until_async
from tests.redis_server import RedisServer

REG = "/reg/v1/registrations"
BODY = {
    "patientId": "p-10086",
    "dept": "NEI",
    "doctorId": "d-01",
    "slotId": "NEI-walk-in",
    "payType": "insured",
    "channel": "window",
}


def make_queue(store: StateStore | None, **options: Any) -> LocalQueue:
    route = {"upstream": "registration", "fallback": "local-queue", "criticality": "core"}
    config = Config.model_validate(
        {
            "upstreams": {
                "registration": {
                    "endpoints": [{"name": "p", "url": "http://127.0.0.1:1", "priority": 0}]
                }
            },
            "routes": [
                {**route, "name": "queues", "match": {"path_prefix": "/reg/v1/queues/"}},
                {**route, "name": "register", "match": {"path_prefix": "/reg/v1/registrations"}},
            ],
            "fallbacks": {"local_queue": {"timezone": "Asia/Shanghai", **options}},
        }
    )
    services = FallbackServices(config, Metrics(), "test/1", UpstreamClient(), lambda: store)
    return LocalQueue(services)


def request(
    queue: LocalQueue,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> FallbackRequest:
    routes = {r.name: r for r in queue.services.config.routes}
    route = routes["queues" if path.startswith("/reg/v1/queues/") else "register"]
    return FallbackRequest(
        route,
        method,
        path,
        query or {},
        path,
        CIMultiDictProxy(CIMultiDict(headers or {})),
        None if body is None else orjson.dumps(body),
        "rid-1",
        "test",
    )


def read(answer: web.StreamResponse | None) -> tuple[int, Any]:
    assert isinstance(answer, web.Response) and answer.body is not None
    assert answer.headers["X-Resilgate-Degraded"] == "local-queue"
    return answer.status, orjson.loads(answer.body)  # type: ignore[arg-type]


@pytest.fixture
async def memory() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await store.open()
    yield store
    await store.close()


async def test_a_retry_with_the_same_key_gets_the_same_number_and_a_reused_key_is_refused(
    memory: MemoryStore,
) -> None:
    queue = make_queue(memory)
    key = {"Idempotency-Key": "reg-1"}
    first = await queue.serve(request(queue, "POST", REG, BODY, key))
    status, answer = read(first)
    assert status == 201 and answer["queueNo"] == "L-NEI-0001"
    again = await queue.serve(request(queue, "POST", REG, BODY, key))
    assert read(again) == (201, answer)
    assert again is not None and again.headers["Idempotent-Replayed"] == "true"
    other = {**BODY, "payType": "self-pay"}
    status, refused = read(await queue.serve(request(queue, "POST", REG, other, key)))
    assert (status, refused["code"]) == (422, "idempotency_key_reused")
    status, answer = read(await queue.serve(request(queue, "POST", REG, BODY)))
    assert (status, answer["queueNo"]) == (201, "L-NEI-0002")  # no key: a new registration


async def test_what_waits_for_the_registration_system(memory: MemoryStore) -> None:
    queue = make_queue(memory)
    tomorrow = {**BODY, "slotId": "NEI-20990101-d-01-AM"}
    assert await queue.serve(request(queue, "POST", REG, tomorrow)) is None
    for method, path in [
        ("POST", f"{REG}/NEI2025032000001/cancel"),
        ("POST", f"{REG}/NEI2025032000001/check-in"),
        ("PUT", f"{REG}/external/R-1"),
        ("POST", "/reg/v1/queues/NEI/entries/L-NEI-0001/recall"),
        ("DELETE", "/reg/v1/queues/NEI"),
    ]:
        assert await queue.serve(request(queue, method, path, {})) is None, path
    status, refused = read(await queue.serve(request(queue, "POST", REG, {**BODY, "dept": ""})))
    assert (status, refused["code"]) == (400, "missing_fields")
    board = request(queue, "GET", "/reg/v1/queues/NEI", query={"date": "2025-13-01"})
    assert read(await queue.serve(board))[0] == 400


async def test_call_next_with_a_key_is_answered_once_and_the_key_is_not_reused_elsewhere(
    memory: MemoryStore,
) -> None:
    queue = make_queue(memory)
    for _ in range(2):
        read(await queue.serve(request(queue, "POST", REG, BODY)))
    key = {"Idempotency-Key": "call-1"}
    call = request(queue, "POST", "/reg/v1/queues/NEI/call-next", headers=key)
    status, called = read(await queue.serve(call))
    assert status == 200 and called["called"]["queueNo"] == "L-NEI-0001"
    assert read(await queue.serve(call)) == (200, called)
    elsewhere = request(queue, "POST", "/reg/v1/queues/WAI/call-next", headers=key)
    assert read(await queue.serve(elsewhere))[0] == 422
    status, board = read(await queue.serve(request(queue, "GET", "/reg/v1/queues/NEI")))
    assert [e["status"] for e in board] == ["CALLED", "WAITING"]
    assert "p-10086" not in orjson.dumps(board).decode()


async def test_numbers_run_dry_without_the_store_and_never_repeat(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = RedisStore(redis_server.url, spool_path=tmp_path / "spool.db")
    await store.open()
    try:
        queue = make_queue(store, block_size=3, spare_blocks=2, departments=["NEI"])
        await queue.start()  # leases the reserve of today's NEI numbers
        status, answer = read(await queue.serve(request(queue, "POST", REG, BODY)))
        assert status == 201
        numbers = [answer["queueNo"]]
        redis_server.kill()
        while (answer := await queue.serve(request(queue, "POST", REG, BODY))) is not None:
            numbers.append(read(answer)[1]["queueNo"])
        # The open block and both spare ones, nothing more, nothing twice.
        assert numbers == [f"L-NEI-{n:04d}" for n in range(1, 10)]
        assert "NEI/" in repr(queue) and "open_left=0 reserve=0" in repr(queue)
        assert await queue.serve(request(queue, "GET", "/reg/v1/queues/NEI")) is None
    finally:
        await queue.services.cancel_tasks()
        await store.close()


async def test_call_next_never_calls_anyone_twice_when_the_called_list_is_lost(
    memory: MemoryStore,
) -> None:
    queue = make_queue(memory)
    for _ in range(3):
        read(await queue.serve(request(queue, "POST", REG, BODY)))
    call = request(queue, "POST", "/reg/v1/queues/NEI/call-next")
    assert read(await queue.serve(call))[1]["called"]["queueNo"] == "L-NEI-0001"
    # The cache evicted the called list (it is bounded): the first is still called, once.
    await memory.cache_put(called_key("NEI", queue.today().isoformat()), b"[]", 60)
    status, called = read(await queue.serve(call))
    assert (status, called["called"]["queueNo"], called["waiting"]) == (200, "L-NEI-0002", 1)
    status, board = read(await queue.serve(request(queue, "GET", "/reg/v1/queues/NEI")))
    assert [e["status"] for e in board] == ["CALLED", "CALLED", "WAITING"]


async def test_an_unusable_ticket_key_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILGATE_CACHE_KEYS", "k1:not-base64")
    with pytest.raises(StartupError, match="local-queue tickets"):
        make_queue(None)


async def test_keyed_registrations_go_on_without_redis_and_a_second_number_is_found_dropped(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILGATE_CACHE_KEYS", new_key_text())
    stores = [RedisStore(redis_server.url, spool_path=tmp_path / f"{n}.db") for n in "ab"]
    for store in stores:
        await store.open()
    here, there = queues = [
        make_queue(store, block_size=5, spare_blocks=2, departments=["NEI"]) for store in stores
    ]
    try:
        with capture_logs() as logs:
            for queue in queues:
                await queue.start()  # leases the reserve of today's NEI numbers

            async def post(queue: LocalQueue, key: str) -> tuple[web.StreamResponse, Any]:
                answer = await queue.serve(
                    request(queue, "POST", REG, BODY, {"Idempotency-Key": key})
                )
                assert answer is not None
                return answer, read(answer)[1]

            _, before = await post(here, "k0")  # journaled in Redis
            (ticket,) = keyed_tickets("register", "k0", here.keyring)
            assert before["ticket"] == ticket != keyed_tickets("register", "k0", None)[0]
            redis_server.kill()
            _, first = await post(here, "k1")  # spooled
            assert first["queueNo"] != before["queueNo"]
            for key, earlier in [("k1", first), ("k0", before)]:  # retries here: the same
                again, answer = await post(here, key)
                assert answer == earlier and again.headers["Idempotent-Replayed"] == "true"
            # Retries that reach another process: it cannot tell, and issues again.
            elsewhere = {key: (await post(there, key))[1] for key in ("k0", "k1")}
            assert elsewhere["k1"]["ticket"] == first["ticket"]
            assert elsewhere["k1"]["queueNo"] not in (first["queueNo"], before["queueNo"])

            redis_server.restart()
            await wait_until_async(
                lambda: not here._unchecked and not there._unchecked, 10, "confirmed"
            )
        dropped = {
            (r["ticket"], r["queue_no"], r["kept"])
            for r in logs
            if r["event"] == "local_queue_dropped" and r["why"] == "key_registered_elsewhere"
        }
        kept = {t: read_payload(await stores[0].journal_get(t)) for t in (ticket, first["ticket"])}
        assert kept[ticket] == before["queueNo"]  # in Redis before the outage: it stands
        k1_numbers = {first["queueNo"], elsewhere["k1"]["queueNo"]}
        assert kept[first["ticket"]] in k1_numbers  # whichever spool drained first
        assert dropped == {
            (ticket, elsewhere["k0"]["queueNo"], before["queueNo"]),
            (first["ticket"], *(k1_numbers - {kept[first["ticket"]]}), kept[first["ticket"]]),
        }
    finally:
        for queue in queues:
            await queue.services.cancel_tasks()
        for store in stores:
            await store.close()


def read_payload(entry: Any) -> str:
    assert entry is not None and entry.seq > 0
    queue_no: str = orjson.loads(entry.payload)["queue_no"]
    return queue_no
