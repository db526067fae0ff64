"""Stores shared by real processes: SQLite file sharing, durability, WAL and schema migration;
counters (SQLite and Redis) that never repeat a number across processes and restarts; leases
and journal queues (SQLite and Redis) that only one process holds or works at a time; a record
cache (SQLite and Redis) whose size bound holds while processes fill it at once.

The behaviour every backend shares is in ``test_store_contract.py``. Here the other workers are
real processes running this module (see the bottom): each opens the store, prints ``ready``,
waits for a line on stdin, then prints one line per operation right after it returned.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resilgate.state.records import ForcedMode, JournalEntry
from resilgate.state.redis import RedisStore
from resilgate.state.sqlite import SqliteStore
from resilgate.state.store import StateStore, StoreUnavailable
from tests.conftest import REPO, wait_until

_SCOPE = "queue:opd"
_MODE = ForcedMode("his", "dr", "failover drill", "test", 0.0)
_LEASE = "half-open:his/primary"
_LEASE_NOW = 1_767_225_600.0
_CHILD = [sys.executable, "-m", "tests.contract.test_store_processes"]
_QUEUES = ("his", "insurance")
_CACHE_BOUND = 20_000
_numbering = itertools.count()


class Child:
    """A worker process using the store; its stdout lines are the operations that returned."""

    def __init__(self, tmp_path: Path, role: str, db: Path | str, count: int) -> None:
        name = f"{role}-{next(_numbering)}"
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*_CHILD, role, str(db), str(count)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=REPO,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.err.read_text()}")
            return self.out.read_bytes().startswith(b"ready\n")

        wait_until(ready, what=f"{self.out.stem} to open the store")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def lines(self) -> list[str]:
        """Complete lines after ``ready``: a line cut short by SIGKILL is not counted."""
        text = self.out.read_text()
        return text[: text.rfind("\n") + 1].splitlines()[1:]

    def wait_lines(self, count: int) -> None:
        wait_until(lambda: len(self.lines()) >= count, what=f"{count} lines from {self.out.stem}")

    def kill(self) -> None:
        self.proc.kill()
        assert self.proc.wait(10) == -signal.SIGKILL, "it had finished before it was killed"

    def finish(self) -> list[str]:
        returncode = self.proc.wait(30)
        assert returncode == 0, f"child exited {returncode}: {self.err.read_text()}"
        return self.lines()


class Rival:
    """A process racing another in lock step: each line sent on its stdin (for the lease, the
    round number) is answered with one line on its stdout, a pipe (``won`` or ``lost``)."""

    def __init__(self, tmp_path: Path, db: Path | str, rounds: int, role: str = "lease") -> None:
        self.err = tmp_path / f"{role}-{next(_numbering)}.err"
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*_CHILD, role, str(db), str(rounds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
            )

    def send(self, line: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def receive(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"exited {self.proc.wait(10)}: {self.err.read_text()}"
        return line.decode().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(10)


def launch(
    children: list[Child], tmp_path: Path, role: str, count: int = 1, target: str | None = None
) -> Child:
    child = Child(tmp_path, role, target or tmp_path / "state.db", count)
    children.append(child)
    return child


def start(
    children: list[Child], tmp_path: Path, role: str, count: int = 1, target: str | None = None
) -> Child:
    child = launch(children, tmp_path, role, count, target)
    child.wait_ready()
    return child


def numbers(*ran: Child) -> list[int]:
    return [int(line) for child in ran for line in child.lines()]


async def test_open_waits_while_another_process_holds_a_new_file(tmp_path: Path) -> None:
    # While one process writes a new (not yet WAL) file, SQLite refuses the switch to WAL at
    # once, without the busy timeout; a worker starting next to it must wait, not fail.
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE unrelated (x)")
    store = SqliteStore(tmp_path / "state.db")
    opening = asyncio.create_task(store.open())
    try:
        await asyncio.wait({opening}, timeout=0.3)
        assert not opening.done(), "open() gave up instead of waiting"
        other.execute("COMMIT")
        await opening
        assert await store.take_block(_SCOPE, 1) == 1
    finally:
        other.close()
        await store.close()


def test_many_processes_open_a_new_file_at_once(tmp_path: Path, children: list[Child]) -> None:
    processes = [launch(children, tmp_path, "take") for _ in range(8)]
    for child in processes:
        child.wait_ready()
        child.go()
    assert sorted(int(line) for child in processes for line in child.finish()) == list(range(1, 9))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_processes_never_take_the_same_number_also_across_restarts(
    tmp_path: Path, children: list[Child], backend: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("redis_server").url if backend == "redis" else None
    # Both open first, then start at one signal. (How their takes interleave is up to SQLite's
    # busy handler, which is not fair: now and then one waits until the other is done.)
    first = [start(children, tmp_path, "take", 1000, target) for _ in range(2)]
    for child in first:
        child.go()
    for child in first:
        child.finish()
    assert sorted(numbers(*first)) == list(range(1, 2001))

    # Both killed with SIGKILL in the middle of taking, then started again.
    second = [start(children, tmp_path, "take", 100_000, target) for _ in range(2)]
    for child in second:
        child.go()
    for child in second:
        child.wait_lines(200)
        child.kill()
    again = [start(children, tmp_path, "take", 1000, target) for _ in range(2)]
    for child in again:
        child.go()
    for child in again:
        child.finish()

    taken = numbers(*first, *second, *again)
    print(f"{backend}: {len(taken)} numbers taken by 6 processes, none twice")
    assert len(set(taken)) == len(taken) >= 4400


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_processes_asking_for_a_lease_at_once_never_both_get_it(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("redis_server").url if backend == "redis" else None
    rivals = [Rival(tmp_path, target or tmp_path / "state.db", 50) for _ in range(2)]
    try:
        assert [rival.receive() for rival in rivals] == ["ready", "ready"]
        for rival in rivals:
            rival.send("go")
        wins = [0, 0]
        for round_ in range(50):
            for rival in rivals:
                rival.send(round_)
            answers = [rival.receive() for rival in rivals]
            assert sorted(answers) == ["lost", "won"], f"round {round_}: {answers}"
            wins[answers.index("won")] += 1
        assert [rival.proc.wait(10) for rival in rivals] == [0, 0]
    finally:
        for rival in rivals:
            rival.stop()
    print(f"{backend}: rounds won by each process: {wins}")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_processes_racing_for_a_mode_never_overwrite_or_delete_anothers(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("redis_server").url if backend == "redis" else None
    rounds = 40
    rivals = [Rival(tmp_path, target or tmp_path / "state.db", 6 * rounds, "modes") for _ in "ab"]
    owners = [f"gw-{rival.proc.pid}" for rival in rivals]

    def race(*commands: str) -> list[str]:
        """Send each rival its command at once; their answers, in rival order."""
        for rival, command in zip(rivals, commands, strict=True):
            rival.send(command)
        return [rival.receive() for rival in rivals]

    try:
        assert [rival.receive() for rival in rivals] == ["ready", "ready"]
        for rival in rivals:
            rival.send("go")
        lifted_first = 0
        for r in range(rounds):
            # Two drills starting at once: one mode is stored, the other start is refused.
            answers = race(f"claim {r}", f"claim {r}")
            winner = answers.index("stored")
            assert answers[1 - winner] == f"blocked {owners[winner]}", f"round {r}: {answers}"
            # Two finishers (or watchers) lifting the same mode at once: one deletes it.
            assert race(f"plant {r}", f"show {r}")[0] == "ok"
            answers = race(f"lift {r}", f"lift {r}")
            assert sorted(answers) == ["deleted", "kept"], f"round {r}: {answers}"
            # A drill's end racing an operator's PUT: the operator's mode always stays.
            assert race(f"plant {r}", f"show {r}")[0] == "ok"
            lifter = r % 2
            answers = race(*(f"lift {r}" if n == lifter else f"force {r}" for n in range(2)))
            lifted_first += answers[lifter] == "deleted"
            assert race(f"show {r}", f"show {r}") == ["ops-ann", "ops-ann"], f"round {r}"
        assert [rival.proc.wait(10) for rival in rivals] == [0, 0]
    finally:
        for rival in rivals:
            rival.stop()
    print(f"{backend}: the drill's end came before the operator's PUT {lifted_first}/{rounds}")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_processes_work_each_journal_queue_one_at_a_time_in_order(
    tmp_path: Path, children: list[Child], backend: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("redis_server").url if backend == "redis" else None
    per_queue = 150

    async def append() -> None:
        store = _store_for(target or str(tmp_path / "state.db"))
        await store.open()
        try:
            for n in range(per_queue):
                for queue in _QUEUES:
                    await store.journal_append(
                        JournalEntry(f"{queue}-{n}", f"{queue}-write", b"{}", 0.0, queue=queue)
                    )
        finally:
            await store.close()

    asyncio.run(append())
    workers = [start(children, tmp_path, "replay", 0, target) for _ in range(2)]
    for child in workers:
        child.go()
    done = [[str(n), *line.split()] for n, child in enumerate(workers) for line in child.finish()]

    # Each entry was claimed, noted and finished by one process: a second claim would show as a
    # second line, or as a refused note or finish, which fails the child.
    assert sorted(line[3] for line in done) == sorted(
        f"{queue}-{n}" for queue in _QUEUES for n in range(per_queue)
    )
    handovers = 0
    for queue in _QUEUES:
        worked = sorted(
            (int(seq), worker, float(claimed), float(finishing))
            for worker, q, seq, _, claimed, finishing in done
            if q == queue
        )
        for before, after in itertools.pairwise(worked):
            assert after[3] > before[3], f"{queue}: {after} finished before {before}"
            # Head of line: another process gets an entry only once the one before is finished.
            if after[1] != before[1]:
                assert after[2] > before[3], f"{queue}: {after} claimed while {before} was held"
                handovers += 1
    print(
        f"{backend}: entries replayed by each process: {[len(c.lines()) for c in workers]}, "
        f"{handovers} times a queue went from one process to the other"
    )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_cache_bound_holds_while_processes_fill_the_cache_at_once(
    tmp_path: Path, children: list[Child], backend: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("redis_server").url if backend == "redis" else None
    writers = [start(children, tmp_path, "cache", 300, target) for _ in range(3)]
    for child in writers:
        child.go()
    keys = [key for child in writers for key in child.finish()]

    async def check() -> tuple[int, int]:
        store = _store_for(target or str(tmp_path / "state.db"))
        await store.open()
        try:
            values = [await store.cache_get(key) for key in keys]
            return sum(len(v) for v in values if v is not None), await store.cache_bytes()
        finally:
            await store.close()

    present, counted = asyncio.run(check())
    assert len(keys) == 900
    assert present == counted
    assert _CACHE_BOUND - 1000 < counted <= _CACHE_BOUND


async def test_an_old_cache_table_is_counted_on_open(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "state.db")
    old.executescript(
        """
        CREATE TABLE cache (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL);
        INSERT INTO cache VALUES ('a', x'0102030405', 4000000000), ('b', x'0102', 4000000000);
        """
    )
    old.close()
    for _ in range(2):  # counted once; the second open keeps the count
        store = SqliteStore(tmp_path / "state.db")
        await store.open()
        try:
            assert await store.cache_bytes() == 7
        finally:
            await store.close()
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    try:
        await store.cache_put("c", b"123", ttl_s=60, max_total_bytes=8)  # evicts a, the nearest
        assert [await store.cache_get(key) for key in "abc"] == [None, b"\x01\x02", b"123"]
        assert await store.cache_bytes() == 5
    finally:
        await store.close()


async def test_an_old_journal_table_gets_its_queue_column_on_open(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "state.db")
    old.executescript(
        """
        CREATE TABLE journal (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT NOT NULL UNIQUE,
            route TEXT NOT NULL, payload BLOB NOT NULL, state TEXT NOT NULL,
            detail TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL,
            lease_owner TEXT, lease_until REAL);
        CREATE INDEX journal_open ON journal (seq) WHERE state IN ('accepted', 'replaying');
        INSERT INTO journal (ticket, route, payload, state, detail, created_at)
            VALUES ('J-old', 'his-orders-write', x'7b7d', 'accepted', '', 1.0);
        """
    )
    old.close()
    for _ in range(2):  # migrated once; the second open finds the column there
        store = SqliteStore(tmp_path / "state.db")
        await store.open()
        try:
            legacy = await store.journal_get("J-old")
            assert legacy is not None and (legacy.queue, legacy.payload) == ("", b"{}")
            if await store.journal_get("J-new") is None:
                await store.journal_append(
                    JournalEntry("J-new", "his-write", b"{}", 2.0, queue="his")
                )
            claimed = await store.journal_claim("his", "gw-a", limit=5, lease_s=30)
            assert [(e.ticket, e.queue) for e in claimed] == [("J-new", "his")]
            assert [e.ticket for e in await store.journal_claim("", "gw-a", 5, 30)] == ["J-old"]
        finally:
            await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        indexes = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT seq FROM journal WHERE queue = 'his'"
            " AND state IN ('accepted', 'replaying') ORDER BY seq"
        ).fetchall()
    assert "journal_queue_open" in indexes
    assert "journal_queue_open" in str(plan)


def test_acknowledged_journal_entries_survive_sigkill(
    tmp_path: Path, children: list[Child]
) -> None:
    writer = start(children, tmp_path, "append", 1_000_000)
    writer.go()
    writer.wait_lines(100)
    writer.kill()
    acknowledged = writer.lines()

    async def reopen_and_list() -> list[str]:
        store = SqliteStore(tmp_path / "state.db")
        await store.open()
        try:
            return [entry.ticket for entry in await store.journal_list(limit=10**6)]
        finally:
            await store.close()

    stored = asyncio.run(reopen_and_list())
    print(f"{len(acknowledged)} acknowledged before SIGKILL, {len(stored)} stored")
    # Each once and in acceptance order; at most one more, committed but killed before printed.
    assert stored[: len(acknowledged)] == acknowledged
    assert len(stored) - len(acknowledged) <= 1
    assert len(set(stored)) == len(stored)


def test_a_mode_put_by_one_process_is_seen_by_another_within_a_second(
    tmp_path: Path, children: list[Child]
) -> None:
    watcher = start(children, tmp_path, "watch")
    watcher.go()
    putter = start(children, tmp_path, "put_mode")
    putter.go()
    (put_at,), (seen_at,) = putter.finish(), watcher.finish()

    delay = float(seen_at) - float(put_at)
    print(f"mode seen by the other process {delay * 1000:.1f} ms after it was put")
    assert 0 < delay < 1.0


async def test_wal_and_full_sync_are_in_effect(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state" / "state.db", busy_timeout_s=2.5)
    await store.open()
    try:
        await store.take_block(_SCOPE, 1)
        # Per connection, so only the store's own connection can say; open() checked it.
        assert "WAL, synchronous=FULL, busy_timeout=2.5s" in repr(store)
        with sqlite3.connect(tmp_path / "state" / "state.db") as other:
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert (tmp_path / "state" / "state.db-wal").exists()
    finally:
        await store.close()
    assert repr(store).endswith("closed>")


async def test_failures_surface_as_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await SqliteStore(tmp_path / "file" / "state.db").open()

    store = SqliteStore(tmp_path / "state.db", busy_timeout_s=0.1)
    await store.open()
    locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await store.take_block(_SCOPE, 1)
        await store.ping()  # readers go on in WAL mode while a writer holds the lock
        locker.execute("ROLLBACK")
        assert await store.take_block(_SCOPE, 1) == 1
    finally:
        locker.close()
        await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.ping()


# The child process side.


def _say(line: object) -> None:
    print(line, flush=True)


async def _take(store: StateStore, count: int) -> None:
    # Many increments in flight at once (as a busy worker would have), 100 at a time.
    for start in range(0, count, 100):
        batch = [store.take_block(_SCOPE, 1) for _ in range(min(100, count - start))]
        for number in await asyncio.gather(*batch):
            _say(number)


async def _lease(store: StateStore, count: int) -> None:
    # Round r asks at _LEASE_NOW + r for one second: the lease of round r - 1 has just run out,
    # so either rival may take it, and the one that asks second must be refused.
    owner = f"gw-{os.getpid()}"
    for _ in range(count):
        round_ = int(await asyncio.to_thread(sys.stdin.readline))
        won = await store.lease(_LEASE, owner, ttl_s=1.0, now=_LEASE_NOW + round_)
        _say("won" if won else "lost")


def _drill_mode(round_: int) -> ForcedMode:
    return ForcedMode(f"race-{round_}", "fallback", "drill", "drill:D-race", round_ + 0.5, 1e10)


async def _modes(store: StateStore, count: int) -> None:
    # One command a line ("<what> <round>"), one answer a line: the rival's side of the races.
    owner = f"gw-{os.getpid()}"
    for _ in range(count):
        what, round_ = (await asyncio.to_thread(sys.stdin.readline)).split()
        drill, n = _drill_mode(int(round_)), int(round_)
        if what == "claim":
            mine = ForcedMode(f"claim-{n}", "fallback", "drill", owner, time.time(), 1e10)
            blocker = await store.put_mode_if_absent(mine, now=time.time())
            _say("stored" if blocker is None else f"blocked {blocker.actor}")
        elif what == "lift":
            _say("deleted" if await store.delete_mode_if(drill) else "kept")
        elif what == "plant":
            await store.put_mode(drill)
            _say("ok")
        elif what == "force":
            await store.put_mode(ForcedMode(drill.target, "maintenance", "outage", "ops-ann", n))
            _say("ok")
        else:
            shown = (await store.load_modes()).get(drill.target)
            _say("none" if shown is None else shown.actor)


async def _append(store: StateStore, count: int) -> None:
    for n in range(count):
        entry = JournalEntry(f"ticket-{n}", "/fhir/Encounter", b'{"n": %d}' % n, time.time())
        _say((await store.journal_append(entry)).ticket)


async def _replay(store: StateStore, count: int) -> None:
    # What a replayer does, as fast as the store lets it, on every queue, until none is left: a
    # few entries at a time, in order. Each line says when the entry was handed out and when
    # its finish was sent.
    owner = f"gw-{os.getpid()}"
    while await store.journal_list(frozenset({"accepted", "replaying"}), limit=1):
        for queue in _QUEUES:
            claimed = await store.journal_claim(queue, owner, limit=3, lease_s=60)
            claimed_at = time.monotonic()  # one clock for all processes on Linux
            for entry in claimed:
                assert await store.journal_note(entry.ticket, owner, "sent"), entry
                finishing_at = time.monotonic()
                assert await store.journal_finish(entry.ticket, owner, "applied", owner), entry
                _say(f"{queue} {entry.seq} {entry.ticket} {claimed_at!r} {finishing_at!r}")


async def _cache(store: StateStore, count: int) -> None:
    # Puts of several sizes and lifetimes, 10 in flight at a time, each bounded.
    for start in range(0, count, 10):
        keys = [f"{os.getpid()}-{n}" for n in range(start, min(start + 10, count))]
        await asyncio.gather(
            *(
                store.cache_put(
                    key, b"v" * (100 + n % 9 * 100), 600 + n % 7, max_total_bytes=_CACHE_BOUND
                )
                for n, key in enumerate(keys, start)
            )
        )
        for key in keys:
            _say(key)


async def _put_mode(store: StateStore, count: int) -> None:
    put_at = time.time()
    await store.put_mode(_MODE)
    _say(put_at)


async def _watch(store: StateStore, count: int) -> None:
    # A long wait: if the change were missed, the delay would show it.
    while _MODE.target not in await store.load_modes():
        await store.wait_for_change(30.0)
    _say(time.time())


def _store_for(db: str) -> StateStore:
    if db.startswith("unix://"):
        return RedisStore(
            db, spool_path=Path(db.removeprefix("unix://")).parent / f"{os.getpid()}.spool"
        )
    return SqliteStore(Path(db))


async def _child(role: str, db: str, count: int) -> None:
    store = _store_for(db)
    await store.open()
    _say("ready")
    sys.stdin.readline()
    roles = {
        "take": _take,
        "append": _append,
        "put_mode": _put_mode,
        "watch": _watch,
        "lease": _lease,
        "modes": _modes,
        "replay": _replay,
        "cache": _cache,
    }
    await roles[role](store, count)
    await store.close()


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
