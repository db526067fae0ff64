"""The stale cache's pure parts: how a copy is kept, under which store key, for how long, and
the headers it is served with."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fallbacks.stale_cache import (
    FETCHED_AT,
    CachedCopy,
    copy_label,
    keep_for_s,
    stale_headers,
    store_keys,
)
from resilgate.identity import Caller
from resilgate.sealing import KEY_BYTES, Keyring

A = Caller("header", b"a" * 32)
B = Caller("header", b"b" * 32)


@given(
    st.integers(100, 599),
    st.dictionaries(st.sampled_from(["Content-Type", "Content-Encoding"]), st.text()),
    st.floats(0, 4e9),
    st.binary(max_size=2048),
)
def test_a_copy_decodes_to_itself(
    status: int, headers: dict[str, str], at: float, body: bytes
) -> None:
    copy = CachedCopy(status, headers, at, body)
    assert CachedCopy.decode(copy.encode()) == copy


@pytest.mark.parametrize("raw", [b"", b"{}", b'{"status":200}\n', b"[1]\nbody", b"\xff\nx"])
def test_what_is_not_a_copy_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        CachedCopy.decode(raw)


@given(st.text(max_size=20), st.text(max_size=40), st.text(max_size=20), st.text(max_size=40))
def test_a_label_names_one_route_path_and_caller(r1: str, p1: str, r2: str, p2: str) -> None:
    same = (r1, p1) == (r2, p2)
    assert (copy_label(r1, p1, A) == copy_label(r2, p2, A)) == same
    assert copy_label(r1, p1, A) != copy_label(r1, p1, B)


def test_store_keys_show_no_path_or_caller() -> None:
    keyring = Keyring({"k2": b"2" * KEY_BYTES, "k1": b"1" * KEY_BYTES})
    keys = store_keys(keyring, copy_label("his-read", "/fhir/Patient/p-10001", A))
    assert len(keys) == 2 and all(key.startswith("stale-cache:") for key in keys)
    assert not any("p-10001" in key or "his-read" in key for key in keys)


def test_a_copy_is_kept_until_too_old_or_its_token_expires() -> None:
    assert keep_for_s(3600, A, 1000.0) == 3600
    expiring = Caller("token", b"t" * 32, expires_at=1600.0)
    assert keep_for_s(3600, expiring, 1000.0) == 600
    assert keep_for_s(60, expiring, 1000.0) == 60


def test_stale_headers_carry_whole_seconds_of_age_and_the_fetch_time() -> None:
    copy = CachedCopy(200, {"Content-Type": "application/fhir+json"}, 1742433120.0, b"{}")
    headers = stale_headers(copy, 1742433120.0 + 61.9)
    assert headers == {
        "Content-Type": "application/fhir+json",
        "Age": "61",
        FETCHED_AT: "2025-03-20T01:12:00Z",
    }
    assert stale_headers(copy, 1742433120.0 - 5)["Age"] == "0"  # another replica's clock
