"""The one interface every state backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

from resilgate.state.records import (
    AuditRecord,
    ForcedMode,
    JournalEntry,
    JournalState,
    QueueStats,
    Verdict,
)


class StoreUnavailable(Exception):
    """The store could not be reached or answered too slowly; the caller keeps local state."""


class DuplicateTicket(Exception):
    """A journal entry with this ticket is already stored; it was not added again."""


def check_block_size(size: int) -> None:
    """A block of fewer than one number would hand out a number without reserving it."""
    if size < 1:
        raise ValueError(f"a counter block holds at least one number, not {size}")


def check_lease_ttl(ttl_s: float) -> None:
    """A lease for no time would have run out as it was taken."""
    if not ttl_s > 0:
        raise ValueError(f"a lease lasts a positive time, not {ttl_s}s")


class StateStore(ABC):
    """Shared state of all workers (and, with Redis, all replicas).

    Every method may raise :class:`StoreUnavailable`. A method that returns has done its
    work durably as far as the backend allows (``journal_append`` above all).
    """

    backend: str = "abstract"

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing; raise StoreUnavailable if unreachable."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers now."""

    async def durability_warning(self) -> str | None:
        """Why an acknowledged journal write could be lost with this store, or None."""
        return None

    # Forced modes and breaker verdicts: small, read whole by every worker, announced.

    @abstractmethod
    async def put_mode(self, mode: ForcedMode) -> None: ...

    @abstractmethod
    async def delete_mode(self, target: str) -> None: ...

    @abstractmethod
    async def put_mode_if_absent(self, mode: ForcedMode, now: float) -> ForcedMode | None:
        """Store ``mode`` only if its target has no mode active at ``now`` (an expired one is
        replaced), atomically across processes; None if stored, else the mode in the way."""

    @abstractmethod
    async def delete_mode_if(self, expected: ForcedMode) -> bool:
        """Delete the target's mode only if it is ``expected`` in every field, atomically
        across processes; True if deleted (a mode changed meanwhile is left alone)."""

    @abstractmethod
    async def load_modes(self) -> dict[str, ForcedMode]: ...

    @abstractmethod
    async def put_verdict(self, verdict: Verdict) -> None: ...

    @abstractmethod
    async def load_verdicts(self) -> list[Verdict]: ...

    @abstractmethod
    async def wait_for_change(self, within_s: float) -> bool:
        """Wait up to ``within_s`` seconds for a mode or verdict change anywhere; True if one may
        have happened (a spurious True is allowed, a missed change is not)."""

    # Counters: never the same number twice, across workers, replicas and restarts.

    @abstractmethod
    async def take_block(self, scope: str, size: int) -> int:
        """Reserve ``size`` consecutive numbers of ``scope``; return the first (from 1)."""

    # Leases: one holder at a time across the fleet (a half-open endpoint's trial requests).
    # Not changes: wait_for_change does not report them.

    @abstractmethod
    async def lease(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``now + ttl_s``; True if
        ``owner`` holds it now. Another owner's lease is taken only once it has run out."""

    @abstractmethod
    async def release(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (nothing otherwise)."""

    # Record cache: opaque bytes under a key, each with a time to live. Its size is the sum of
    # the values' lengths (keys and the backends' own overhead are not counted).

    @abstractmethod
    async def cache_put(
        self, key: str, value: bytes, ttl_s: float, max_total_bytes: int | None = None
    ) -> None:
        """Store ``value`` under ``key`` until ``ttl_s`` from now, replacing what was there.

        With ``max_total_bytes``, atomically across processes: other entries are evicted, the
        nearest to expiry first, until all fit (entries expired but not yet trimmed still
        count, and go first); the new entry itself is never evicted. A value longer than the
        bound is not stored, nothing is evicted for it, and ``key`` is left empty.
        """

    @abstractmethod
    async def cache_get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if there is none or it has expired."""

    @abstractmethod
    async def cache_bytes(self) -> int:
        """The total length of the values of all unexpired entries."""

    # Write journal: appended durably, read in acceptance order, finished exactly once. Split
    # into queues (one per upstream), each replayed by one owner at a time, strictly in order.

    @abstractmethod
    async def journal_append(self, entry: JournalEntry) -> JournalEntry:
        """Store ``entry`` (in its ``queue``) durably; return it with its ``seq``.
        DuplicateTicket if present."""

    @abstractmethod
    async def journal_get(self, ticket: str) -> JournalEntry | None: ...

    @abstractmethod
    async def journal_list(
        self, states: frozenset[str] | None = None, limit: int = 1000, queue: str | None = None
    ) -> list[JournalEntry]:
        """Entries in acceptance order, optionally only those in ``states`` or of ``queue``."""

    @abstractmethod
    async def journal_claim(
        self, queue: str, owner: str, limit: int, lease_s: float
    ) -> list[JournalEntry]:
        """Lease up to ``limit`` of the oldest unfinished entries of ``queue`` to ``owner`` for
        ``lease_s`` seconds, atomically across processes and replicas; oldest first.

        Head of line: the claim stops before the first entry that another owner holds an
        unexpired lease on, so a queue is worked by one owner at a time, in order (while
        another holds its head, the answer is ``[]``). ``owner``'s own leases are renewed, run
        out ones of others taken over. Other queues' entries are not touched.
        """

    @abstractmethod
    async def journal_note(self, ticket: str, owner: str, detail: str) -> bool:
        """Record progress on a claimed entry durably: its ``detail``, and state ``replaying``.

        Unlike journal_finish, ``owner`` keeps the lease. Applies only while ``owner`` holds
        the entry's lease (taken by nobody else since, even if it ran out) and the entry is not
        finished; returns False otherwise. KeyError for an unknown ticket.
        """

    @abstractmethod
    async def journal_finish(
        self, ticket: str, owner: str, state: JournalState, detail: str
    ) -> bool:
        """Record how ``owner``'s attempt ended (or hand the entry back as ``accepted``), and
        release the lease.

        Applies only while ``owner`` holds the entry's lease and the entry is not finished;
        returns False otherwise (a replayer whose lease ran out must not overwrite another's
        result). KeyError for an unknown ticket.
        """

    @abstractmethod
    async def journal_stats(self) -> list[QueueStats]:
        """Per queue that has open or dead entries: their counts and the ``created_at`` of the
        queue's head (the open entry replayed next); sorted by queue name."""

    @abstractmethod
    async def journal_reopen(self, ticket: str, detail: str) -> JournalEntry | None:
        """Ops' retry of a dead letter: a ``conflict`` or ``failed`` entry goes back to
        ``accepted`` with ``detail``, keeping its ``seq`` (so it is the next one replayed in its
        queue) and no lease. Returns the updated entry, or None if it was in another state.
        KeyError for an unknown ticket."""

    @abstractmethod
    async def journal_discard(self, ticket: str, detail: str, now: float) -> JournalEntry | None:
        """Ops' decision that an entry must never be replayed: finished as ``discarded`` with
        ``detail``. Allowed from ``conflict`` and ``failed``, and from ``accepted`` or
        ``replaying`` only while nobody holds an unexpired lease on it (at ``now``); returns the
        updated entry, or None when not allowed. KeyError for an unknown ticket."""

    # Shared documents: small values by kind and key, each with an optional time to live. For
    # fleet-wide facts that are not modes or verdicts (traffic summaries, the incident level,
    # drills). Not changes: wait_for_change does not report them.

    @abstractmethod
    async def doc_put(self, kind: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store ``value`` under (``kind``, ``key``), replacing what was there; it disappears
        ``ttl_s`` seconds from now (never when None)."""

    @abstractmethod
    async def doc_get(self, kind: str, key: str) -> bytes | None:
        """The value, or None if there is none or it has expired."""

    @abstractmethod
    async def doc_list(self, kind: str) -> dict[str, bytes]:
        """Every unexpired value of ``kind`` by key."""

    @abstractmethod
    async def doc_delete(self, kind: str, key: str) -> None:
        """Remove the value if there is one."""

    # Audit log.

    @abstractmethod
    async def audit_append(self, record: AuditRecord) -> None: ...

    @abstractmethod
    async def audit_list(self, limit: int = 100) -> list[AuditRecord]:
        """Newest first."""

    # Retention.

    @abstractmethod
    async def trim(
        self, now: float, audit_keep_s: float, journal_keep_s: float, verdict_keep_s: float
    ) -> int:
        """Drop audit records, finished journal entries and breaker verdicts older than their
        retention (a replica that is gone leaves verdicts nobody updates), and expired cache
        entries, documents and leases (Redis expires its own); return how many records went."""
