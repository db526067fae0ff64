"""The second reference: a bare aiohttp + uvloop pass-through proxy, no features at all.

``python -m benchmarks.passthrough --port P --upstream URL --workers N``: N processes share
the port with SO_REUSEPORT; each forwards method, path, headers and body to the upstream over
one pooled keep-alive session and copies the answer back. The ceiling of a naive Python proxy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Upgrade", "Host", "TE")
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=None)
        async with aiohttp.ClientSession(upstream, connector=connector, auto_decompress=False) as s:
            app[SESSION] = s
            yield

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() if request.can_read_body else None
        async with app[SESSION].request(
            request.method, request.raw_path, headers=headers, data=body
        ) as answer:
            content = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, body=content, headers=out)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def serve(port: int, upstream: str) -> None:
    web.run_app(
        build_app(upstream),
        host="127.0.0.1",
        port=port,
        reuse_port=True,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passthrough")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers == 1:
        serve(args.port, args.upstream)
        return
    children = [
        multiprocessing.Process(target=serve, args=(args.port, args.upstream))
        for _ in range(args.workers)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join()
    os._exit(0)


if __name__ == "__main__":
    main()
