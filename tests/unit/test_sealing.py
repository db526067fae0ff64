"""Sealing at rest: what is sealed opens only under the same key and associated data; keys
rotate; unusable keys are refused with an error that names their source."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilgate.sealing import (
    KEY_BYTES,
    Keyring,
    KeyringError,
    Unsealable,
    load_keyring,
    new_key_text,
    parse_keyring,
)

OLD = b"o" * KEY_BYTES
NEW = b"n" * KEY_BYTES
ENV = "RESILGATE_CACHE_KEYS"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def ring(*keys: tuple[str, bytes]) -> Keyring:
    return Keyring(dict(keys))


def reason(keyring: Keyring, sealed: bytes, associated: bytes) -> str:
    with pytest.raises(Unsealable) as raised:
        keyring.open(sealed, associated)
    return raised.value.reason


@given(st.binary(max_size=4096), st.binary(max_size=128))
def test_a_sealed_value_opens_to_itself(plaintext: bytes, associated: bytes) -> None:
    keyring = ring(("k1", OLD))
    sealed = keyring.seal(plaintext, associated)
    assert keyring.open(sealed, associated) == plaintext
    if len(plaintext) >= 8:
        assert plaintext not in sealed


@given(st.binary(min_size=1, max_size=512), st.binary(max_size=64), st.binary(max_size=64))
def test_a_value_sealed_for_one_store_key_never_opens_for_another(
    plaintext: bytes, associated: bytes, other: bytes
) -> None:
    keyring = ring(("k1", OLD))
    sealed = keyring.seal(plaintext, associated)
    if other != associated:
        assert reason(keyring, sealed, other) == "not authentic"


@given(st.binary(max_size=256), st.data())
def test_any_changed_byte_is_noticed(plaintext: bytes, data: st.DataObject) -> None:
    keyring = ring(("k1", OLD))
    sealed = bytearray(keyring.seal(plaintext, b"key"))
    at = data.draw(st.integers(0, len(sealed) - 1))
    sealed[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(Unsealable):
        keyring.open(bytes(sealed), b"key")


@given(st.binary(max_size=256))
def test_another_key_under_the_same_id_does_not_open_it(plaintext: bytes) -> None:
    sealed = ring(("k1", OLD)).seal(plaintext, b"key")
    assert reason(ring(("k1", NEW)), sealed, b"key") == "not authentic"


def test_truncated_values_and_unknown_keys_are_told_apart() -> None:
    sealed = ring(("k1", OLD)).seal(b"record", b"key")
    assert reason(ring(("k2", NEW)), sealed, b"key") == "unknown key"
    for cut in (0, 1, 5, len(sealed) - 17):
        assert reason(ring(("k1", OLD)), sealed[:cut], b"key") == "malformed"


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    before = ring(("old", OLD))
    after = ring(("new", NEW), ("old", OLD))
    old_value = before.seal(b"kept before", b"key")
    new_value = after.seal(b"kept after", b"key")
    assert after.open(old_value, b"key") == b"kept before"
    assert after.open(new_value, b"key") == b"kept after"
    assert reason(before, new_value, b"key") == "unknown key"
    assert after.sealing_id == "new" and after.key_ids == ("new", "old")


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_index_names_are_per_key_and_per_label(label: bytes, other: bytes) -> None:
    keyring = ring(("new", NEW), ("old", OLD))
    names = keyring.index_names(label)
    assert names == keyring.index_names(label)  # stable: the same copy is found again
    assert len(set(names)) == 2 and names[1] == ring(("old", OLD)).index_names(label)[0]
    if other != label:
        assert set(names).isdisjoint(keyring.index_names(other))


def test_the_keyring_never_shows_its_keys() -> None:
    keyring = ring(("k1", OLD))
    assert repr(keyring) == "<Keyring 1 keys, seals with 'k1'>"
    assert b64(OLD) not in repr(vars(keyring)) and "ooo" not in repr(vars(keyring))


def test_keyring_text_comma_or_line_separated_with_comments() -> None:
    text = f"# rotated 2025-03\nnew:{b64(NEW)}\n old:{b64(OLD)} , \n"
    assert parse_keyring(text, "file x").key_ids == ("new", "old")
    assert parse_keyring(f"a:{b64(NEW)},b:{b64(OLD)}", "env").key_ids == ("a", "b")
    assert parse_keyring(new_key_text("demo"), "env").key_ids == ("demo",)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"k1:{b64(b'short')}", "environment variable X: key 'k1': 5 bytes after base64 decoding"),
        ("k1:not*base64!", "environment variable X: key 'k1': not valid base64"),
        (b64(OLD), "environment variable X: key 1: write it as id:base64key"),
        (f"k1:{b64(OLD)},k1:{b64(NEW)}", "environment variable X: key id 'k1' appears twice"),
        (f"bad id:{b64(OLD)}", "environment variable X: key id 'bad id': use 1-64 of"),
        (" , ", "environment variable X: no keys"),
    ],
)
def test_unusable_keys_are_refused_naming_where_they_came_from(text: str, says: str) -> None:
    with pytest.raises(KeyringError) as raised:
        parse_keyring(text, "environment variable X")
    assert str(raised.value).startswith(says)
    assert b64(OLD) not in str(raised.value)  # the error never quotes a key


def test_load_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert load_keyring(ENV, None, {}) is None
    assert load_keyring(ENV, None, {ENV: "  "}) is None
    loaded = load_keyring(ENV, None, {ENV: f"k1:{b64(OLD)}"})
    assert loaded is not None and loaded.key_ids == ("k1",)
    key_file = tmp_path / "cache.keys"
    key_file.write_text(f"f1:{b64(NEW)}\n")
    from_file = load_keyring(ENV, key_file, {ENV: f"k1:{b64(OLD)}"})
    assert from_file is not None and from_file.key_ids == ("f1",)  # the file wins
    with pytest.raises(KeyringError, match=r"^key file .*missing\.keys: No such file"):
        load_keyring(ENV, tmp_path / "missing.keys", {})
    key_file.write_text("f1:AAAA\n")
    with pytest.raises(KeyringError, match=r"^key file .*cache\.keys: key 'f1': 3 bytes"):
        load_keyring(ENV, key_file, {})


def test_two_seals_of_one_value_differ() -> None:
    keyring = ring(("k1", os.urandom(KEY_BYTES)))
    assert keyring.seal(b"same", b"key") != keyring.seal(b"same", b"key")
