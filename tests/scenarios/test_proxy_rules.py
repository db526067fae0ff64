"""Each proxy rule of the public listener, through a real gateway to a real upstream."""

from __future__ import annotations

import gzip
import hashlib
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from resilgate.simulators.echo import GZIP_TEXT
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.gateway import primary, start_gateway

ROUTES = [
    {
        "name": "small-body",
        "upstream": "echo",
        "match": {"path_prefix": "/echo/small"},
        "max_body_bytes": 100,
    },
    {
        "name": "settle",
        "upstream": "echo",
        "match": {
            "path": "/echo/envelope",
            "methods": ["POST"],
            "body": {"field": "infno", "values": ["2207"]},
        },
        "body_read_cap_bytes": 1024,
    },
    {
        "name": "trial",
        "upstream": "echo2",
        "match": {"path": "/echo/envelope", "methods": ["POST"]},
    },
    {
        "name": "only-get",
        "upstream": "echo",
        "match": {"path": "/echo/get-only", "methods": ["GET"]},
    },
    {
        "name": "api-host",
        "upstream": "echo2",
        "match": {"path_prefix": "/", "host": "api.hospital.test"},
    },
    {
        "name": "slow",
        "upstream": "echo",
        "match": {"path_prefix": "/slow/"},
        "timeouts": {"connect_s": 1, "total_s": 0.5},
    },
    {
        "name": "everything",
        "upstream": "echo",
        "match": {"path_prefix": "/", "methods": ["GET", "HEAD", "POST", "PUT", "DELETE"]},
    },
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def stack(module_spawn: Spawner) -> Iterator[ServerProcess]:
    spawn = module_spawn
    echo = spawn.simulator("echo")
    echo2 = spawn.simulator("echo", "dr")
    dead_url = f"http://127.0.0.1:{_closed_port()}"
    routes = list(ROUTES)
    # the unreachable upstream gets its own route ahead of the catch-all
    routes.insert(
        0, {"name": "unreachable", "upstream": "dead", "match": {"path_prefix": "/unreachable"}}
    )
    gateway = start_gateway(
        spawn,
        {
            "echo": primary(echo.url()),
            "echo2": primary(echo2.url(), "dr"),
            "dead": primary(dead_url),
        },
        routes,
    )
    gateway.extra["echo"] = echo
    yield gateway


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def _headers(echoed: dict[str, object]) -> list[tuple[str, str]]:
    pairs = echoed["headers"]
    assert isinstance(pairs, list)
    return [(str(k), str(v)) for k, v in pairs]


def _get(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in pairs if k.lower() == name.lower()]


async def test_response_names_upstream_and_route_order(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/echo/x", headers={"X-Request-ID": "order-1"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Resilgate-Upstream"] == "echo/primary"
    # host match: same path, other host, other upstream
    headers = {"Host": "API.hospital.test:8080", "X-Request-ID": "order-2"}
    async with client.get(stack.url() + "/echo/x", headers=headers) as resp:
        assert resp.headers["X-Resilgate-Upstream"] == "echo2/dr"
    # method match: POST does not take the GET-only route, falls to the catch-all
    async with client.get(stack.url() + "/echo/get-only", headers={"X-Request-ID": "order-3"}):
        pass
    headers = {"X-Request-ID": "order-4"}
    async with client.post(stack.url() + "/echo/get-only", data=b"x", headers=headers) as resp:
        assert resp.status == 200

    def routes_taken() -> list[str]:
        by_id = {
            r["request_id"]: r["route"] for r in stack.log_records() if r.get("event") == "access"
        }
        return [by_id.get(f"order-{n}", "") for n in range(1, 5)]

    wait_until(lambda: all(routes_taken()), what="access log lines")
    assert routes_taken() == ["everything", "api-host", "only-get", "everything"]


async def test_body_field_decides_route_and_body_arrives_intact(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    settle = orjson.dumps({"infno": "2207", "msgid": "M1", "input": {}})
    trial = orjson.dumps({"infno": "2206", "msgid": "M2", "input": {}})
    async with client.post(stack.url() + "/echo/envelope", data=settle) as resp:
        assert resp.headers["X-Resilgate-Upstream"] == "echo/primary"
        assert (await resp.json())["body_sha256"] == hashlib.sha256(settle).hexdigest()
    async with client.post(stack.url() + "/echo/envelope", data=trial) as resp:
        assert resp.headers["X-Resilgate-Upstream"] == "echo2/dr"
    async with client.post(stack.url() + "/echo/envelope", data=b"not json") as resp:
        assert resp.headers["X-Resilgate-Upstream"] == "echo2/dr"
    big = orjson.dumps({"infno": "2207", "pad": "x" * 2000})
    async with client.post(stack.url() + "/echo/envelope", data=big) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "request_body_too_large"


async def test_no_route_is_404_naming_the_path(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    # PATCH is taken by no route of this gateway
    async with client.patch(stack.url() + "/echo/x?q=1") as resp:
        assert resp.status == 404
        body = await resp.json()
        assert body["error"] == "no_route"
        assert body["path"] == "/echo/x"
        assert body["request_id"] == resp.headers["X-Request-ID"]
        assert "X-Resilgate-Upstream" not in resp.headers


async def test_unreachable_upstream_is_502_with_request_id(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/unreachable", headers={"X-Request-ID": "req-42"}) as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body["error"] == "upstream_unreachable"
        assert body["request_id"] == "req-42"
        assert body["upstream"] == "dead/primary"
        assert resp.headers["X-Request-ID"] == "req-42"
        assert "X-Resilgate-Upstream" not in resp.headers


async def test_timeout_is_504_with_request_id(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/slow/3000") as resp:
        assert resp.status == 504
        body = await resp.json()
        assert body["error"] == "upstream_timeout"
        assert body["request_id"] == resp.headers["X-Request-ID"]


async def test_per_route_body_limit_is_413(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.post(stack.url() + "/echo/small", data=b"x" * 101) as resp:
        assert resp.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 50

    async with client.post(stack.url() + "/echo/small", data=chunks()) as resp:
        assert resp.status == 413
    async with client.post(stack.url() + "/echo/small", data=b"x" * 100) as resp:
        assert resp.status == 200


async def test_path_and_query_forwarded_byte_for_byte(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    target = "/echo/a%2Fb/%E5%BC%A0?name=%E5%BC%A0%20%2B&x=1&x=2&empty="
    url = aiohttp.client.URL(stack.url() + target, encoded=True)
    async with client.get(url) as resp:
        assert (await resp.json())["raw_path"] == target


async def test_gzip_passes_through_undecoded(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == GZIP_TEXT


async def test_repeated_set_cookie_kept(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_redirect_passed_back_not_followed(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.get(stack.url() + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/echo/redirected"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("HEAD", "/sized", 200), ("GET", "/status/204", 204), ("GET", "/status/304", 304)],
)
def test_bodiless_answers_carry_no_body(
    stack: ServerProcess, method: str, path: str, status: int
) -> None:
    # A raw socket sees exactly what the gateway wrote: no stray body bytes before the next answer.
    with socket.create_connection(("127.0.0.1", stack.port())) as sock:
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\nGET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        sock.sendall(request.encode())
        data = b""
        sock.settimeout(5)
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(f"HTTP/1.1 {status}".encode())
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]
    if method == "HEAD":
        assert b"Content-Length: 1234" in first


async def test_chunked_upload_arrives_intact(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    parts = [bytes([i]) * 1000 for i in range(50)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with client.post(stack.url() + "/echo/upload", data=chunks()) as resp:
        echoed = await resp.json()
    assert echoed["body_length"] == 50_000
    assert echoed["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert _get(_headers(echoed), "Transfer-Encoding") == ["chunked"]


async def test_hop_by_hop_headers_removed_both_ways(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    sent = {
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "Upgrade": "websocket",
        "X-End-To-End": "kept",
    }
    async with client.get(stack.url() + "/echo/hop", headers=sent) as resp:
        received = _headers(await resp.json())
    names = {k.lower() for k, _ in received}
    for hop in ("x-client-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in names
    assert _get(received, "X-End-To-End") == ["kept"]

    async with client.get(stack.url() + "/hop-by-hop") as resp:
        for hop in ("X-Hop", "Keep-Alive", "Proxy-Authenticate", "Upgrade"):
            assert hop not in resp.headers
        assert resp.headers["X-End-To-End"] == "kept"


async def test_forwarding_headers_and_request_id(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    headers = {
        "X-Forwarded-For": "10.1.2.3",
        "Via": "1.1 lb",
        "X-Request-ID": "abc-123",
        "Host": "his.hospital.test",
    }
    async with client.get(stack.url() + "/echo/fwd", headers=headers) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"
        assert resp.headers["Via"].endswith("1.1 resilgate")
        received = _headers(await resp.json())
    assert _get(received, "X-Forwarded-For") == ["10.1.2.3, 127.0.0.1"]
    assert _get(received, "X-Forwarded-Proto") == ["http"]
    assert _get(received, "X-Forwarded-Host") == ["his.hospital.test"]
    assert _get(received, "Via") == ["1.1 lb, 1.1 resilgate"]
    assert _get(received, "X-Request-ID") == ["abc-123"]
    assert _get(received, "Host") != ["his.hospital.test"]

    async with client.get(stack.url() + "/echo/fwd") as resp:
        generated = resp.headers["X-Request-ID"]
        received = _headers(await resp.json())
    assert len(generated) == 32
    assert _get(received, "X-Request-ID") == [generated]

    # the gateway adds none of the client library's automatic headers
    bare = ["Accept", "Accept-Encoding", "User-Agent"]
    async with client.get(stack.url() + "/echo/bare", skip_auto_headers=bare) as resp:
        received = _headers(await resp.json())
    assert not {name.lower() for name in bare} & {k.lower() for k, _ in received}


async def test_access_log_line_per_request_without_path_or_body(
    stack: ServerProcess, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        stack.url() + "/echo/Patient/p-10086",
        data=b'{"name":"secret"}',
        headers={"X-Request-ID": "log-1"},
    ) as resp:
        assert resp.status == 200
    records = wait_until(
        lambda: [r for r in stack.log_records() if r.get("request_id") == "log-1"],
        what="access log line",
    )
    assert len(records) == 1
    record = records[0]
    assert record["event"] == "access"
    assert record["route"] == "everything"
    assert record["upstream"] == "echo/primary"
    assert record["status"] == 200
    assert isinstance(record["duration_ms"], float)
    raw = stack.log_path.read_text()
    assert "p-10086" not in raw
    assert "secret" not in raw
