"""Small helpers every simulator uses: JSON in and out, the hospital's clock."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from aiohttp import web

CN_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")
JSON = "application/json"


class BadRequest(ValueError):
    """The request body or parameters are unusable; the message says why."""


def now_cn() -> datetime:
    """The wall clock of a hospital in China (UTC+8)."""
    return datetime.now(CN_TZ)


def json_response(
    data: Any, status: int = 200, content_type: str = JSON, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type=content_type,
        headers=headers,
    )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or ``BadRequest``."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body
