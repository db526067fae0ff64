"""In-process state: for unit tests only (one process, nothing survives it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from resilgate.state.records import (
    DEAD,
    FINISHED,
    UNFINISHED,
    AuditRecord,
    ForcedMode,
    JournalEntry,
    JournalState,
    QueueStats,
    Verdict,
)
from resilgate.state.store import DuplicateTicket, StateStore, check_block_size, check_lease_ttl


class MemoryStore(StateStore):
    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._modes: dict[str, ForcedMode] = {}
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        self._counters: dict[str, int] = {}
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._journal: dict[str, JournalEntry] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # journal claims: ticket -> holder
        self._named_leases: dict[str, tuple[str, float]] = {}  # name -> (owner, until)
        self._finished_at: dict[str, float] = {}
        self._audit: list[AuditRecord] = []
        self._docs: dict[tuple[str, str], tuple[bytes, float | None]] = {}  # -> (value, until)
        self._seq = 0
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<MemoryStore {len(self._modes)} modes, {len(self._journal)} journal entries,"
            f" {len(self._docs)} documents>"
        )

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def put_mode(self, mode: ForcedMode) -> None:
        self._modes[mode.target] = mode
        self._changed.set()

    async def delete_mode(self, target: str) -> None:
        self._modes.pop(target, None)
        self._changed.set()

    async def put_mode_if_absent(self, mode: ForcedMode, now: float) -> ForcedMode | None:
        present = self._modes.get(mode.target)
        if present is not None and present.active(now):
            return present
        await self.put_mode(mode)
        return None

    async def delete_mode_if(self, expected: ForcedMode) -> bool:
        if self._modes.get(expected.target) != expected:
            return False
        await self.delete_mode(expected.target)
        return True

    async def load_modes(self) -> dict[str, ForcedMode]:
        return dict(self._modes)

    async def put_verdict(self, verdict: Verdict) -> None:
        self._verdicts[verdict.endpoint, verdict.replica] = verdict
        self._changed.set()

    async def load_verdicts(self) -> list[Verdict]:
        return list(self._verdicts.values())

    async def wait_for_change(self, within_s: float) -> bool:
        try:
            await asyncio.wait_for(self._changed.wait(), within_s)
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    async def take_block(self, scope: str, size: int) -> int:
        check_block_size(size)
        first = self._counters.get(scope, 0) + 1
        self._counters[scope] = first + size - 1
        return first

    async def lease(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        check_lease_ttl(ttl_s)
        holder = self._named_leases.get(name)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._named_leases[name] = (owner, now + ttl_s)
        return True

    async def release(self, name: str, owner: str) -> None:
        holder = self._named_leases.get(name)
        if holder is not None and holder[0] == owner:
            del self._named_leases[name]

    async def cache_put(
        self, key: str, value: bytes, ttl_s: float, max_total_bytes: int | None = None
    ) -> None:
        self._cache.pop(key, None)
        if max_total_bytes is not None:
            if len(value) > max_total_bytes:
                return
            excess = sum(len(v) for v, _ in self._cache.values()) + len(value) - max_total_bytes
            for nearest in sorted(self._cache, key=lambda k: (self._cache[k][1], k)):
                if excess <= 0:
                    break
                excess -= len(self._cache.pop(nearest)[0])
        self._cache[key] = (value, self._clock() + ttl_s)

    async def cache_get(self, key: str) -> bytes | None:
        found = self._cache.get(key)
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    async def cache_bytes(self) -> int:
        now = self._clock()
        return sum(len(value) for value, expires_at in self._cache.values() if expires_at > now)

    async def journal_append(self, entry: JournalEntry) -> JournalEntry:
        if entry.ticket in self._journal:
            raise DuplicateTicket(entry.ticket)
        self._seq += 1
        stored = replace(entry, seq=self._seq)
        self._journal[entry.ticket] = stored
        return stored

    async def journal_get(self, ticket: str) -> JournalEntry | None:
        return self._journal.get(ticket)

    async def journal_list(
        self, states: frozenset[str] | None = None, limit: int = 1000, queue: str | None = None
    ) -> list[JournalEntry]:
        entries = sorted(self._journal.values(), key=lambda entry: entry.seq)
        return [
            e
            for e in entries
            if (states is None or e.state in states) and (queue is None or e.queue == queue)
        ][:limit]

    async def journal_claim(
        self, queue: str, owner: str, limit: int, lease_s: float
    ) -> list[JournalEntry]:
        now = self._clock()
        claimed: list[JournalEntry] = []
        for entry in await self.journal_list(UNFINISHED, limit=len(self._journal), queue=queue):
            if len(claimed) >= limit:
                break
            holder = self._leases.get(entry.ticket)
            if holder is not None and holder[0] != owner and holder[1] > now:
                break  # head of line: nothing after an entry someone else is working on
            self._leases[entry.ticket] = (owner, now + lease_s)
            claimed.append(entry)
        return claimed

    async def journal_note(self, ticket: str, owner: str, detail: str) -> bool:
        entry = self._journal.get(ticket)
        if entry is None:
            raise KeyError(ticket)
        holder = self._leases.get(ticket)
        if holder is None or holder[0] != owner or ticket in self._finished_at:
            return False
        self._journal[ticket] = replace(entry, state="replaying", detail=detail)
        return True

    async def journal_finish(
        self, ticket: str, owner: str, state: JournalState, detail: str
    ) -> bool:
        entry = self._journal.get(ticket)
        if entry is None:
            raise KeyError(ticket)
        holder = self._leases.get(ticket)
        if holder is None or holder[0] != owner or ticket in self._finished_at:
            return False
        self._journal[ticket] = replace(entry, state=state, detail=detail)
        self._leases.pop(ticket, None)
        if state in FINISHED:
            self._finished_at[ticket] = self._clock()
        return True

    async def journal_stats(self) -> list[QueueStats]:
        open_: dict[str, list[JournalEntry]] = {}
        dead: dict[str, int] = {}
        for entry in self._journal.values():
            if entry.state in UNFINISHED:
                open_.setdefault(entry.queue, []).append(entry)
            elif entry.state in DEAD:
                dead[entry.queue] = dead.get(entry.queue, 0) + 1
        return [
            QueueStats(
                queue=queue,
                open=len(open_.get(queue, [])),
                oldest_open_at=_head(open_.get(queue, [])),
                dead=dead.get(queue, 0),
            )
            for queue in sorted(open_.keys() | dead.keys())
        ]

    async def journal_reopen(self, ticket: str, detail: str) -> JournalEntry | None:
        entry = self._journal.get(ticket)
        if entry is None:
            raise KeyError(ticket)
        if entry.state not in DEAD:
            return None
        reopened = replace(entry, state="accepted", detail=detail)
        self._journal[ticket] = reopened
        self._finished_at.pop(ticket, None)
        self._leases.pop(ticket, None)
        return reopened

    async def journal_discard(self, ticket: str, detail: str, now: float) -> JournalEntry | None:
        entry = self._journal.get(ticket)
        if entry is None:
            raise KeyError(ticket)
        holder = self._leases.get(ticket)
        held = holder is not None and holder[1] > now
        if not (entry.state in DEAD or (entry.state in UNFINISHED and not held)):
            return None
        discarded = replace(entry, state="discarded", detail=detail)
        self._journal[ticket] = discarded
        self._leases.pop(ticket, None)
        self._finished_at[ticket] = self._clock()
        return discarded

    async def doc_put(self, kind: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._docs[kind, key] = (value, None if ttl_s is None else self._clock() + ttl_s)

    async def doc_get(self, kind: str, key: str) -> bytes | None:
        found = self._docs.get((kind, key))
        if found is None or not _alive(found[1], self._clock()):
            return None
        return found[0]

    async def doc_list(self, kind: str) -> dict[str, bytes]:
        now = self._clock()
        return {
            key: value
            for (of, key), (value, until) in self._docs.items()
            if of == kind and _alive(until, now)
        }

    async def doc_delete(self, kind: str, key: str) -> None:
        self._docs.pop((kind, key), None)

    async def audit_append(self, record: AuditRecord) -> None:
        self._audit.append(record)

    async def audit_list(self, limit: int = 100) -> list[AuditRecord]:
        return list(reversed(self._audit))[:limit]

    async def trim(
        self, now: float, audit_keep_s: float, journal_keep_s: float, verdict_keep_s: float
    ) -> int:
        before = self._records()
        self._audit = [r for r in self._audit if r.at >= now - audit_keep_s]
        for ticket, finished in list(self._finished_at.items()):
            if finished < now - journal_keep_s:
                del self._journal[ticket], self._finished_at[ticket]
        self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
        self._verdicts = {k: v for k, v in self._verdicts.items() if v.at >= now - verdict_keep_s}
        self._named_leases = {k: v for k, v in self._named_leases.items() if v[1] > now}
        self._docs = {k: v for k, v in self._docs.items() if _alive(v[1], now)}
        return before - self._records()

    def _records(self) -> int:
        return (
            len(self._audit)
            + len(self._journal)
            + len(self._cache)
            + len(self._verdicts)
            + len(self._named_leases)
            + len(self._docs)
        )


def _head(entries: list[JournalEntry]) -> float | None:
    """The ``created_at`` of the first entry in acceptance order (the next one replayed)."""
    return min(entries, key=lambda entry: entry.seq).created_at if entries else None


def _alive(until: float | None, now: float) -> bool:
    return until is None or until > now
