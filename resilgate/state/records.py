"""What the state store keeps, as plain frozen records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Self

import orjson

ModeName = Literal["auto", "primary", "dr", "fallback", "maintenance"]
BreakerState = Literal["closed", "open", "half_open"]
JournalState = Literal[
    "accepted", "replaying", "applied", "duplicate", "conflict", "failed", "discarded"
]
FINISHED: frozenset[str] = frozenset({"applied", "duplicate", "conflict", "failed", "discarded"})
# Finished, but for a person to look at (dead letters); ops may retry or discard them.
DEAD: frozenset[str] = frozenset({"conflict", "failed"})
UNFINISHED: frozenset[str] = frozenset({"accepted", "replaying"})


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Only the fields this version knows: a newer replica may write more (rolling upgrade)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


class _JsonRecord:
    """JSON in and out for the record dataclasses below."""

    __slots__ = ()

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        return cls(**_known(cls, orjson.loads(raw)))


@dataclass(frozen=True, slots=True)
class ForcedMode(_JsonRecord):
    """An ops decision about an upstream or a route, with who, why and until when."""

    target: str
    mode: ModeName
    reason: str
    actor: str
    set_at: float
    expires_at: float | None = None

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Verdict(_JsonRecord):
    """One replica's breaker state for one endpoint (``upstream/endpoint``)."""

    endpoint: str
    replica: str
    state: BreakerState
    at: float


def parsed_detail(detail: str) -> Any:
    """A journal detail as the JSON it usually is, else its text; None when empty."""
    if not detail:
        return None
    try:
        return orjson.loads(detail)
    except orjson.JSONDecodeError:
        return detail


@dataclass(frozen=True, slots=True)
class JournalEntry(_JsonRecord):
    """A write accepted while its upstream could not take it; replayed later, exactly once.

    ``payload`` is opaque to the store (the journal fallback decides its shape); ``seq`` is the
    store's acceptance order, assigned on append; ``queue`` (the upstream's name) is the queue
    the entry is replayed in, strictly in order.
    """

    ticket: str
    route: str
    payload: bytes
    created_at: float
    state: JournalState = "accepted"
    detail: str = ""
    seq: int = 0
    queue: str = ""

    def to_json(self) -> bytes:
        data: dict[str, Any] = asdict(self)
        data["payload"] = self.payload.decode("latin-1")
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        data = _known(cls, orjson.loads(raw))
        data["payload"] = data["payload"].encode("latin-1")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """How far behind one journal queue is."""

    queue: str
    open: int  # accepted or replaying
    oldest_open_at: float | None  # created_at of the queue's head: the open entry replayed next
    dead: int  # conflict or failed


@dataclass(frozen=True, slots=True)
class AuditRecord(_JsonRecord):
    """Who changed what, when and why."""

    at: float
    actor: str
    action: str
    target: str
    reason: str
    detail: str = ""
