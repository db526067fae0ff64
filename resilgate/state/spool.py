"""Journal entries acknowledged while Redis was unreachable, kept in a local SQLite file.

One spool file per gateway process, held with a lock (see ``Spool._take_slot``): its rows are
in that process's acceptance order, and nothing else appends to it.
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import aiosqlite

from resilgate.state.records import JournalEntry
from resilgate.state.store import DuplicateTicket

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY,
    ticket TEXT NOT NULL UNIQUE,
    entry BLOB NOT NULL
)
"""


MAX_SLOTS = 64


class Spool:
    """A durable FIFO of journal entries: ``add`` returns once the row is on disk."""

    def __init__(self, path: Path) -> None:
        self.base = path
        self.path = path
        self.count = 0
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._slot: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Spool {self.path} {self.count} waiting>"

    def _slot_paths(self) -> list[Path]:
        return [self.base] + [
            self.base.with_name(f"{self.base.name}.{n}") for n in range(1, MAX_SLOTS)
        ]

    def _take_slot(self) -> None:
        """Lock a spool file of our own: ``path`` for the first process, ``path.1``, ``path.2``
        for the next workers. One drainer per file keeps its entries in order; a restarted
        worker takes a free slot again and drains what its predecessor left."""
        self.base.parent.mkdir(parents=True, exist_ok=True)
        for path in self._slot_paths():
            lock = path.with_name(path.name + ".lock").open("ab")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.path, self._slot = path, lock
            return
        raise OSError(f"all {MAX_SLOTS} spool slots next to {self.base} are locked")

    async def open(self) -> None:
        self._take_slot()
        db = await aiosqlite.connect(self.path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute(SCHEMA)
            await db.commit()
            await self._adopt_orphans(db)
            async with db.execute("SELECT count(*) FROM spool") as cursor:
                row = await cursor.fetchone()
        except BaseException:
            await db.close()
            raise
        self.count = row[0] if row else 0
        self._db = db

    async def _adopt_orphans(self, db: aiosqlite.Connection) -> None:
        """Take over the rows of spool files that no live process holds (after a restart with
        fewer workers, nobody would take their slot again and they would never drain)."""
        for path in self._slot_paths():
            if path == self.path or not path.exists():
                continue
            lock = path.with_name(path.name + ".lock").open("ab")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue  # a live process drains it
            try:
                async with aiosqlite.connect(path) as orphan:
                    try:
                        async with orphan.execute(
                            "SELECT ticket, entry FROM spool ORDER BY id"
                        ) as cur:
                            rows = [(row[0], row[1]) async for row in cur]
                    except sqlite3.OperationalError:
                        continue  # never used: no table
                    if not rows:
                        continue
                    # Ours first (committed, fsynced), then gone from the orphan; a crash in
                    # between leaves copies that INSERT OR IGNORE and Redis's ticket check absorb.
                    await db.executemany(
                        "INSERT OR IGNORE INTO spool (ticket, entry) VALUES (?, ?)", rows
                    )
                    await db.commit()
                    await orphan.execute("DELETE FROM spool")
                    await orphan.commit()
            finally:
                lock.close()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._slot is not None:
            self._slot.close()  # releases the lock
            self._slot = None

    async def add(self, entry: JournalEntry) -> None:
        """Append durably (fsynced); DuplicateTicket if the ticket is already waiting here."""
        db = self._connected()
        async with self._lock:
            try:
                await db.execute(
                    "INSERT INTO spool (ticket, entry) VALUES (?, ?)",
                    (entry.ticket, entry.to_json()),
                )
                # Shielded: a cancelled caller must not leave the row in an open transaction
                # that the next commit would make durable without an acknowledgement.
                await asyncio.shield(db.commit())
            except sqlite3.IntegrityError:
                await db.rollback()
                raise DuplicateTicket(entry.ticket) from None
            except BaseException:
                await asyncio.shield(db.rollback())
                raise
            self.count += 1

    async def head(self, limit: int) -> list[tuple[int, JournalEntry]]:
        """The oldest ``limit`` rows, oldest first, as (row id, entry)."""
        db = self._connected()
        async with (
            self._lock,
            db.execute("SELECT id, entry FROM spool ORDER BY id LIMIT ?", (limit,)) as cursor,
        ):
            return [(row[0], JournalEntry.from_json(row[1])) async for row in cursor]

    async def get(self, ticket: str) -> JournalEntry | None:
        db = self._connected()
        async with (
            self._lock,
            db.execute("SELECT entry FROM spool WHERE ticket = ?", (ticket,)) as cursor,
        ):
            row = await cursor.fetchone()
        return JournalEntry.from_json(row[0]) if row else None

    async def remove(self, ids: Sequence[int]) -> None:
        """Forget rows that Redis now holds."""
        db = self._connected()
        async with self._lock:
            await db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            await db.commit()
            async with db.execute("SELECT count(*) FROM spool") as cursor:
                row = await cursor.fetchone()
            self.count = row[0] if row else 0

    def _connected(self) -> aiosqlite.Connection:
        assert self._db is not None, "Spool.open() first"
        return self._db
