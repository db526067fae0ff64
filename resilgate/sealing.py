"""Sealing values kept at rest: AES-256-GCM under named keys, so keys can be rotated.

A keyring is read from text such as ``k2:<base64 of 32 bytes>,k1:<base64>`` (an environment
variable or a file, kept apart from the store the sealed values live in). The first key seals;
every key opens what it sealed, so a new key goes first and an old one stays until nothing it
sealed is kept any more.

A sealed value is ``version | len(key id) | key id | nonce | ciphertext and tag``; the header
and the caller's associated data are authenticated, so a value opens only under the same key
id, the same key and the same associated data (a value moved to another store key does not).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # random per value: rotate keys long before 2**32 values sealed under one
FORMAT = 1
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_INDEX_INFO = b"resilgate sealing: index names"


class KeyringError(ValueError):
    """The keys could not be read; the message names their source and what is wrong."""


class Unsealable(Exception):
    """A sealed value does not open: ``reason`` is ``malformed``, ``unknown key`` (sealed
    under a key this keyring no longer holds) or ``not authentic`` (wrong key, wrong
    associated data or tampered)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    aead: AESGCM = field(repr=False)
    index_key: bytes = field(repr=False)  # derived, so the AES key serves one purpose only


class Keyring:
    """Named AES-256-GCM keys; the first seals, all open. Never shows key material."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key")
        self._keys: dict[str, _Key] = {}
        for key_id, secret in keys.items():
            if not KEY_ID.match(key_id):
                raise KeyringError(f"key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ . -")
            if len(secret) != KEY_BYTES:
                raise KeyringError(f"key {key_id!r}: {len(secret)} bytes, need {KEY_BYTES}")
            index_key = HKDF(hashes.SHA256(), KEY_BYTES, None, _INDEX_INFO).derive(secret)
            self._keys[key_id] = _Key(key_id, AESGCM(secret), index_key)
        self.sealing_id = next(iter(self._keys))

    def __repr__(self) -> str:
        return f"<Keyring {len(self._keys)} keys, seals with {self.sealing_id!r}>"

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        """``plaintext`` encrypted and authenticated (with ``associated``) under the first key."""
        key = self._keys[self.sealing_id]
        header = _header(key.key_id)
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + key.aead.encrypt(nonce, plaintext, header + associated)

    def open(self, sealed: bytes, associated: bytes = b"") -> bytes:
        """The plaintext of a value :meth:`seal` made with the same ``associated`` data;
        :class:`Unsealable` otherwise."""
        if len(sealed) < 2 or sealed[0] != FORMAT:
            raise Unsealable("malformed")
        id_end = 2 + sealed[1]
        if len(sealed) < id_end + NONCE_BYTES + 16:
            raise Unsealable("malformed")
        key = self._keys.get(sealed[2:id_end].decode("ascii", "replace"))
        if key is None:
            raise Unsealable("unknown key")
        nonce = sealed[id_end : id_end + NONCE_BYTES]
        try:
            return key.aead.decrypt(
                nonce, sealed[id_end + NONCE_BYTES :], sealed[:id_end] + associated
            )
        except InvalidTag:
            raise Unsealable("not authentic") from None

    def index_names(self, label: bytes) -> tuple[str, ...]:
        """Names for ``label`` that only key holders can compute (HMAC-SHA256, hex), one per
        key, the sealing key's first: a store key that reveals nothing, even to someone who
        can guess ``label``; after a rotation, look under each name in turn."""
        return tuple(
            hmac.new(key.index_key, label, hashlib.sha256).hexdigest()
            for key in self._keys.values()
        )


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return bytes((FORMAT, len(raw))) + raw


def parse_keyring(text: str, source: str) -> Keyring:
    """Keys written as ``id:base64`` separated by commas or line breaks (``#`` starts a
    comment line in a file); ``source`` names where the text came from in errors."""
    keys: dict[str, bytes] = {}
    items = [
        item.strip()
        for line in text.splitlines()
        if not line.strip().startswith("#")
        for item in line.split(",")
    ]
    for number, item in enumerate((item for item in items if item), start=1):
        key_id, colon, encoded = item.partition(":")
        key_id = key_id.strip()
        if not colon or not key_id:
            raise KeyringError(f"{source}: key {number}: write it as id:base64key")
        if key_id in keys:
            raise KeyringError(f"{source}: key id {key_id!r} appears twice")
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{source}: key {key_id!r}: not valid base64") from None
        if len(secret) != KEY_BYTES:
            raise KeyringError(
                f"{source}: key {key_id!r}: {len(secret)} bytes after base64 decoding, "
                f"AES-256-GCM needs {KEY_BYTES} (e.g. `openssl rand -base64 32`)"
            )
        keys[key_id] = secret
    if not keys:
        raise KeyringError(f"{source}: no keys")
    try:
        return Keyring(keys)
    except KeyringError as exc:
        raise KeyringError(f"{source}: {exc}") from None


def load_keyring(
    env_name: str, file: Path | None, environ: Mapping[str, str] | None = None
) -> Keyring | None:
    """The keyring from ``file`` if one is named, else from the variable ``env_name``; None
    when neither is set. KeyringError when the keys are there but unusable."""
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(f"key file {file}: {exc.strerror or exc}") from None
        return parse_keyring(text, f"key file {file}")
    text = (os.environ if environ is None else environ).get(env_name, "")
    if not text.strip():
        return None
    return parse_keyring(text, f"environment variable {env_name}")


def new_key_text(key_id: str = "k1") -> str:
    """A fresh random key written as keyring text (``id:base64``)."""
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode('ascii')}"
