"""``local-queue``: registration is down: the gateway issues queue numbers itself.

- ``POST /reg/v1/registrations`` answers ``201`` with a local number (``L-NEI-0007``) from
  blocks this process leased ahead per department and day, so issuing goes on while the
  state store is unreachable; the registration is journaled and, once the registration system
  is back, entered into it by its ticket (``PUT /reg/v1/registrations/external/{ticket}``, an
  upsert), and the system's ``regNo`` is recorded on the ticket.
- ``GET /reg/v1/queues/{dept}`` shows the locally issued queue of the day, names masked, and
  ``POST .../call-next`` calls from it; the tickets called are one list in the state store,
  changed under a store lease, so every replica calls from the same queue.

With no reserved number left and the store unreachable, or the store unreachable for the
board, it has no answer and the notice answers (``503``): never a duplicate number.

A registration with ``Idempotency-Key`` is journaled under a ticket derived from the key (an
HMAC under the gateway's cache keyring, when it has one), so a retry finds it. While the store
is unreachable the lookup can only see this process (its spool and recent registrations): a
retry that reaches another replica then gets a second number, and once the store is back the
spool drain keeps only the first journaled; the other is logged ``local_queue_dropped`` by the
process that issued it, as soon as that process sees it (it is never back-entered).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from urllib.parse import quote
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web

from fallbacks.queue_board import board as board_view
from fallbacks.queue_board import (
    call_answer,
    call_mark,
    called_key,
    decode_called,
    encode_called,
    next_waiting,
    queue_of,
)
from fallbacks.queue_numbers import Block, NumberPool, format_number, number_scope
from fallbacks.queue_registration import (
    EXTERNAL_PATH,
    Invalid,
    LocalRegistration,
    check_registration,
    fingerprint,
    keyed_tickets,
    replay_outcome,
    slot_day,
)
from resilgate.config import Config
from resilgate.errors import NoEndpoint, StartupError, UpstreamError
from resilgate.fallback import (
    TICKETS_PATH,
    Fallback,
    FallbackRequest,
    FallbackServices,
    Replayed,
    degraded,
)
from resilgate.logs import get_logger
from resilgate.sealing import Keyring, KeyringError, load_keyring
from resilgate.state.records import UNFINISHED, JournalEntry
from resilgate.state.store import DuplicateTicket, StateStore, StoreUnavailable

log = get_logger("fallbacks.local_queue")

REGISTER_PATH = "/reg/v1/registrations"
QUEUE_PATH = re.compile(r"^/reg/v1/queues/([A-Za-z0-9_]{1,32})(/call-next)?/?$")
RESERVE_EVERY_S = 1.0  # how often the background task tops the reserves up
CALL_LOCK_S = 5.0  # the store lease a call-next holds while it changes the called list
CALL_WAIT_S = 2.0  # longest wait for that lease before the notice answers
# The called list and call-next keys live in the store's cache, whose size bound (the stale
# cache's ``max_total_bytes``) evicts the entries nearest to expiry first. They live at least
# ``max_staleness_s`` + OUTLIVE_S, so the called list (rewritten on every call) goes only after
# every stale copy written up to OUTLIVE_S after the day's last call. If it goes all the same,
# call-next still never calls a ticket twice (see ``call_mark``); the board shows called ones
# as waiting until the next call-next restores them, and their back-entry says WAITING.
CALLED_TTL_S = 8 * 86400.0
CALL_KEY_TTL_S = 2 * 86400.0
OUTLIVE_S = 7 * 86400.0
RECENT_KEYED = 4096  # keyed registrations this process remembers, for retries without store
CONFIRM_EVERY_S = 1.0  # how often registrations issued with an unchecked key are checked
LIST_LIMIT = 50_000  # open registrations read for a board at most
REPLAY_TIMEOUT_S = 10.0
REPLAYED = {"Idempotent-Replayed": "true"}
Clock = Callable[[], float]


@dataclass
class _Scope:
    """One department's numbers on one day in this process."""

    pool: NumberPool
    lease_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one lease at a time
    failing: bool = False  # the last lease failed (logged once until one succeeds)


