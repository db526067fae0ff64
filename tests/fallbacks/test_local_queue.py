"""The local queue: while registration is down, gateway replicas sharing Redis issue their own
queue numbers, show and call their queue, and enter every registration into the registration
system exactly once when it is back. Real processes: two gateways, Redis, simulators."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from fallbacks.queue_registration import keyed_tickets
from resilgate.sealing import new_key_text
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.failover_stack import FAST_HEALTH, sim_call
from tests.gateway import start_gateway
from tests.redis_server import RedisServer

ROUTES = [
    {
        "name": "registration-queues",
        "upstream": "registration",
        "criticality": "core",
        "fallback": "local-queue",
        "match": {"path_prefix": "/reg/v1/queues/"},
        "timeouts": {"connect_s": 0.5, "total_s": 3},
    },
    {
        "name": "registration-register",
        "upstream": "registration",
        "criticality": "core",
        "fallback": "local-queue",
        "match": {"path_prefix": "/reg/v1/registrations", "methods": ["POST", "PUT"]},
        "timeouts": {"connect_s": 0.5, "total_s": 3},
    },
]
LOCAL_NUMBER = re.compile(r"^L-NEI-(\d{4,})$")
SYSTEM_NUMBER = re.compile(r"^[A-Z]\d{3}$")  # the registration system's own, e.g. A023
JOURNAL = {"replay_rate_per_s": 200, "retry_after_s": 0.5, "claim_lease_s": 3}


@dataclass
class Site:
    """Two registration simulators, two gateways on one Redis."""

    primary: ServerProcess
    dr: ServerProcess
    gateways: list[ServerProcess]
    redis: RedisServer

    def down(self) -> None:
        """Both simulators killed, and every gateway's probes have seen it (so no request
        races a breaker that is just opening: see the report on proxy.py)."""
        for server in (self.primary, self.dr):
            server.signal(signal.SIGKILL)
            server.proc.wait(timeout=10)
        for gateway in self.gateways:
            wait_until(lambda g=gateway: probes_down(g), 5, f"{gateway.name} to see both down")

    def primary_back(self, spawn: Spawner) -> ServerProcess:
        """A new primary simulator on the killed one's port (an empty registration system)."""
        port = self.primary.port()
        self.primary = spawn.start(
            "sim-registration-primary-back",
            ["simulate", "registration", "--port", str(port), "--site", "primary"],
        )
        return self.primary


def probes_down(gateway: ServerProcess) -> bool:
    down = {r["endpoint"] for r in gateway.log_records() if r.get("event") == "probe_down"}
    return down >= {"registration/primary", "registration/dr"}


def start_site(
    spawn: Spawner,
    tmp_path: Path,
    redis: RedisServer,
    env: dict[str, str] | None = None,
    **local_queue: Any,
) -> Site:
    primary = spawn.simulator("registration", "primary")
    dr = spawn.simulator("registration", "dr")
    upstream = {
        "endpoints": [
            {"name": "primary", "url": primary.url(), "priority": 0},
            {"name": "dr", "url": dr.url(), "priority": 1},
        ],
        **FAST_HEALTH,
    }
    options = {"departments": ["NEI"], "timezone": "Asia/Shanghai", **local_queue}
    gateways = [
        start_gateway(
            spawn,
            {"registration": upstream},
            ROUTES,
            name=f"gw-{n}",
            env=env,
            state={
                "backend": "redis",
                "redis_url": redis.url,
                "spool_path": str(tmp_path / f"gw-{n}-spool.db"),
            },
            fallbacks={"local_queue": options, "journal": JOURNAL},
        )
        for n in range(2)
    ]
    return Site(primary, dr, gateways, redis)


def body(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "patientId": f"p-{10000 + n % 50}",
        "dept": "NEI",
        "doctorId": "d-01",
        "slotId": "NEI-walk-in",
        "payType": "self-pay",
        "channel": "window",
        **extra,
    }


async def register(
    http: aiohttp.ClientSession,
    gateway: ServerProcess,
    n: int,
    key: str | None = None,
    **extra: Any,
) -> tuple[int, dict[str, str], Any]:
    url = f"{gateway.url()}/reg/v1/registrations"
    headers = {"Idempotency-Key": key} if key else {}
    async with http.post(url, json=body(n, **extra), headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def register_many(gateway: ServerProcess, numbers: range) -> list[tuple[int, Any]]:
    """``len(numbers)`` registrations, 25 at a time; (status, answer) each."""
    limit = asyncio.Semaphore(25)

    async def one(http: aiohttp.ClientSession, n: int) -> tuple[int, Any]:
        async with limit:
            status, headers, answer = await register(http, gateway, n)
            assert status != 201 or headers["X-Resilgate-Degraded"] == "local-queue"
            return status, answer

    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(one(http, n) for n in numbers)))


