"""Forwarding header rules, decided without I/O."""

from __future__ import annotations

from resilgate.headers import (
    RequestIds,
    client_response_headers,
    end_to_end,
    upstream_request_headers,
)


def raw(*pairs: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.encode(), v.encode()) for k, v in pairs)


def test_hop_by_hop_and_connection_listed_headers_dropped() -> None:
    headers = end_to_end(
        raw(
            ("Connection", "close, X-Private"),
            ("X-Private", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Connection", "keep-alive"),
            ("Expect", "100-continue"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        )
    )
    assert list(headers.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_forwarding_facts_appended() -> None:
    headers = upstream_request_headers(
        raw(("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"), ("Host", "his")),
        client_ip="127.0.0.1",
        scheme="http",
        host="his:8080",
        request_id="r1",
    )
    assert headers["X-Forwarded-For"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"
    assert headers["X-Forwarded-Host"] == "his:8080"
    assert headers["Via"] == "1.1 resilgate"
    assert "Host" not in headers


def test_response_names_who_served_and_never_trusts_upstream_copies() -> None:
    headers = client_response_headers(
        raw(("X-Resilgate-Upstream", "forged"), ("X-Request-ID", "other")), "r1", "his/primary"
    )
    assert headers.getall("X-Resilgate-Upstream") == ["his/primary"]
    assert headers.getall("X-Request-ID") == ["r1"]


def test_request_id_kept_when_sane_else_generated() -> None:
    request_id_from = RequestIds()
    assert request_id_from("abc-123") == "abc-123"
    generated = [request_id_from(bad) for bad in (None, "", "x" * 129, "has space", "new\nline")]
    assert all(len(value) == 32 for value in generated)
    assert len(set(generated)) == len(generated)
    other_worker = RequestIds()
    assert other_worker(None) not in generated
