"""The embedded default: one SQLite file in WAL mode, shared by every worker process of a node.

Each process opens its own connection, in autocommit mode. Nearly every write is one SQL
statement and so one transaction of its own: atomic across processes. The exceptions are
``cache_put`` with a size bound and ``put_mode_if_absent``, which run several statements in
one transaction; each holds the connection's lock meanwhile, which every statement takes, so
no other coroutine's statement can slip into it. (``open`` also runs such transactions, before
anything else uses the connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any

import aiosqlite

from resilgate.state.records import (
    FINISHED,
    AuditRecord,
    ForcedMode,
    JournalEntry,
    JournalState,
    QueueStats,
    Verdict,
)
from resilgate.state.store import (
    DuplicateTicket,
    StateStore,
    StoreUnavailable,
    check_block_size,
    check_lease_ttl,
)

# Triggers bump one shared generation whenever a mode or verdict changes, so a watcher tells
# those changes from the many other commits (counters, journal) with a single-row read.
_CHANGE_TRIGGERS = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_{event.lower()} AFTER {event} ON {table}"
    " BEGIN UPDATE changes SET generation = generation + 1; END;\n"
    for table in ("modes", "verdicts")
    for event in ("INSERT", "UPDATE", "DELETE")
)

# Triggers keep the cache's total size, however a row comes or goes (put, eviction, trim). Never
# INSERT OR REPLACE into cache: REPLACE deletes the old row without firing the delete trigger.
_CACHE_SIZE_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS cache_size_insert AFTER INSERT ON cache
    BEGIN UPDATE cache_size SET bytes = bytes + length(NEW.value); END;
CREATE TRIGGER IF NOT EXISTS cache_size_delete AFTER DELETE ON cache
    BEGIN UPDATE cache_size SET bytes = bytes - length(OLD.value); END;
CREATE TRIGGER IF NOT EXISTS cache_size_update AFTER UPDATE OF value ON cache
    BEGIN UPDATE cache_size SET bytes = bytes - length(OLD.value) + length(NEW.value); END;
"""

