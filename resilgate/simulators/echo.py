"""A generic upstream for proxy-rule tests and benchmarks.

It reports exactly what reached it (method, raw target, every header, a checksum of the body)
and produces the awkward responses a proxy must pass through untouched: large streamed
bodies, bodies cut short, gzip, repeated ``Set-Cookie``, redirects, bodiless statuses,
hop-by-hop headers and slow answers. Faults and ``/_sim/stats`` come from
:mod:`resilgate.simulators.faults`.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib

import orjson
from aiohttp import web

from resilgate.simulators import SimulatorOptions
from resilgate.simulators.faults import install_faults

CHUNK = 64 * 1024
GZIP_TEXT = b'{"resourceType":"Bundle","note":"gzip passes through"}' * 20


def pattern_bytes(size: int) -> bytes:
    """The deterministic content of ``GET /bytes/{size}``, for checksums in tests."""
    block = bytes(range(256)) * (CHUNK // 256)
    full, rest = divmod(size, CHUNK)
    return block * full + block[:rest]


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    body = {
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_sha256": digest.hexdigest(),
        "body_length": length,
        "peer_port": (request.transport.get_extra_info("peername") or ("", 0))[1]
        if request.transport
        else 0,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = pattern_bytes(CHUNK)
    sent = 0
    while sent < size:
        piece = block[: min(CHUNK, size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def truncated(request: web.Request) -> web.StreamResponse:
    """Promise ``2 * size`` bytes, send ``size``, then drop the connection."""
    size = int(request.match_info["size"])
    response = web.StreamResponse()
    response.content_length = 2 * size
    await response.prepare(request)
    await response.write(pattern_bytes(size))
    if request.transport is not None:
        request.transport.abort()
    return response


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(
        body=gzip.compress(GZIP_TEXT, mtime=0),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )


async def cookies(request: web.Request) -> web.Response:
    response = web.Response(text="two cookies")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    return response


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/echo/redirected"})


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code, headers={"ETag": '"v1"'})
    return web.Response(status=code, body=orjson.dumps({"status": code}))


async def hop_by_hop(request: web.Request) -> web.Response:
    return web.Response(
        text="hop",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "Upgrade": "h2c",
            "X-End-To-End": "kept",
        },
    )


async def slow(request: web.Request) -> web.Response:
    await request.read()  # any method: a POST's body is taken first
    await asyncio.sleep(int(request.match_info["ms"]) / 1000)
    return web.Response(body=orjson.dumps({"slept_ms": int(request.match_info["ms"])}))


async def head_target(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1234, content_type="text/plain")


def build_app(options: SimulatorOptions) -> web.Application:
    app = web.Application()
    install_faults(app, options)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/bytes/{size:\\d+}", stream_bytes)
    app.router.add_get("/truncate/{size:\\d+}", truncated)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/redirect", redirect)
    app.router.add_route("*", "/status/{code:\\d{3}}", status)
    app.router.add_get("/hop-by-hop", hop_by_hop)
    app.router.add_route("*", "/slow/{ms:\\d+}", slow)
    app.router.add_get("/sized", head_target)
    return app