def issued_in_order(gateway: ServerProcess) -> list[str]:
    """The numbers a gateway issued, in its own issue order (its log), less any it dropped
    (journaling failed: never handed out)."""
    records = gateway.log_records()
    dropped = {r["queue_no"] for r in records if r.get("event") == "local_queue_dropped"}
    return [
        r["queue_no"]
        for r in records
        if r.get("event") == "local_queue_issued" and r["queue_no"] not in dropped
    ]


def issued_at_least(gateway: ServerProcess, count: int) -> list[str] | None:
    issued = issued_in_order(gateway)
    return issued if len(issued) >= count else None


def number_of(queue_no: str) -> int:
    match = LOCAL_NUMBER.match(queue_no)
    assert match is not None, queue_no
    return int(match.group(1))


def check_numbers(site: Site, answers: list[list[tuple[int, Any]]]) -> list[str]:
    """All answers 201 with distinct local numbers, increasing per gateway in issue order."""
    every: list[str] = []
    for gateway, of_gateway in zip(site.gateways, answers, strict=True):
        assert [status for status, _ in of_gateway] == [201] * len(of_gateway), of_gateway[:3]
        numbers = [answer["queueNo"] for _, answer in of_gateway]
        count = len(numbers)
        in_order = wait_until(lambda g=gateway, n=count: issued_at_least(g, n), 5, "the issue log")
        assert sorted(in_order) == sorted(numbers)
        values = [number_of(q) for q in in_order]
        assert values == sorted(values) and len(set(values)) == len(values)
        every += numbers
    assert len(set(every)) == len(every)
    assert not any(SYSTEM_NUMBER.match(q) for q in every)
    return every


def reserve_full(gateway: ServerProcess, spare_blocks: int) -> bool:
    """After the gateway's last lease or block opened, ``spare_blocks`` wait in reserve."""
    events = [
        r
        for r in gateway.log_records()
        if r.get("event") in ("local_queue_block_leased", "local_queue_block_opened")
    ]
    return bool(events) and events[-1]["reserve_blocks"] >= spare_blocks


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with http.get(url) as response:
        return response.status, dict(response.headers), await response.json()