# modes, verdicts and audit list their columns in the record's field order: a row is
# Record(*row), and astuple(record) fills a row.
_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS changes (generation INTEGER NOT NULL);
INSERT INTO changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM changes);
CREATE TABLE IF NOT EXISTS modes (
    target TEXT PRIMARY KEY, mode TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL,
    set_at REAL NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS verdicts (
    endpoint TEXT NOT NULL, replica TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (endpoint, replica));
CREATE TABLE IF NOT EXISTS counters (scope TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cache_expiry ON cache (expires_at);
CREATE TABLE IF NOT EXISTS cache_size (bytes INTEGER NOT NULL);
INSERT INTO cache_size SELECT (SELECT coalesce(sum(length(value)), 0) FROM cache)
    WHERE NOT EXISTS (SELECT 1 FROM cache_size);
{_CACHE_SIZE_TRIGGERS}
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT NOT NULL UNIQUE, route TEXT NOT NULL,
    payload BLOB NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL,
    created_at REAL NOT NULL, finished_at REAL, lease_owner TEXT, lease_until REAL,
    queue TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS journal_open ON journal (seq) WHERE state IN ('accepted', 'replaying');
CREATE INDEX IF NOT EXISTS journal_finished ON journal (finished_at);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL,
    PRIMARY KEY (kind, key));
CREATE INDEX IF NOT EXISTS docs_expiry ON docs (expires_at) WHERE expires_at IS NOT NULL;
{_CHANGE_TRIGGERS}
COMMIT;
"""

# A journal created before queues existed lacks the column. The indexes on it, created after
# the column: the open one serves journal_claim and journal_stats; the dead one lets
# journal_stats count dead letters without reading the finished entries.
_ADD_QUEUE = "ALTER TABLE journal ADD COLUMN queue TEXT NOT NULL DEFAULT ''"
_QUEUE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS journal_queue_open ON journal (queue, seq)"
    " WHERE state IN ('accepted', 'replaying')",
    "CREATE INDEX IF NOT EXISTS journal_queue_dead ON journal (queue)"
    " WHERE state IN ('conflict', 'failed')",
)

# The journal's columns in JournalEntry's field order: a row is _entry(row).
_JOURNAL_COLUMNS = "ticket, route, payload, created_at, state, detail, seq, queue"
_SYNCHRONOUS_FULL = 2


class SqliteStore(StateStore):
    """Shared and durable on one node: a write that returned is committed and synced to disk
    (``synchronous=FULL``), so it survives a killed process and, as far as the disk keeps its
    promises, a power loss."""

    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        poll_interval_s: float = 0.05,
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._poll_interval_s = poll_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # held by each statement, and across a transaction
        self._settings = ""
        # PRAGMA data_version moves only on other connections' commits; our own mode and
        # verdict writes are announced through this event instead.
        self._changed = asyncio.Event()
        self._data_version = 0
        self._generation = 0

    def __repr__(self) -> str:
        state = f"open, {self._settings}" if self._db is not None else "closed"
        return f"<SqliteStore {self._path} {state}>"

    async def open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(
                self._path, timeout=self._busy_timeout_s, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"sqlite {self._path}: cannot open: {exc}") from exc
        try:
            await self._configure()
            await self._create_schema()
            await self._changed_elsewhere()  # the baseline for wait_for_change
        except BaseException:
            await self.close()
            raise

    async def _configure(self) -> None:
        """Switch to WAL and full syncs, and refuse to go on unless both are in effect."""
        journal_mode = await self._switch_to_wal()
        await self._query("PRAGMA synchronous = FULL")
        ((synchronous,),) = await self._query("PRAGMA synchronous")
        if journal_mode != "wal" or synchronous != _SYNCHRONOUS_FULL:
            raise StoreUnavailable(
                f"sqlite {self._path}: journal_mode={journal_mode} synchronous={synchronous},"
                " need wal and 2 (FULL) or acknowledged writes could be lost"
            )
        self._settings = f"WAL, synchronous=FULL, busy_timeout={self._busy_timeout_s}s"

    async def _switch_to_wal(self) -> Any:
        # Turning a new file to WAL takes an exclusive lock, and SQLite answers "locked" at once,
        # without the busy timeout, to the other processes opening it at the same moment.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                ((journal_mode,),) = await self._query("PRAGMA journal_mode = WAL")
                return journal_mode
            except StoreUnavailable as exc:
                busy = getattr(exc.__cause__, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite {self._path}: close failed: {exc}") from exc

    async def ping(self) -> None:
        await self._query("SELECT 1")

    async def put_mode(self, mode: ForcedMode) -> None:
        await self._query("INSERT OR REPLACE INTO modes VALUES (?, ?, ?, ?, ?, ?)", astuple(mode))
        self._changed.set()

    async def delete_mode(self, target: str) -> None:
        await self._query("DELETE FROM modes WHERE target = ?", (target,))
        self._changed.set()

    async def put_mode_if_absent(self, mode: ForcedMode, now: float) -> ForcedMode | None:
        async with self._transaction():
            rows = await self._run(
                "SELECT * FROM modes WHERE target = ? AND (expires_at IS NULL OR expires_at > ?)",
                (mode.target, now),
            )
            if rows:
                return ForcedMode(*rows[0])
            await self._run("INSERT OR REPLACE INTO modes VALUES (?, ?, ?, ?, ?, ?)", astuple(mode))
        self._changed.set()
        return None

    async def delete_mode_if(self, expected: ForcedMode) -> bool:
        # Every column, and IS for expires_at: NULL = NULL would not match a mode with no end.
        deleted = await self._query(
            "DELETE FROM modes WHERE target = ? AND mode = ? AND reason = ? AND actor = ?"
            " AND set_at = ? AND expires_at IS ? RETURNING 1",
            astuple(expected),
        )
        if deleted:
            self._changed.set()
        return bool(deleted)

    async def load_modes(self) -> dict[str, ForcedMode]:
        rows = await self._query("SELECT * FROM modes")
        return {row[0]: ForcedMode(*row) for row in rows}

    async def put_verdict(self, verdict: Verdict) -> None:
        await self._query("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)", astuple(verdict))
        self._changed.set()

    async def load_verdicts(self) -> list[Verdict]:
        return [Verdict(*row) for row in await self._query("SELECT * FROM verdicts")]

    async def wait_for_change(self, within_s: float) -> bool:
        """Checks every ``poll_interval_s``; may also answer True after a change of our own
        that was already reported, never misses one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not (self._changed.is_set() or await self._changed_elsewhere()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(self._poll_interval_s, remaining))
        self._changed.clear()
        return True

    async def _changed_elsewhere(self) -> bool:
        """True if the generation moved since last seen; read only after a foreign commit."""
        ((data_version,),) = await self._query("PRAGMA data_version")
        if data_version == self._data_version:
            return False
        self._data_version = data_version
        ((generation,),) = await self._query("SELECT generation FROM changes")
        moved: bool = generation != self._generation
        self._generation = generation
        return moved

    async def take_block(self, scope: str, size: int) -> int:
        check_block_size(size)
        ((last,),) = await self._query(
            "INSERT INTO counters VALUES (?, ?)"
            " ON CONFLICT (scope) DO UPDATE SET last = last + excluded.last RETURNING last",
            (scope, size),
        )
        first: int = last - size + 1
        return first

    async def lease(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        check_lease_ttl(ttl_s)
        # An upsert whose update is refused (another owner, not run out) returns no row.
        rows = await self._query(
            "INSERT INTO leases VALUES (:name, :owner, :until) ON CONFLICT (name) DO UPDATE"
            " SET owner = excluded.owner, expires_at = excluded.expires_at"
            " WHERE owner = excluded.owner OR expires_at <= :now RETURNING 1",
            {"name": name, "owner": owner, "until": now + ttl_s, "now": now},
        )
        return bool(rows)

    async def release(self, name: str, owner: str) -> None:
        await self._query("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    async def cache_put(
        self, key: str, value: bytes, ttl_s: float, max_total_bytes: int | None = None
    ) -> None:
        row = (key, value, self._clock() + ttl_s)
        if max_total_bytes is None:
            await self._query(
                "INSERT INTO cache VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET value = excluded.value, expires_at = excluded.expires_at",
                row,
            )
            return
        async with self._transaction():
            await self._run("DELETE FROM cache WHERE key = ?", (key,))
            if len(value) > max_total_bytes:
                return
            ((total,),) = await self._run("SELECT bytes FROM cache_size")
            excess = total + len(value) - max_total_bytes
            while excess > 0:
                evicted = await self._run(
                    "DELETE FROM cache WHERE key = (SELECT key FROM cache"
                    " ORDER BY expires_at, key LIMIT 1) RETURNING length(value)"
                )
                if not evicted:
                    break
                excess -= evicted[0][0]
            await self._run("INSERT INTO cache VALUES (?, ?, ?)", row)

    async def cache_get(self, key: str) -> bytes | None:
        rows = await self._query(
            "SELECT value FROM cache WHERE key = ? AND expires_at > ?", (key, self._clock())
        )
        return rows[0][0] if rows else None

    async def cache_bytes(self) -> int:
        ((total,),) = await self._query(
            "SELECT bytes - (SELECT coalesce(sum(length(value)), 0) FROM cache"
            " WHERE expires_at <= ?) FROM cache_size",
            (self._clock(),),
        )
        return int(total)

    async def journal_append(self, entry: JournalEntry) -> JournalEntry:
        try:
            ((seq,),) = await self._query(
                "INSERT INTO journal (ticket, route, payload, created_at, state, detail, queue)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    entry.ticket,
                    entry.route,
                    entry.payload,
                    entry.created_at,
                    entry.state,
                    entry.detail,
                    entry.queue,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateTicket(entry.ticket) from exc
        return replace(entry, seq=seq)

    async def journal_get(self, ticket: str) -> JournalEntry | None:
        rows = await self._query(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE ticket = ?", (ticket,)
        )
        return _entry(rows[0]) if rows else None

    async def journal_list(
        self, states: frozenset[str] | None = None, limit: int = 1000, queue: str | None = None
    ) -> list[JournalEntry]:
        conditions, params = [], list[str]()
        if states is not None:
            conditions.append(f"state IN ({', '.join('?' * len(states))})")
            params += sorted(states)
        if queue is not None:
            conditions.append("queue = ?")
            params.append(queue)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._query(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal {where} ORDER BY seq LIMIT ?",
            (*params, limit),
        )
        return [_entry(row) for row in rows]

    async def journal_claim(
        self, queue: str, owner: str, limit: int, lease_s: float
    ) -> list[JournalEntry]:
        if limit < 1:
            return []  # SQLite reads a negative LIMIT as none
        now = self._clock()
        # Of the queue's oldest ``limit`` unfinished entries, those before the first one
        # another owner holds (head of line): reads ``limit`` rows, whatever the backlog.
        rows = await self._query(
            "WITH head AS (SELECT seq, lease_owner, lease_until FROM journal"
            " WHERE queue = :queue AND state IN ('accepted', 'replaying')"
            " ORDER BY seq LIMIT :limit)"
            " UPDATE journal SET lease_owner = :owner, lease_until = :until WHERE seq IN ("
            " SELECT seq FROM head WHERE seq < coalesce((SELECT min(seq) FROM head"
            " WHERE lease_owner <> :owner AND lease_until > :now), 9223372036854775807))"
            f" RETURNING {_JOURNAL_COLUMNS}",
            {"queue": queue, "owner": owner, "until": now + lease_s, "now": now, "limit": limit},
        )
        # RETURNING gives rows in no promised order.
        return sorted((_entry(row) for row in rows), key=lambda entry: entry.seq)

    async def journal_note(self, ticket: str, owner: str, detail: str) -> bool:
        rows = await self._query(
            "UPDATE journal SET state = 'replaying', detail = ?"
            " WHERE ticket = ? AND lease_owner = ? AND finished_at IS NULL RETURNING seq",
            (detail, ticket, owner),
        )
        return await self._applied(rows, ticket)

    async def journal_finish(
        self, ticket: str, owner: str, state: JournalState, detail: str
    ) -> bool:
        finished_at = self._clock() if state in FINISHED else None
        rows = await self._query(
            "UPDATE journal SET state = ?, detail = ?, finished_at = ?,"
            " lease_owner = NULL, lease_until = NULL"
            " WHERE ticket = ? AND lease_owner = ? AND finished_at IS NULL RETURNING seq",
            (state, detail, finished_at, ticket, owner),
        )
        return await self._applied(rows, ticket)

    async def _applied(self, rows: list[sqlite3.Row], ticket: str) -> bool:
        """Whether a journal update found its entry; KeyError if the ticket is unknown."""
        if rows:
            return True
        if not await self._query("SELECT 1 FROM journal WHERE ticket = ?", (ticket,)):
            raise KeyError(ticket)
        return False

    async def journal_stats(self) -> list[QueueStats]:
        # Each half reads one partial index. The bare created_at comes from the row whose seq
        # is min(seq): SQLite's documented rule for a bare column beside min().
        rows = await self._query(
            "SELECT queue, sum(open), max(oldest), sum(dead) FROM ("
            " SELECT queue, count(*) AS open, min(seq), created_at AS oldest, 0 AS dead"
            " FROM journal WHERE state IN ('accepted', 'replaying') GROUP BY queue"
            " UNION ALL SELECT queue, 0, NULL, NULL, count(*)"
            " FROM journal WHERE state IN ('conflict', 'failed') GROUP BY queue"
            ") GROUP BY queue ORDER BY queue"
        )
        return [
            QueueStats(queue, open_, None if oldest is None else float(oldest), dead)
            for queue, open_, oldest, dead in rows
        ]

    async def journal_reopen(self, ticket: str, detail: str) -> JournalEntry | None:
        rows = await self._query(
            "UPDATE journal SET state = 'accepted', detail = ?, finished_at = NULL,"
            " lease_owner = NULL, lease_until = NULL"
            f" WHERE ticket = ? AND state IN ('conflict', 'failed') RETURNING {_JOURNAL_COLUMNS}",
            (detail, ticket),
        )
        return await self._updated(rows, ticket)

    async def journal_discard(self, ticket: str, detail: str, now: float) -> JournalEntry | None:
        rows = await self._query(
            "UPDATE journal SET state = 'discarded', detail = :detail, finished_at = :finished,"
            " lease_owner = NULL, lease_until = NULL WHERE ticket = :ticket"
            " AND (state IN ('conflict', 'failed') OR (state IN ('accepted', 'replaying')"
            " AND (lease_until IS NULL OR lease_until <= :now)))"
            f" RETURNING {_JOURNAL_COLUMNS}",
            {"detail": detail, "finished": self._clock(), "ticket": ticket, "now": now},
        )
        return await self._updated(rows, ticket)

    async def _updated(self, rows: list[sqlite3.Row], ticket: str) -> JournalEntry | None:
        """The entry a journal update returned, None if it changed nothing; KeyError if the
        ticket is unknown."""
        return _entry(rows[0]) if await self._applied(rows, ticket) else None

    async def doc_put(self, kind: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        await self._query(
            "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)", (kind, key, value, expires_at)
        )

    async def doc_get(self, kind: str, key: str) -> bytes | None:
        rows = await self._query(
            "SELECT value FROM docs WHERE kind = ? AND key = ?"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (kind, key, self._clock()),
        )
        return rows[0][0] if rows else None

    async def doc_list(self, kind: str) -> dict[str, bytes]:
        rows = await self._query(
            "SELECT key, value FROM docs WHERE kind = ? AND (expires_at IS NULL OR expires_at > ?)",
            (kind, self._clock()),
        )
        return {key: value for key, value in rows}

    async def doc_delete(self, kind: str, key: str) -> None:
        await self._query("DELETE FROM docs WHERE kind = ? AND key = ?", (kind, key))

    async def audit_append(self, record: AuditRecord) -> None:
        await self._query(
            "INSERT INTO audit (at, actor, action, target, reason, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            astuple(record),
        )

    async def audit_list(self, limit: int = 100) -> list[AuditRecord]:
        rows = await self._query(
            "SELECT at, actor, action, target, reason, detail FROM audit ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AuditRecord(*row) for row in rows]

    async def trim(
        self, now: float, audit_keep_s: float, journal_keep_s: float, verdict_keep_s: float
    ) -> int:
        # Unfinished journal entries have no finished_at, so they are never trimmed.
        gone = await self._query(
            "DELETE FROM audit WHERE at < ? RETURNING 1", (now - audit_keep_s,)
        )
        gone += await self._query(
            "DELETE FROM journal WHERE finished_at < ? RETURNING 1", (now - journal_keep_s,)
        )
        gone += await self._query("DELETE FROM cache WHERE expires_at <= ? RETURNING 1", (now,))
        gone += await self._query("DELETE FROM leases WHERE expires_at <= ? RETURNING 1", (now,))
        gone += await self._query("DELETE FROM docs WHERE expires_at <= ? RETURNING 1", (now,))
        gone += await self._query(
            "DELETE FROM verdicts WHERE at < ? RETURNING 1", (now - verdict_keep_s,)
        )
        return len(gone)

    async def _query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[sqlite3.Row]:
        """Run one statement, which in autocommit mode is one transaction; return its rows."""
        async with self._lock:
            return await self._run(sql, params)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction around the block's ``_run`` statements: committed if the
        block returns, rolled back if it raises (or is cancelled)."""
        async with self._lock:
            await self._run("BEGIN IMMEDIATE")
            try:
                yield
                await self._run("COMMIT")
            except BaseException:
                with contextlib.suppress(StoreUnavailable):
                    await self._run("ROLLBACK")
                raise

    async def _run(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[sqlite3.Row]:
        """Run one statement without the lock: from ``_query``, or inside ``_transaction``."""
        if self._db is None:
            raise StoreUnavailable(f"sqlite {self._path}: store is not open")
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except sqlite3.IntegrityError:
            raise  # a constraint is the caller's business (a duplicate ticket), not an outage
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._path}: {exc}") from exc

    async def _create_schema(self) -> None:
        """Create what is missing, then migrate, each in one write transaction; safe when many
        processes race."""
        db = self._db
        assert db is not None
        try:
            await db.executescript(_SCHEMA)
            # If this fails, open() closes the connection, which rolls the transaction back.
            await db.execute("BEGIN IMMEDIATE")
            columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(journal)")}
            if "queue" not in columns:
                await db.execute(_ADD_QUEUE)
            for index in _QUEUE_INDEXES:
                await db.execute(index)
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._path}: cannot create schema: {exc}") from exc


def _entry(row: sqlite3.Row) -> JournalEntry:
    ticket, route, payload, created_at, state, detail, seq, queue = row
    # float(): SQLite 3.40's RETURNING hands back a whole-numbered REAL as an integer.
    return JournalEntry(ticket, route, payload, float(created_at), state, detail, seq, queue)
