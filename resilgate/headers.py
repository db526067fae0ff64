"""Header rules of a forwarding proxy (RFC 9110 section 7.6)."""

from __future__ import annotations

import itertools
import re
import secrets

from multidict import CIMultiDict

# RFC 9110 7.6.1 plus the legacy ones still seen on the wire; `Expect` is answered here.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy itself from the client connection, never copied verbatim.
_REWRITTEN = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})

REQUEST_ID = "X-Request-ID"
UPSTREAM = "X-Resilgate-Upstream"
VIA_TOKEN = "1.1 resilgate"

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

RawHeaders = tuple[tuple[bytes, bytes], ...]


class RequestIds:
    """New request ids: 32 hex digits, a random per-process prefix and a counter.

    Made in each worker after it starts, so ids are unique across workers and restarts
    without a system call per request.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def __call__(self, value: str | None) -> str:
        """The client's request id when it is sane, else a new one."""
        if value is not None and _REQUEST_ID_OK.match(value):
            return value
        return f"{self._prefix}{next(self._counter):016x}"


def _connection_tokens(raw: RawHeaders) -> frozenset[str]:
    tokens: set[str] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    return frozenset(tokens)


def end_to_end(raw: RawHeaders, also_drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The end-to-end headers of a message, repeated ones kept, in order."""
    drop = HOP_BY_HOP | _connection_tokens(raw) | also_drop
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw:
        text = name.decode("latin-1")
        if text.lower() not in drop:
            headers.add(text, value.decode("latin-1"))
    return headers


def _appended(existing: str | None, value: str) -> str:
    return f"{existing}, {value}" if existing else value


def _joined(raw: RawHeaders, name: bytes) -> str | None:
    """All values of a (repeatable) header as one comma-separated value, or None."""
    values = [v.decode("latin-1") for k, v in raw if k.lower() == name]
    return ", ".join(values) or None


def upstream_request_headers(
    raw: RawHeaders,
    *,
    client_ip: str | None,
    scheme: str,
    host: str,
    request_id: str,
) -> CIMultiDict[str]:
    """Headers to send upstream: end-to-end ones plus forwarding facts and the request id."""
    headers = end_to_end(raw, _REWRITTEN | {"x-request-id"})
    forwarded_for = _joined(raw, b"x-forwarded-for")
    if client_ip:
        headers["X-Forwarded-For"] = _appended(forwarded_for, client_ip)
    elif forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    headers["X-Forwarded-Proto"] = scheme
    headers["X-Forwarded-Host"] = host
    headers["Via"] = _appended(_joined(raw, b"via"), VIA_TOKEN)
    headers[REQUEST_ID] = request_id
    return headers


def client_response_headers(raw: RawHeaders, request_id: str, served_by: str) -> CIMultiDict[str]:
    """Headers to return to the client from an upstream response."""
    headers = end_to_end(raw, frozenset({"via", "x-request-id", "x-resilgate-upstream"}))
    headers["Via"] = _appended(_joined(raw, b"via"), VIA_TOKEN)
    headers[REQUEST_ID] = request_id
    headers[UPSTREAM] = served_by
    return headers