async def post_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    async with http.post(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_two_gateways_issue_500_distinct_increasing_numbers_while_registration_is_down(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    site = start_site(spawn, tmp_path, redis_server, block_size=20, spare_blocks=1)
    site.down()
    started = time.monotonic()
    answers = await asyncio.gather(
        register_many(site.gateways[0], range(250)), register_many(site.gateways[1], range(250))
    )
    took = time.monotonic() - started
    every = check_numbers(site, answers)
    print(f"\n[local-queue] 500 numbers from 2 gateways in {took:.2f}s, e.g. {every[:3]}")
    assert len(every) == 500

    some = answers[0][0][1]
    assert some["regNo"] is None and some["issuer"] == "gateway"
    assert some["statusUrl"] == f"/_resilgate/tickets/{some['ticket']}"
    async with aiohttp.ClientSession() as http:
        status, _, ticket = await get_json(http, site.gateways[1].url() + some["statusUrl"])
    assert status == 200 and ticket["state"] == "accepted" and ticket["queue"] == "registration"


async def test_numbers_keep_coming_from_the_reserve_with_redis_killed_and_all_are_entered_once(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    block_size, spare_blocks, after_kill = 50, 3, 125
    # The reserve left when Redis dies: spare blocks, plus what is left of the open block.
    assert block_size * spare_blocks >= after_kill
    site = start_site(
        spawn, tmp_path, redis_server, block_size=block_size, spare_blocks=spare_blocks
    )
    site.down()
    first = await asyncio.gather(
        register_many(site.gateways[0], range(125)), register_many(site.gateways[1], range(125))
    )
    for gateway in site.gateways:
        wait_until(lambda g=gateway: reserve_full(g, spare_blocks), 5, "the reserve refilled")

    redis_server.kill()
    second = await asyncio.gather(
        register_many(site.gateways[0], range(125, 250)),
        register_many(site.gateways[1], range(125, 250)),
    )
    answers = [first[0] + second[0], first[1] + second[1]]
    every = check_numbers(site, answers)
    assert len(every) == 500
    spooled = [  # journaled locally: Redis was down indeed
        r for g in site.gateways for r in g.log_records() if r.get("event") == "local_queue_spooled"
    ]
    assert len(spooled) == 250
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await get_json(http, site.gateways[0].url() + "/reg/v1/queues/NEI")
    assert (status, headers["X-Resilgate-Degraded"]) == (503, "notice")  # no store, no board

    redis_server.restart()
    primary = site.primary_back(spawn)
    tickets = {answer["ticket"]: answer["queueNo"] for of in answers for _, answer in of}

    def entered() -> int:
        writes = sim_call(primary, "GET", "/_sim/writes")["writes"]
        return sum(w["kind"] == "registration.external" for w in writes)

    started = time.monotonic()
    wait_until(lambda: entered() >= 500, 25, "500 back-entries")
    print(f"\n[local-queue] 500 back-entries in {time.monotonic() - started:.2f}s after recovery")
    log = sim_call(primary, "GET", "/_sim/writes")
    per_ticket = Counter(w["key"] for w in log["writes"] if w["kind"] == "registration.external")
    assert per_ticket == Counter(dict.fromkeys(tickets, 1))

    async def check(http: aiohttp.ClientSession, ticket: str) -> None:
        url = f"{site.gateways[0].url()}/_resilgate/tickets/{ticket}"
        status, _, state = await get_json(http, url)
        assert status == 200 and state["state"] in ("applied", "duplicate"), state
        _, _, registration = await get_json(
            http, f"{primary.url()}/reg/v1/registrations/external/{ticket}"
        )
        assert state["detail"]["regNo"] == registration["regNo"]
        assert state["detail"]["localQueueNo"] == registration["queueNo"] == tickets[ticket]
        assert registration["externalTicket"] == ticket

    async with aiohttp.ClientSession() as http:
        await wait_until_async(
            lambda: all_finished(http, site.gateways[1], list(tickets)), 10, "tickets finished"
        )
        await asyncio.gather(*(check(http, ticket) for ticket in tickets))


async def test_keyed_registrations_get_numbers_with_redis_killed_and_retries_the_same_one(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Real clients send ``Idempotency-Key``: the reserve serves them while Redis is down too. A
    retry to the same gateway gets the same number; one to the other gateway cannot be told
    from a new registration there and gets a second number, which is dropped (and logged)
    once Redis is back: exactly one registration per key is entered."""
    env = {"RESILGATE_CACHE_KEYS": new_key_text()}
    site = start_site(spawn, tmp_path, redis_server, env, block_size=20, spare_blocks=2)
    site.down()
    gw0, gw1 = site.gateways
    for gateway in site.gateways:
        wait_until(lambda g=gateway: reserve_full(g, 2), 5, "the reserve leased")
    keys = [f"reg-{n:02d}" for n in range(21)]

    async def keyed(http: aiohttp.ClientSession, gateway: ServerProcess, n: int) -> Any:
        status, headers, answer = await register(http, gateway, n, keys[n])
        assert (status, headers["X-Resilgate-Degraded"]) == (201, "local-queue"), answer
        return answer, headers.get("Idempotent-Replayed")

    async with aiohttp.ClientSession() as http:
        (first, _) = await keyed(http, gw0, 0)  # journaled in Redis
        assert first["ticket"] != keyed_tickets("registration-register", keys[0], None)[0]
        redis_server.kill()
        taken = [first] + [
            a for a, _ in await asyncio.gather(*(keyed(http, gw0, n) for n in range(1, 21)))
        ]
        numbers = [a["queueNo"] for a in taken]
        assert len(set(numbers)) == 21 and all(LOCAL_NUMBER.match(q) for q in numbers)
        retried = await asyncio.gather(*(keyed(http, gw0, n) for n in range(21)))
        assert retried == [(a, "true") for a in taken]  # the same number, found without Redis
        (other, _) = await keyed(http, gw1, 1)
        assert other["ticket"] == taken[1]["ticket"] and other["queueNo"] not in numbers
    spooled = [r for r in gw0.log_records() if r.get("event") == "local_queue_spooled"]
    assert len(spooled) == 20

    redis_server.restart()
    primary = site.primary_back(spawn)

    def dropped() -> list[dict[str, Any]]:
        return [
            r
            for g in site.gateways
            for r in g.log_records()
            if r.get("event") == "local_queue_dropped"
            and r.get("why") == "key_registered_elsewhere"
        ]

    (drop,) = wait_until(lambda: dropped() or None, 10, "the second number found dropped")
    pair = {taken[1]["queueNo"], other["queueNo"]}
    assert drop["ticket"] == other["ticket"] and {drop["queue_no"], drop["kept"]} == pair

    def entered() -> list[dict[str, Any]]:
        writes = sim_call(primary, "GET", "/_sim/writes")["writes"]
        return [w for w in writes if w["kind"] == "registration.external"]

    wait_until(lambda: len(entered()) >= 21, 15, "21 back-entries")
    assert Counter(w["key"] for w in entered()) == Counter({a["ticket"]: 1 for a in taken})
    async with aiohttp.ClientSession() as http:
        url = f"{primary.url()}/reg/v1/registrations/external/{other['ticket']}"
        _, _, registration = await get_json(http, url)
    assert registration["queueNo"] == drop["kept"]
    assert dropped() == [drop]


async def all_finished(
    http: aiohttp.ClientSession, gateway: ServerProcess, tickets: list[str]
) -> bool:
    states = await asyncio.gather(
        *(get_json(http, f"{gateway.url()}/_resilgate/tickets/{t}") for t in tickets)
    )
    return all(state["state"] in ("applied", "duplicate") for _, _, state in states)


async def wait_until_async(condition: Any, within_s: float, what: str) -> None:
    """``wait_until`` for a coroutine condition, on the test's own loop."""
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_board_shows_the_local_queue_masked_and_call_next_calls_it_across_gateways(
    spawn: Spawner, tmp_path: Path, redis_server: RedisServer
) -> None:
    site = start_site(spawn, tmp_path, redis_server, board_refresh_s=0.2)
    site.down()
    gw0, gw1 = site.gateways
    names = ["张建华", None, "李四", None, "王小明", None]
    queue: list[str] = []
    async with aiohttp.ClientSession() as http:
        for n, name in enumerate(names):  # one after the other: arrival order is known
            extra = {"patientName": name} if name else {}
            status, _, answer = await register(http, site.gateways[n % 2], n, **extra)
            assert status == 201, answer
            queue.append(answer["queueNo"])
        status, headers, refused = await register(http, gw0, 0, payType="cash")
        assert (status, refused["code"]) == (400, "invalid_pay_type")
        assert headers["X-Resilgate-Degraded"] == "local-queue"

        board_url = f"{gw1.url()}/reg/v1/queues/NEI"
        status, headers, board = await get_json(http, board_url)
        assert status == 200 and headers["X-Resilgate-Degraded"] == "local-queue"
        assert [e["queueNo"] for e in board] == queue
        assert [e["maskedName"] for e in board] == [
            "张*华", "p*****1", "李*", "p*****3", "王*明", "p*****5",
        ]  # fmt: skip
        assert {e["status"] for e in board} == {"WAITING"}

        status, _, called = await post_json(http, f"{gw0.url()}/reg/v1/queues/NEI/call-next")
        assert status == 200 and called == {
            "called": {"queueNo": queue[0], "maskedName": "张*华", "status": "CALLED"},
            "waiting": 5,
        }
        key = {"Idempotency-Key": "call-7f3a"}
        status, _, called = await post_json(http, f"{gw1.url()}/reg/v1/queues/NEI/call-next", key)
        assert (status, called["called"]["queueNo"], called["waiting"]) == (200, queue[1], 4)
        status, headers, again = await post_json(
            http, f"{gw0.url()}/reg/v1/queues/NEI/call-next", key
        )
        assert (status, again, headers.get("Idempotent-Replayed")) == (200, called, "true")
        status, _, called = await post_json(http, f"{gw0.url()}/reg/v1/queues/NEI/call-next")
        assert called["called"]["queueNo"] == queue[2]

        async def three_called() -> bool:
            _, _, board = await get_json(http, board_url)
            return [e["status"] for e in board][:3] == ["CALLED"] * 3

        await wait_until_async(three_called, 5, "three called on the board")
        _, _, board = await get_json(http, board_url)
        assert [e["status"] for e in board] == ["CALLED"] * 3 + ["WAITING"] * 3

        # Registration is back: the queue as it stood is entered, and calling goes on there.
        primary = site.primary_back(spawn)

        async def entered() -> bool:
            _, _, system = await get_json(http, f"{primary.url()}/reg/v1/queues/NEI")
            return len(system) == len(queue)

        await wait_until_async(entered, 15, "the local queue entered")
        _, _, system = await get_json(http, f"{primary.url()}/reg/v1/queues/NEI")
        assert [(e["queueNo"], e["status"]) for e in system] == [
            (q, "CALLED" if i < 3 else "WAITING") for i, q in enumerate(queue)
        ]

        async def live() -> bool:
            _, headers, _ = await get_json(http, board_url)
            return headers.get("X-Resilgate-Upstream") == "registration/primary"

        await wait_until_async(live, 10, "gw-1 to route the board to the system again")
        status, headers, called = await post_json(http, f"{gw1.url()}/reg/v1/queues/NEI/call-next")
        assert status == 200 and headers["X-Resilgate-Upstream"] == "registration/primary"
        assert called["called"]["queueNo"] == queue[3]
