"""Bearer tokens of the admin API: kept as SHA-256 hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from resilgate.config import AdminToken, Config, ConfigError, Problem, Role, read_yaml
from resilgate.errors import StartupError

_TOKEN_LIST = TypeAdapter(list[AdminToken])


def token_hash(token: str) -> str:
    """What the config keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called: the token's name and role."""

    name: str
    role: Role

    @property
    def operator(self) -> bool:
        return self.role == "operator"


class TokenBook:
    """The configured tokens; answers who holds a presented one."""

    def __init__(self, tokens: list[AdminToken]) -> None:
        self._tokens = tuple((bytes.fromhex(t.sha256), Principal(t.name, t.role)) for t in tokens)

    def __repr__(self) -> str:
        roles = [p.role for _, p in self._tokens]
        return f"<TokenBook {roles.count('operator')} operator, {roles.count('viewer')} viewer>"

    def __len__(self) -> int:
        return len(self._tokens)

    @classmethod
    def from_config(cls, config: Config) -> TokenBook:
        """The tokens of the config and of its ``admin.tokens_file``; StartupError naming the
        file, line and field if that file is unusable."""
        tokens = list(config.admin.tokens)
        if config.admin.tokens_file is not None:
            tokens += _read_tokens_file(str(config.resolve(config.admin.tokens_file)))
        names = [token.name for token in tokens]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise StartupError(f"admin tokens: names given twice: {', '.join(doubled)}")
        return cls(tokens)

    def who(self, authorization: str | None) -> Principal | None:
        """The holder of the bearer token in an ``Authorization`` header, or None.

        Every configured hash is compared, with ``hmac.compare_digest``, whether or not one
        matched already: the time taken does not say which token came close.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found: Principal | None = None
        for digest, principal in self._tokens:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


def _read_tokens_file(path: str) -> list[AdminToken]:
    try:
        data, lines = read_yaml(Path(path))
    except ConfigError as exc:
        raise StartupError(f"admin.tokens_file: {exc}") from exc
    try:
        return _TOKEN_LIST.validate_python(data if data is not None else [])
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            field = ".".join(str(part) for part in loc)
            problems.append(str(Problem(path, line, field, error["msg"])))
        raise StartupError("admin.tokens_file: " + "; ".join(problems)) from exc