class LocalQueue(Fallback):
    """Queue numbers, the board and call-next while registration is down; back-entry after."""

    name = "local-queue"
    journals = True

    def __init__(self, services: FallbackServices) -> None:
        super().__init__(services)
        self.options = services.config.fallbacks.local_queue
        self._zone = ZoneInfo(self.options.timezone) if self.options.timezone else None
        mine = [r for r in services.config.routes if r.fallback == self.name]
        self._routes = {r.name for r in mine}
        self._queues = sorted({r.upstream for r in mine})  # journal queues of our entries
        self._scopes: dict[tuple[str, str], _Scope] = {}
        self._listing: tuple[float, list[LocalRegistration]] | None = None
        self._listing_lock = asyncio.Lock()
        self._called: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        staleness = services.config.fallbacks.stale_cache.max_staleness_s
        self._called_ttl_s = max(CALLED_TTL_S, staleness + OUTLIVE_S)
        self._call_key_ttl_s = max(CALL_KEY_TTL_S, staleness + OUTLIVE_S)
        self.keyring = _ticket_keyring(services.config)
        # Keyed registrations journaled (or found) lately, by ticket: a retry while the store
        # is unreachable finds them even if they went to the store, not the spool.
        self._recent: OrderedDict[str, JournalEntry] = OrderedDict()
        # Issued while the key could not be looked up, by ticket, until the store shows whose
        # registration the journal kept under it.
        self._unchecked: dict[str, LocalRegistration] = {}

    def __repr__(self) -> str:
        pools = ", ".join(f"{d}/{day} {s.pool!r}" for (d, day), s in self._scopes.items())
        return f"<LocalQueue {self.name} prefix={self.options.prefix!r} [{pools}]>"

    def today(self) -> date:
        """The hospital's day now (``timezone``, else the host's local time)."""
        return datetime.fromtimestamp(self.services.clock(), self._zone).date()

    async def start(self) -> None:
        if self.keyring is None:
            log.warning(
                "local_queue_tickets_derivable",
                reason="no cache keyring (fallbacks.stale_cache.keys_env / keys_file): the "
                "ticket of a registration with Idempotency-Key is a plain hash of the key",
            )
        self.services.spawn(self._keep_reserves(), "local-queue.reserve")
        self.services.spawn(self._confirm_forever(), "local-queue.confirm")

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        path, method = request.path, request.method
        if method == "POST" and path.rstrip("/") == REGISTER_PATH:
            return await self._register(request)
        match = QUEUE_PATH.match(path)
        if match is None:
            return None  # cancel, check-in, recall, skip...: they wait for the system
        dept, calls = match.group(1), match.group(2) is not None
        if calls and method == "POST":
            return await self._call_next(request, dept)
        if not calls and method in ("GET", "HEAD"):
            return await self._board(request, dept)
        return None

    # Numbers.

    def _scope(self, dept: str, day: str) -> _Scope:
        scope = self._scopes.get((dept, day))
        if scope is None:
            scope = self._scopes[dept, day] = _Scope(NumberPool(self.options.spare_blocks))
        return scope

    async def _lease(self, dept: str, day: str, scope: _Scope) -> bool:
        """Lease blocks until the scope's reserve is full; False if the store failed. While
        a lease is in flight, wait for its outcome instead (a hung store is waited on once)."""
        size = self.options.block_size
        if scope.lease_lock.locked():
            async with scope.lease_lock:
                return not scope.failing
        async with scope.lease_lock:
            while scope.pool.wanted():
                try:
                    first = await self.services.store.take_block(
                        number_scope(dept, date.fromisoformat(day)), size
                    )
                except StoreUnavailable as exc:
                    if not scope.failing:
                        log.warning("local_queue_lease_failed", dept=dept, day=day, error=str(exc))
                    scope.failing = True
                    return False
                scope.failing = False
                if not scope.pool.add(Block(first, size)):
                    continue  # below the open block (cannot happen while leases are serial)
                log.info(
                    "local_queue_block_leased",
                    dept=dept,
                    day=day,
                    first=first,
                    size=size,
                    reserve_blocks=scope.pool.reserve_blocks,
                    available=scope.pool.available,
                )
        return True

    async def _issue(self, dept: str, day: str) -> int | None:
        """The next local number of ``dept`` on ``day``; None if none is left and the store
        cannot lease more now. Never waits on the store while a reserve exists."""
        scope = self._scope(dept, day)
        while (number := scope.pool.take()) is None:
            # Leased numbers may go to other requests before this one runs again: lease on
            # until one is left for it, or the store fails.
            if not await self._lease(dept, day, scope):
                log.warning("local_queue_exhausted", dept=dept, day=day)
                return None
        if scope.pool.open_left == scope.pool.open_size - 1:  # a block was opened for it
            log.info(
                "local_queue_block_opened",
                dept=dept,
                day=day,
                first=number,
                reserve_blocks=scope.pool.reserve_blocks,
            )
        if scope.pool.wanted() and not scope.lease_lock.locked():
            self.services.spawn(self._refill(dept, day, scope), "local-queue.lease")
        return number

    async def _refill(self, dept: str, day: str, scope: _Scope) -> None:
        await self._lease(dept, day, scope)

    async def _keep_reserves(self) -> None:
        """Lease ahead for the configured departments and every department in use today;
        forget other days."""
        while True:
            try:
                today = self.today().isoformat()
                for dept in self.options.departments:
                    self._scope(dept, today)
                for key in [key for key in self._scopes if key[1] != today]:
                    del self._scopes[key]
                for key in [key for key in self._called if key[1] != today]:
                    del self._called[key]
                for (dept, day), scope in list(self._scopes.items()):
                    if scope.pool.wanted() and not scope.lease_lock.locked():
                        await self._lease(dept, day, scope)
            except Exception as exc:  # keep leasing ahead whatever one round met
                log.warning("local_queue_reserve_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(RESERVE_EVERY_S)

    async def _confirm_forever(self) -> None:
        while True:
            try:
                await self._confirm()
            except Exception as exc:  # try again next round, whatever this one met
                log.warning("local_queue_confirm_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(CONFIRM_EVERY_S)

    async def _confirm(self) -> None:
        """Find out, once the store has them, whose registration the journal kept under each
        ticket issued with an unchecked key. Another one (the same key, registered elsewhere
        first): the spool drain drops ours, so this patient's number is never back-entered."""
        for ticket, reg in list(self._unchecked.items()):
            try:
                kept = await self.services.store.journal_get(ticket)
            except StoreUnavailable:
                return
            if kept is None:
                continue  # between the spool and the store as we looked: next round
            if kept.seq == 0:
                return  # still spooled, and so is every later one (the spool drains in order)
            del self._unchecked[ticket]
            theirs = LocalRegistration.from_payload(kept.payload, kept.created_at)
            if theirs is not None and theirs.payload() == reg.payload():
                continue  # ours: it will be back-entered
            self._remember(kept)
            log.warning(
                "local_queue_dropped",
                ticket=ticket,
                queue_no=reg.queue_no,
                kept=theirs.queue_no if theirs else None,
                why="key_registered_elsewhere",
            )

    # Registration.

    async def _register(self, request: FallbackRequest) -> web.StreamResponse | None:
        try:
            fields, masked = check_registration(request.body)
        except Invalid as exc:
            return degraded(self.name, exc.status, exc.answer(), request.request_id)
        today = self.today()
        booked = slot_day(fields["slotId"], fields["dept"])
        if booked is not None and booked != today:
            return None  # a booking for another day waits for the registration system
        print_ = fingerprint(fields)
        key = request.headers.get("Idempotency-Key")
        checked = True
        if key:
            tickets = keyed_tickets(request.route.name, key, self.keyring)
            ticket = tickets[0]
            earlier, checked = await self._earlier(tickets)
            if earlier is not None:  # a retry of a registration taken already: the same number
                return self._repeat(request, earlier, print_)
        else:
            ticket = self.services.new_ticket("R")
        dept, day = fields["dept"], today.isoformat()
        number = await self._issue(dept, day)
        if number is None:
            return None
        queue_no = format_number(self.options.prefix, dept, number)
        reg = LocalRegistration(ticket, dept, day, number, queue_no, fields, masked, print_)
        # Logged in issue order; a number whose journaling fails is never handed out.
        log.info("local_queue_issued", route=request.route.name, ticket=ticket, queue_no=queue_no)
        try:
            entry = await self.services.journal(request, ticket, reg.payload())
        except DuplicateTicket:  # the same key, concurrently: that one's number stands
            log.info("local_queue_dropped", ticket=ticket, queue_no=queue_no, why="duplicate")
            earlier, _ = await self._earlier((ticket,))
            return self._repeat(request, earlier, print_) if earlier is not None else None
        except StoreUnavailable as exc:
            log.warning("local_queue_dropped", ticket=ticket, queue_no=queue_no, why=str(exc))
            return None
        if key:
            self._remember(entry)
            if not checked:
                log.info("local_queue_key_unchecked", route=request.route.name, ticket=ticket)
            if not checked or entry.seq == 0:  # the journal may keep another under its ticket
                self._unchecked[ticket] = reg
        if entry.seq == 0:
            log.info("local_queue_spooled", route=request.route.name, ticket=ticket)
        return degraded(self.name, 201, reg.answer(TICKETS_PATH + ticket), request.request_id)

    async def _earlier(self, tickets: tuple[str, ...]) -> tuple[JournalEntry | None, bool]:
        """The registration journaled under one of ``tickets`` and whether the store could
        tell: (None, False) when it could not and this process has none under them."""
        try:
            for ticket in tickets:
                if (found := await self.services.store.journal_get(ticket)) is not None:
                    self._remember(found)
                    return found, True
        except StoreUnavailable:
            # Spooled ones the store still finds; ones that reached it before it went away, only
            # this process's memory. Anything else cannot be told from a new registration.
            known = next((self._recent[t] for t in tickets if t in self._recent), None)
            return known, known is not None
        return None, True

    def _remember(self, entry: JournalEntry) -> None:
        self._recent[entry.ticket] = entry
        self._recent.move_to_end(entry.ticket)
        while len(self._recent) > RECENT_KEYED:
            self._recent.popitem(last=False)

    def _repeat(
        self, request: FallbackRequest, earlier: JournalEntry, print_: str
    ) -> web.StreamResponse:
        """The answer a registration already taken under this ``Idempotency-Key`` got."""
        reg = LocalRegistration.from_payload(earlier.payload, earlier.created_at)
        if reg is None or reg.fingerprint != print_:
            refused = Invalid(422, "idempotency_key_reused", "key was used for another request")
            return degraded(self.name, 422, refused.answer(), request.request_id)
        answer = reg.answer(TICKETS_PATH + reg.ticket)
        if earlier.state in ("applied", "duplicate"):  # entered since: the system's numbers
            recorded = _json_object(earlier.detail)
            answer |= {"regNo": recorded.get("regNo"), "visitNo": recorded.get("visitNo")}
        return degraded(self.name, 201, answer, request.request_id, REPLAYED)

    # Board and call-next.

    def _day(self, request: FallbackRequest) -> str:
        text = request.query.get("date")
        if not text:
            return self.today().isoformat()
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            raise Invalid(400, "bad_request", f"date must be YYYY-MM-DD, got {text!r}") from None

    async def _board(self, request: FallbackRequest, dept: str) -> web.StreamResponse | None:
        try:
            day = self._day(request)
        except Invalid as exc:
            return degraded(self.name, exc.status, exc.answer(), request.request_id)
        try:
            entries = await self._entries()
            called = await self._called_now(dept, day)
        except StoreUnavailable:
            return None
        entries_of_day = queue_of(entries, dept, day)
        return degraded(self.name, 200, board_view(entries_of_day, called), request.request_id)

    async def _call_next(self, request: FallbackRequest, dept: str) -> web.StreamResponse | None:
        try:
            day = self._day(request)
        except Invalid as exc:
            return degraded(self.name, exc.status, exc.answer(), request.request_id)
        lock = f"local-queue:call-lock:{dept}:{day}"
        owner = f"{self.services.replica}/{request.request_id}"
        try:
            store = self.services.store
            if not await _take_lease(store, lock, owner, self.services.clock):
                return None
            try:
                return await self._call_locked(store, request, dept, day)
            finally:
                with contextlib.suppress(StoreUnavailable):  # else it runs out by itself
                    await store.release(lock, owner)
        except StoreUnavailable:
            return None

    async def _call_locked(
        self, store: StateStore, request: FallbackRequest, dept: str, day: str
    ) -> web.StreamResponse | None:
        """Call the first waiting patient nobody has called (marked) yet, while holding the
        department's call lease; None (nothing changed) when the lease may have run out."""
        held_since = time.monotonic()
        key = request.headers.get("Idempotency-Key")
        key_name = f"local-queue:call-key:{_digest(key)}" if key else None
        if key_name is not None:
            stored = _json_object(await store.cache_get(key_name))
            if stored and stored.get("scope") != [dept, day]:
                refused = Invalid(422, "idempotency_key_reused", "key was used for another call")
                return degraded(self.name, 422, refused.answer(), request.request_id)
            if stored:
                return degraded(self.name, 200, stored.get("answer"), request.request_id, REPLAYED)
        queue = queue_of(await self._entries(fresh=True), dept, day)
        called = decode_called(await store.cache_get(called_key(dept, day)))
        listed = len(called)
        entry, waiting = next_waiting(queue, frozenset(called))
        if time.monotonic() - held_since > CALL_LOCK_S / 2:
            return None  # another caller may hold the lease by now: do not overwrite its call
        # The first to mark a ticket calls it. One marked already is missing from the list (the
        # cache evicted it, or a call failed after its mark): it counts as called, never again.
        while entry is not None and await store.take_block(call_mark(entry.ticket), 1) > 1:
            log.warning("local_queue_called_restored", dept=dept, day=day, ticket=entry.ticket)
            called.append(entry.ticket)
            entry, waiting = next_waiting(queue, frozenset(called))
        answer = call_answer(entry, waiting)
        if entry is not None:
            called.append(entry.ticket)
        if len(called) > listed:
            await store.cache_put(called_key(dept, day), encode_called(called), self._called_ttl_s)
        if entry is not None:
            log.info("local_queue_called", dept=dept, day=day, ticket=entry.ticket)
        if key_name is not None:
            stored_answer = orjson.dumps({"scope": [dept, day], "answer": answer})
            await store.cache_put(key_name, stored_answer, self._call_key_ttl_s)
        self._called[dept, day] = (time.monotonic(), frozenset(called))
        return degraded(self.name, 200, answer, request.request_id)

    async def _entries(self, fresh: bool = False) -> list[LocalRegistration]:
        """The open local registrations of every department, read from the store at most
        once per ``board_refresh_s`` (unless ``fresh``), whoever asks."""
        async with self._listing_lock:
            now = time.monotonic()
            if (
                not fresh
                and self._listing is not None
                and now - self._listing[0] < self.options.board_refresh_s
            ):
                return self._listing[1]
            found: list[LocalRegistration] = []
            for queue in self._queues:
                listed = await self.services.store.journal_list(UNFINISHED, LIST_LIMIT, queue)
                if len(listed) >= LIST_LIMIT:
                    log.warning("local_queue_board_truncated", queue=queue, limit=LIST_LIMIT)
                found.extend(_registrations(listed, self._routes))
            self._listing = (now, found)
            return found

    async def _called_now(self, dept: str, day: str) -> frozenset[str]:
        seen = self._called.get((dept, day))
        now = time.monotonic()
        if seen is not None and now - seen[0] < self.options.board_refresh_s:
            return seen[1]
        raw = await self.services.store.cache_get(called_key(dept, day))
        called = frozenset(decode_called(raw))
        self._called[dept, day] = (now, called)
        return called

    # Back-entry.

    async def replay(self, entry: JournalEntry) -> Replayed:
        """Enter the registration into the registration system by its ticket (an upsert:
        201 ``applied``, 200 ``duplicate``), with the local number, day and queue status."""
        reg = LocalRegistration.from_payload(entry.payload, entry.created_at)
        if reg is None:
            return Replayed("failed", '{"error": "not a local-queue registration"}')
        called = decode_called(await self.services.store.cache_get(called_key(reg.dept, reg.date)))
        status = "CALLED" if reg.ticket in called else "WAITING"
        upstream = entry.queue or self._queues[0]
        try:
            answer = await self.services.client.send(
                upstream,
                "PUT",
                EXTERNAL_PATH + quote(reg.ticket, safe=""),
                headers={"Content-Type": "application/json"},
                body=reg.replay_body(status),
                timeout_s=REPLAY_TIMEOUT_S,
            )
        except (UpstreamError, NoEndpoint) as exc:
            detail = {"localQueueNo": reg.queue_no, "error": type(exc).__name__}
            return Replayed("accepted", orjson.dumps(detail).decode())
        state, detail = replay_outcome(reg, answer.status, answer.json())
        return Replayed(state, orjson.dumps(detail).decode())


def _ticket_keyring(config: Config) -> Keyring | None:
    """The gateway's cache keyring (``fallbacks.stale_cache``), which keys the tickets of
    registrations sent with ``Idempotency-Key``; None if it has none."""
    options = config.fallbacks.stale_cache
    keys_file = config.resolve(options.keys_file) if options.keys_file is not None else None
    try:
        return load_keyring(options.keys_env, keys_file)
    except KeyringError as exc:
        raise StartupError(f"fallbacks.stale_cache (local-queue tickets): {exc}") from None


async def _take_lease(store: StateStore, name: str, owner: str, clock: Clock) -> bool:
    """Wait up to CALL_WAIT_S for the lease ``name``."""
    deadline = time.monotonic() + CALL_WAIT_S
    while not await store.lease(name, owner, CALL_LOCK_S, clock()):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _registrations(entries: Iterable[JournalEntry], routes: set[str]) -> list[LocalRegistration]:
    found = []
    for entry in entries:
        if entry.route in routes:
            reg = LocalRegistration.from_payload(entry.payload, entry.created_at)
            if reg is not None:
                found.append(reg)
    return found


def _json_object(raw: str | bytes | None) -> dict[str, object]:
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
