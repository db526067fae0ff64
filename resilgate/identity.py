"""Who is calling, to keep what is kept for one caller apart from every other caller.

This scopes; it does not authorise (the upstream does that). The caller is named by a header
that a trusted front proxy sets, or else by the subject (``sub``) of the bearer token. The
gateway cannot verify a token's signature offline, so a token names a caller only together
with the whole token: a forged token that copies someone's subject is a different caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import orjson
from multidict import MultiMapping

MAX_TOKEN_CHARS = 16384  # a larger "token" is no token this gateway should parse


@dataclass(frozen=True, slots=True)
class Caller:
    """One caller: ``scope`` is an opaque digest of who it is (no name, no token in it);
    ``expires_at`` is when its token stops being valid (None: no expiry known)."""

    kind: str  # "header" or "token"
    scope: bytes
    expires_at: float | None = None

    def __repr__(self) -> str:
        return f"<Caller by {self.kind}>"


def caller_of(headers: MultiMapping[str], identity_header: str | None, now: float) -> Caller | None:
    """The caller of a request, or None when it names none (or names it ambiguously).

    With ``identity_header`` set, only that header counts (one non-empty value). Otherwise
    the ``Authorization: Bearer`` token must be a JWT with a string ``sub`` and, if it has an
    ``exp``, not be expired at ``now``: an expired token names nobody, so nothing kept for it
    is handed out once the upstream would have refused it.
    """
    if identity_header is not None:
        values = headers.getall(identity_header, [])
        if len(values) != 1 or not values[0].strip():
            return None
        return Caller("header", _digest(b"header", values[0].strip().encode()))
    authorizations = headers.getall("Authorization", [])
    if len(authorizations) != 1:
        return None
    scheme, _, token = authorizations[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    claims = jwt_claims(token)
    if claims is None:
        return None
    subject, expires = claims.get("sub"), claims.get("exp")
    if not isinstance(subject, str) or not subject:
        return None
    expires_at: float | None = None
    if expires is not None:
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            return None
        if expires <= now:
            return None
        expires_at = float(expires)
    token_print = hashlib.sha256(token.encode()).digest()
    return Caller("token", _digest(b"token", subject.encode(), token_print), expires_at)


def jwt_claims(token: str) -> dict[str, object] | None:
    """The claims of a JWT (``header.payload.signature``), read without verifying it; None
    when ``token`` is not shaped like one."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _digest(*parts: bytes) -> bytes:
    # Length-prefixed, so no two different lists of parts give the same input.
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(4, "big") + part)
    return hasher.digest()
