"""The locally issued queue as display boards and call-next see it.

A department's board on a day lists its local registrations in the order they were accepted
(arrival order, across replicas); the tickets called so far are one shared list in the state
store's cache, and each called ticket is also marked by a store counter, which is never
evicted. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

import orjson

from fallbacks.queue_registration import LocalRegistration


def called_key(dept: str, day: str) -> str:
    """The store cache key of the tickets called from one department's local queue."""
    return f"local-queue:called:{dept}:{day}"


def call_mark(ticket: str) -> str:
    """The store counter that marks one ticket called: the first to count it up (to 1) calls
    it, so nobody calls it again even if the called list is lost (the cache may evict it)."""
    return f"local-queue:call:{ticket}"


def decode_called(raw: bytes | None) -> list[str]:
    if not raw:
        return []
    tickets = orjson.loads(raw)
    return [t for t in tickets if isinstance(t, str)] if isinstance(tickets, list) else []


def encode_called(tickets: list[str]) -> bytes:
    return orjson.dumps(tickets)


def queue_of(entries: Iterable[LocalRegistration], dept: str, day: str) -> list[LocalRegistration]:
    """One department's local queue on one day, first arrived first."""
    mine = [e for e in entries if e.dept == dept and e.date == day]
    return sorted(mine, key=lambda e: (e.accepted_at, e.number, e.ticket))


def board(queue: list[LocalRegistration], called: Set[str]) -> list[dict[str, Any]]:
    """The board entries (``queueNo``, masked name, ``WAITING`` or ``CALLED``)."""
    return [e.board_entry("CALLED" if e.ticket in called else "WAITING") for e in queue]


def next_waiting(
    queue: list[LocalRegistration], called: Set[str]
) -> tuple[LocalRegistration | None, int]:
    """The first entry nobody has called yet, and how many wait behind it."""
    waiting = [e for e in queue if e.ticket not in called]
    if not waiting:
        return None, 0
    return waiting[0], len(waiting) - 1


def call_answer(entry: LocalRegistration | None, waiting: int) -> dict[str, Any]:
    """The registration system's call-next answer."""
    return {"called": entry.board_entry("CALLED") if entry else None, "waiting": waiting}
