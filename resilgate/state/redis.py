"""Shared state in Redis, for many gateway replicas.

Layout under ``<namespace>:`` (one Redis, not Cluster: the Lua scripts touch keys they derive):

- ``modes``, ``verdicts``: hashes, every write announced on the ``changes`` channel (Lua
  scripts put a mode only if none is active, and delete one only if it is the expected one);
- ``counters``: a hash, HINCRBY hands out blocks;
- ``lease:<name>``: a hash of the holder's ``owner`` and ``until`` (the caller's clock), with
  PEXPIRE so a lease nobody renews goes by itself; Lua scripts take and release it;
- ``cache:<key>``: the value behind its expiry time (the caller's clock), with PX so Redis
  frees it by itself; ``cache-expiry`` indexes the entries by that time, ``cache-size`` holds
  their lengths and ``cache-bytes`` the sum. Only Lua scripts change those three (a put
  replaces and evicts, trim drops the expired), always together; PX deletes just the value,
  so the sum cannot drift: an expired entry counts towards the bound (and is evicted first)
  until trim drops it, and ``cache_bytes`` leaves it out;
- ``journal:*``: the immutable entry by ticket, its queue, state and detail, its ``seq`` in
  the ``order`` sorted set, unfinished tickets in ``open`` and, per queue, in
  ``open:<queue>`` (both scored by seq), leases, and finish times in ``finished``. Lua
  scripts keep these consistent: append refuses a known ticket, a claim leases the head of
  one queue atomically across replicas (reading only that queue's ``open:<queue>``), trim
  drops only finished entries. For ``journal_stats``: the names of queues with entries in
  ``queues``, dead letters per queue in ``dead:<queue>`` (scored by seq). ``indexed`` marks
  those two built: on the first open after an upgrade from all entries, then by each trim from
  the entries finished since the last one (an older replica still running does not keep them);
- ``doc:<kind>:<key>``: a document, with PX when it has a time to live; ``docs:<kind>`` the
  set of its keys, which doc_list and trim prune of the expired ones, ``docs`` the kinds
  (a ``:`` or ``%`` in a kind is percent-escaped, so keys of different kinds never meet);
- ``audit``: a sorted set scored by the record's time.

Every call is bounded by ``op_timeout_s``; whatever goes wrong becomes StoreUnavailable.
Journal entries that cannot reach Redis go to a local :class:`Spool` and are acknowledged;
a background task moves them to Redis, in order, when it is back. ``journal_list`` shows
Redis only, so spooled entries appear there (and in ``journal_stats``) once moved;
``journal_get`` also looks in the spool. A spooled entry is returned with ``seq`` 0 (it gets
its seq when moved), and a ticket already in Redis is only recognised then: the spooled copy
is dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from resilgate.logs import get_logger
from resilgate.state.records import (
    DEAD,
    AuditRecord,
    ForcedMode,
    JournalEntry,
    JournalState,
    QueueStats,
    Verdict,
)
from resilgate.state.redis_target import Connected, RedisTarget
from resilgate.state.spool import Spool
from resilgate.state.store import (
    DuplicateTicket,
    StateStore,
    StoreUnavailable,
    check_block_size,
    check_lease_ttl,
)

T = TypeVar("T")
log = get_logger("resilgate.state")

RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0
PUBSUB_PING_S = 1.0  # a silent subscription is pinged this often, to notice a dead link
DRAIN_BATCH = 100
MAX_CONNECTIONS = 32  # per process
CLOSE_DRAIN_S = 2.0
OPEN_STATES = ("accepted", "replaying")
EXPIRY = struct.Struct(">d")
# How far before the last trim the next one looks for dead letters it has not indexed: a
# finish time comes from the finishing replica's clock, which may be behind ours.
INDEX_MARGIN_S = 300.0

# KEYS of every journal script, in this order. A queue's open set is derived from ``open``.
JOURNAL_KEYS = (
    "data", "state", "detail", "order", "open", "seq", "lease_owner", "lease_until", "finished",
    "queue", "dead", "queues", "indexed",
)  # fmt: skip

# The open and dead sets of the ticket's queue.
QUEUE_LUA = """
local function queue_open(t)
  return KEYS[5] .. ':' .. (redis.call('HGET', KEYS[10], t) or '')
end
local function queue_dead(t)
  return KEYS[11] .. ':' .. (redis.call('HGET', KEYS[10], t) or '')
end
"""

ROW_LUA = """
local function push_row(out, t)
  local data = redis.call('HGET', KEYS[1], t)
  if not data then return false end
  out[#out + 1] = data
  out[#out + 1] = redis.call('ZSCORE', KEYS[4], t)
  out[#out + 1] = redis.call('HGET', KEYS[2], t)
  out[#out + 1] = redis.call('HGET', KEYS[3], t) or ''
  return true
end
"""

# ARGV: ticket, entry, state, detail, the state's group ('open', 'dead' or 'finished'), queue.
APPEND_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[10], ARGV[1], ARGV[6])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('SADD', KEYS[12], ARGV[6])
if ARGV[5] == 'open' then
  redis.call('ZADD', KEYS[5], seq, ARGV[1])
  redis.call('ZADD', KEYS[5] .. ':' .. ARGV[6], seq, ARGV[1])
elseif ARGV[5] == 'dead' then
  redis.call('ZADD', KEYS[11] .. ':' .. ARGV[6], seq, ARGV[1])
end
return seq
"""

GET_LUA = (
    ROW_LUA
    + """
local out = {}
push_row(out, ARGV[1])
return out
"""
)

# ARGV: limit, 'order'|'open', '*' (any queue) or '=' and the queue, then '*' (any state) or
# the wanted states.
LIST_LUA = (
    ROW_LUA
    + """
local limit = tonumber(ARGV[1])
local source = KEYS[4]
if ARGV[2] == 'open' then source = KEYS[5] end
local queue, first = nil, 4
if ARGV[3] == '=' then
  queue, first = ARGV[4], 5
  if source == KEYS[5] then source, queue = KEYS[5] .. ':' .. queue, nil end
end
local any = ARGV[first] == '*'
local wanted = {}
for i = first, #ARGV do wanted[ARGV[i]] = true end
local out, n, start = {}, 0, 0
while n < limit do
  local batch = redis.call('ZRANGE', source, start, start + 499)
  if #batch == 0 then break end
  for _, t in ipairs(batch) do
    if (any or wanted[redis.call('HGET', KEYS[2], t)])
        and (not queue or (redis.call('HGET', KEYS[10], t) or '') == queue) then
      if push_row(out, t) then n = n + 1 end
      if n >= limit then break end
    end
  end
  start = start + 500
end
return out
"""
)

# ARGV: queue, owner, now, lease end, limit (at least 1). Head of line: the claim stops at
# the first entry another owner holds, so it reads at most ``limit`` entries of the queue.
CLAIM_LUA = (
    ROW_LUA
    + """
local now = tonumber(ARGV[3])
local out = {}
for _, t in ipairs(redis.call('ZRANGE', KEYS[5] .. ':' .. ARGV[1], 0, tonumber(ARGV[5]) - 1)) do
  local holder = redis.call('HGET', KEYS[7], t)
  if holder and holder ~= ARGV[2] and tonumber(redis.call('HGET', KEYS[8], t)) > now then
    break
  end
  redis.call('HSET', KEYS[7], t, ARGV[2])
  redis.call('HSET', KEYS[8], t, ARGV[4])
  push_row(out, t)
end
return out
"""
)

# ARGV: ticket, owner, detail. The lease stays with its owner.
NOTE_LUA = """
local t = ARGV[1]
if redis.call('HEXISTS', KEYS[1], t) == 0 then return 0 end
if redis.call('HGET', KEYS[7], t) ~= ARGV[2] or redis.call('ZSCORE', KEYS[9], t) then
  return -1
end
redis.call('HSET', KEYS[2], t, 'replaying')
redis.call('HSET', KEYS[3], t, ARGV[3])
return 1
"""

# ARGV: ticket, state, detail, the state's group ('open', 'dead' or 'finished'), now, owner.
FINISH_LUA = (
    QUEUE_LUA
    + """
local t = ARGV[1]
if redis.call('HEXISTS', KEYS[1], t) == 0 then return 0 end
if redis.call('HGET', KEYS[7], t) ~= ARGV[6] or redis.call('ZSCORE', KEYS[9], t) then
  return -1
end
redis.call('HSET', KEYS[2], t, ARGV[2])
redis.call('HSET', KEYS[3], t, ARGV[3])
redis.call('HDEL', KEYS[7], t)
redis.call('HDEL', KEYS[8], t)
if ARGV[4] ~= 'open' then
  redis.call('ZREM', KEYS[5], t)
  redis.call('ZREM', queue_open(t), t)
  redis.call('ZADD', KEYS[9], ARGV[5], t)
  if ARGV[4] == 'dead' then
    redis.call('ZADD', queue_dead(t), redis.call('ZSCORE', KEYS[4], t), t)
  end
else
  local seq = redis.call('ZSCORE', KEYS[4], t)
  redis.call('ZADD', KEYS[5], seq, t)
  redis.call('ZADD', queue_open(t), seq, t)
  redis.call('ZREM', KEYS[9], t)
end
return 1
"""
)

# ARGV: ticket, detail. A dead letter back to accepted, at its old place in its queue.
REOPEN_LUA = (
    QUEUE_LUA
    + ROW_LUA
    + """
local t = ARGV[1]
if redis.call('HEXISTS', KEYS[1], t) == 0 then return 0 end
local state = redis.call('HGET', KEYS[2], t)
if state ~= 'conflict' and state ~= 'failed' then return -1 end
local seq = redis.call('ZSCORE', KEYS[4], t)
redis.call('HSET', KEYS[2], t, 'accepted')
redis.call('HSET', KEYS[3], t, ARGV[2])
redis.call('HDEL', KEYS[7], t)
redis.call('HDEL', KEYS[8], t)
redis.call('ZREM', KEYS[9], t)
redis.call('ZREM', queue_dead(t), t)
redis.call('ZADD', KEYS[5], seq, t)
redis.call('ZADD', queue_open(t), seq, t)
local out = {}
push_row(out, t)
return out
"""
)

# ARGV: ticket, detail, now, finish time. Only a dead letter, or an open entry nobody holds
# an unexpired lease on (judged by the caller's ``now``), in the one script with the write.
DISCARD_LUA = (
    QUEUE_LUA
    + ROW_LUA
    + """
local t = ARGV[1]
if redis.call('HEXISTS', KEYS[1], t) == 0 then return 0 end
local state = redis.call('HGET', KEYS[2], t)
if state == 'accepted' or state == 'replaying' then
  local until_ = redis.call('HGET', KEYS[8], t)
  if redis.call('HGET', KEYS[7], t) and until_ and tonumber(until_) > tonumber(ARGV[3]) then
    return -1
  end
elseif state ~= 'conflict' and state ~= 'failed' then
  return -1
end
redis.call('HSET', KEYS[2], t, 'discarded')
redis.call('HSET', KEYS[3], t, ARGV[2])
redis.call('HDEL', KEYS[7], t)
redis.call('HDEL', KEYS[8], t)
redis.call('ZREM', KEYS[5], t)
redis.call('ZREM', queue_open(t), t)
redis.call('ZREM', queue_dead(t), t)
redis.call('ZADD', KEYS[9], ARGV[4], t)
local out = {}
push_row(out, t)
return out
"""
)

# Per known queue with open or dead entries: name, open count, dead count, the head's entry
# ('' when none is open). Reads two counts and one entry per queue, whatever the backlog.
STATS_LUA = """
local out = {}
for _, q in ipairs(redis.call('SMEMBERS', KEYS[12])) do
  local open = redis.call('ZCARD', KEYS[5] .. ':' .. q)
  local dead = redis.call('ZCARD', KEYS[11] .. ':' .. q)
  if open > 0 or dead > 0 then
    local head = redis.call('ZRANGE', KEYS[5] .. ':' .. q, 0, 0)[1]
    out[#out + 1] = q
    out[#out + 1] = open
    out[#out + 1] = dead
    out[#out + 1] = head and redis.call('HGET', KEYS[1], head) or ''
  end
end
return out
"""

# ARGV: 'open' or 'trim', now, margin. Builds ``queues`` and ``dead:<queue>`` from the open
# entries and those finished since the last run (less the margin), or from all on the first
# run; 'open' does nothing once built. Drops what no longer belongs: entries no longer dead,
# queues with nothing open or dead.
INDEX_LUA = """
local from = '-inf'
local mark = redis.call('GET', KEYS[13])
if mark then
  if ARGV[1] == 'open' then return 0 end
  from = tostring(tonumber(mark) - tonumber(ARGV[3]))
end
for _, t in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  redis.call('SADD', KEYS[12], redis.call('HGET', KEYS[10], t) or '')
end
for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], from, '+inf')) do
  local state = redis.call('HGET', KEYS[2], t)
  if state == 'conflict' or state == 'failed' then
    local q = redis.call('HGET', KEYS[10], t) or ''
    redis.call('SADD', KEYS[12], q)
    redis.call('ZADD', KEYS[11] .. ':' .. q, redis.call('ZSCORE', KEYS[4], t), t)
  end
end
for _, q in ipairs(redis.call('SMEMBERS', KEYS[12])) do
  local dead = KEYS[11] .. ':' .. q
  for _, t in ipairs(redis.call('ZRANGE', dead, 0, -1)) do
    local state = redis.call('HGET', KEYS[2], t)
    if state ~= 'conflict' and state ~= 'failed' then redis.call('ZREM', dead, t) end
  end
  if redis.call('ZCARD', dead) == 0 and redis.call('ZCARD', KEYS[5] .. ':' .. q) == 0 then
    redis.call('SREM', KEYS[12], q)
  end
end
redis.call('SET', KEYS[13], ARGV[2])
return 1
"""

# KEYS: the journal's, then audit, cache expiry index, sizes, total. ARGV: journal cutoff,
# audit cutoff, now.
TRIM_LUA = (
    QUEUE_LUA
    + """
local removed = 0
for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', '(' .. ARGV[1])) do
  redis.call('ZREM', queue_open(t), t)
  redis.call('ZREM', queue_dead(t), t)
  for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[7], KEYS[8], KEYS[10]}) do
    redis.call('HDEL', k, t)
  end
  redis.call('ZREM', KEYS[4], t)
  redis.call('ZREM', KEYS[5], t)
  removed = removed + 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. ARGV[1])
removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[14], '-inf', '(' .. ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', KEYS[15], '-inf', ARGV[3])
for _, k in ipairs(expired) do
  redis.call('DEL', k)
  redis.call('DECRBY', KEYS[17], redis.call('HGET', KEYS[16], k) or '0')
  redis.call('HDEL', KEYS[16], k)
end
redis.call('ZREMRANGEBYSCORE', KEYS[15], '-inf', ARGV[3])
return removed + #expired
"""
)

# KEYS: the value, cache expiry index, sizes, total. ARGV: expiry and value, expires at, time to
# live in ms, the value's length, the bound ('' for none). Returns 1 if stored.
CACHE_PUT_LUA = """
local name, size, bound = KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
  - tonumber(redis.call('HGET', KEYS[3], name) or '0')
redis.call('DEL', name)
redis.call('ZREM', KEYS[2], name)
redis.call('HDEL', KEYS[3], name)
if bound and size > bound then
  redis.call('SET', KEYS[4], total)
  return 0
end
while bound and total + size > bound do
  local nearest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not nearest then total = 0 break end  -- nothing is left to count
  total = total - tonumber(redis.call('HGET', KEYS[3], nearest) or '0')
  redis.call('DEL', nearest)
  redis.call('ZREM', KEYS[2], nearest)
  redis.call('HDEL', KEYS[3], nearest)
end
redis.call('SET', name, ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], name)
redis.call('HSET', KEYS[3], name, ARGV[4])
redis.call('SET', KEYS[4], total + size)
return 1
"""

# KEYS: cache expiry index, sizes, total. ARGV: now.
CACHE_BYTES_LUA = """
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  total = total - tonumber(redis.call('HGET', KEYS[2], name) or '0')
end
return total
"""

# KEYS: the lease. ARGV: owner, now, until, time to live in ms. Whether it ran out is judged by
# the stored ``until`` and the caller's ``now``, not by Redis's clock.
LEASE_LUA = """
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1]
    and tonumber(redis.call('HGET', KEYS[1], 'until')) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: the lease. ARGV: owner.
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

# KEYS: the kinds. ARGV: the prefix of a kind's index set, of its documents, and a kind, or
# '*' for every kind. Prunes the index of keys Redis has expired (and drops a kind left with
# none); returns a kind's values as (key, value)*, then how many keys were pruned.
DOCS_LUA = """
local listing = ARGV[3] ~= '*'
local kinds = {ARGV[3]}
if not listing then kinds = redis.call('SMEMBERS', KEYS[1]) end
local out, pruned = {}, 0
for _, kind in ipairs(kinds) do
  local index = ARGV[1] .. kind
  for _, key in ipairs(redis.call('SMEMBERS', index)) do
    local value = redis.call('GET', ARGV[2] .. kind .. ':' .. key)
    if not value then
      redis.call('SREM', index, key)
      pruned = pruned + 1
    elseif listing then
      out[#out + 1] = key
      out[#out + 1] = value
    end
  end
  if redis.call('SCARD', index) == 0 then redis.call('SREM', KEYS[1], kind) end
end
out[#out + 1] = pruned
return out
"""

# KEYS: the modes. ARGV: target, the mode's JSON, now, the changes channel. Returns the mode
# active at ``now`` that kept this one out, or nil once stored (and announced).
PUT_MODE_IF_ABSENT_LUA = """
local present = redis.call('HGET', KEYS[1], ARGV[1])
if present then
  local expires_at = cjson.decode(present)['expires_at']
  if expires_at == nil or expires_at == cjson.null or expires_at > tonumber(ARGV[3]) then
    return present
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], '1')
return false
"""

# KEYS: the modes. ARGV: target, the expected mode's JSON, the changes channel. Deletes (and
# announces) only if every field of the expected mode has the stored value: compared decoded,
# so 5 and 5.0 are one number, as they are to the other backends. Returns 1 if deleted.
DELETE_MODE_IF_LUA = """
local present = redis.call('HGET', KEYS[1], ARGV[1])
if not present then return 0 end
local stored = cjson.decode(present)
for field, value in pairs(cjson.decode(ARGV[2])) do
  if stored[field] ~= value then return 0 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], '1')
return 1
"""

AUDIT_APPEND_LUA = """
local n = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], ARGV[1], string.format('%020d', n) .. ARGV[2])
"""
AUDIT_SEQ_WIDTH = 20


class RedisStore(StateStore):
    """State shared by all replicas through one Redis; journal writes survive its outages."""

    backend = "redis"

    def __init__(
        self,
        target: RedisTarget | str,
        *,
        spool_path: Path,
        namespace: str = "resilgate",
        op_timeout_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = RedisTarget(url=target) if isinstance(target, str) else target
        self.url = str(self.target)  # without a password
        self.namespace = namespace
        self._connected: Connected | None = None
        self._op_timeout_s = op_timeout_s
        self._clock = clock
        self._spool = Spool(spool_path)
        self._client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reachable = False
        self.last_error = ""
        self._back = asyncio.Event()  # set while Redis answers
        self._changed = asyncio.Event()
        self._spool_waiting = asyncio.Event()
        ns = namespace
        self._channel = f"{ns}:changes"
        self._modes = f"{ns}:modes"
        self._verdicts = f"{ns}:verdicts"
        self._counters = f"{ns}:counters"
        self._cache_sizes = [f"{ns}:cache-expiry", f"{ns}:cache-size", f"{ns}:cache-bytes"]
        self._audit = f"{ns}:audit"
        self._audit_seq = f"{ns}:audit:seq"
        self._journal_keys = [f"{ns}:journal:{name}" for name in JOURNAL_KEYS]
        self._doc_kinds = f"{ns}:docs"

    def __repr__(self) -> str:
        health = "reachable" if self.reachable else f"UNREACHABLE ({self.last_error})"
        return (
            f"<RedisStore {self.url} ns={self.namespace} {health}, "
            f"{self._spool.count} journal entries spooled>"
        )

    # Connection, health, change announcements.

    async def open(self) -> None:
        """Open the spool and connect; if Redis is down, start unreachable and keep trying."""
        await self._spool.open()
        # A bounded pool that waits (within the op timeout) for a free connection, instead of
        # failing the moment a burst of operations outnumbers the connections.
        self._connected = self.target.connect(
            MAX_CONNECTIONS,
            self._op_timeout_s,
            retry=Retry(NoBackoff(), 0),  # a retry could run a journal append twice
        )
        self._client = client = self._connected.redis
        self._append = client.register_script(APPEND_LUA)
        self._get = client.register_script(GET_LUA)
        self._list = client.register_script(LIST_LUA)
        self._claim = client.register_script(CLAIM_LUA)
        self._note = client.register_script(NOTE_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._reopen = client.register_script(REOPEN_LUA)
        self._discard = client.register_script(DISCARD_LUA)
        self._stats = client.register_script(STATS_LUA)
        self._index = client.register_script(INDEX_LUA)
        self._docs = client.register_script(DOCS_LUA)
        self._trim = client.register_script(TRIM_LUA)
        self._audit_append = client.register_script(AUDIT_APPEND_LUA)
        self._put_mode_if_absent = client.register_script(PUT_MODE_IF_ABSENT_LUA)
        self._delete_mode_if = client.register_script(DELETE_MODE_IF_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._cache_put = client.register_script(CACHE_PUT_LUA)
        self._cache_bytes = client.register_script(CACHE_BYTES_LUA)
        try:
            self._pubsub = await self._subscribe()
            await self._build_index("open")
        except StoreUnavailable:
            pass  # the watcher keeps trying (and the next trim builds the index)
        except BaseException:
            await self.close()
            raise
        if self._spool.count:
            self._spool_waiting.set()
        self._tasks = [
            asyncio.create_task(self._watch(), name="redis-store-watch"),
            asyncio.create_task(self._drain_forever(), name="redis-store-drain"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.reachable and self._spool.count:
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(CLOSE_DRAIN_S):
                    while self._spool.count:
                        await self._drain_batch()
        if self._pubsub is not None:
            await _close(self._pubsub)
            self._pubsub = None
        if self._connected is not None:
            await self._connected.aclose()
            self._connected = None
            self._client = None
        await self._spool.close()

    async def ping(self) -> None:
        await self._call(lambda: self._redis().ping())

    async def spooled(self) -> int:
        """Journal entries acknowledged but not yet moved to Redis."""
        return self._spool.count

    async def durability_warning(self) -> str | None:
        """Whether this Redis keeps an acknowledged journal write across its own crash: it
        must run AOF with ``appendfsync always`` (resilgate does not WAIT for replicas)."""

        async def read() -> tuple[dict[str, str] | str, int]:
            client = self._redis()
            try:
                raw: dict[Any, Any] = await client.config_get("append*")
            except ResponseError as exc:  # CONFIG renamed away or denied by an ACL
                return str(exc), 0
            replication: dict[str, Any] = await client.info("replication")
            config = {_text(k): _text(v) for k, v in raw.items()}
            return config, int(replication.get("connected_slaves", 0))

        prefix = f"Redis {self.url}"
        try:
            config, replicas = await self._call(read)
        except StoreUnavailable as exc:
            return f"{prefix}: cannot verify persistence, unreachable ({exc.__cause__!r})"
        if isinstance(config, str):
            return (
                f"{prefix}: cannot verify persistence, CONFIG GET refused ({config}); "
                "journal entries need appendonly yes and appendfsync always"
            )
        note = f" ({replicas} replica(s) connected, but resilgate does not WAIT for them)"
        note = note if replicas else ""
        if config.get("appendonly") != "yes":
            return (
                f"{prefix}: appendonly is {config.get('appendonly')!r}, so journal entries "
                "acknowledged since its last snapshot are lost if it crashes; set appendonly "
                f"yes and appendfsync always{note}"
            )
        if config.get("appendfsync") != "always":
            return (
                f"{prefix}: appendfsync is {config.get('appendfsync')!r}, so up to a second of "
                f"acknowledged journal entries is lost if it crashes; set appendfsync always{note}"
            )
        return None

    async def wait_for_change(self, within_s: float) -> bool:
        try:
            async with asyncio.timeout(within_s):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    # Modes and verdicts.

    async def put_mode(self, mode: ForcedMode) -> None:
        await self._announce(lambda pipe: pipe.hset(self._modes, mode.target, mode.to_json()))

    async def delete_mode(self, target: str) -> None:
        await self._announce(lambda pipe: pipe.hdel(self._modes, target))

    async def put_mode_if_absent(self, mode: ForcedMode, now: float) -> ForcedMode | None:
        args: list[str | bytes] = [mode.target, mode.to_json(), repr(now), self._channel]
        present = await self._call(lambda: self._put_mode_if_absent(keys=[self._modes], args=args))
        return None if present is None else ForcedMode.from_json(present)

    async def delete_mode_if(self, expected: ForcedMode) -> bool:
        args: list[str | bytes] = [expected.target, expected.to_json(), self._channel]
        deleted = await self._call(lambda: self._delete_mode_if(keys=[self._modes], args=args))
        return bool(deleted == 1)

    async def load_modes(self) -> dict[str, ForcedMode]:
        raw = await self._call(lambda: self._redis().hgetall(self._modes))
        return {_text(target): ForcedMode.from_json(value) for target, value in raw.items()}

    async def put_verdict(self, verdict: Verdict) -> None:
        field = f"{verdict.endpoint}|{verdict.replica}"
        await self._announce(lambda pipe: pipe.hset(self._verdicts, field, verdict.to_json()))

    async def load_verdicts(self) -> list[Verdict]:
        raw = await self._call(lambda: self._redis().hgetall(self._verdicts))
        return [Verdict.from_json(value) for value in raw.values()]

    # Counters, leases and cache.

    async def take_block(self, scope: str, size: int) -> int:
        check_block_size(size)
        last: int = await self._call(lambda: self._redis().hincrby(self._counters, scope, size))
        return last - size + 1

    async def lease(self, name: str, owner: str, ttl_s: float, now: float) -> bool:
        check_lease_ttl(ttl_s)
        keys = [f"{self.namespace}:lease:{name}"]
        px = max(1, math.ceil(ttl_s * 1000))
        args: list[str | int] = [owner, repr(now), repr(now + ttl_s), px]
        held = await self._call(lambda: self._lease(keys=keys, args=args))
        return bool(held == 1)

    async def release(self, name: str, owner: str) -> None:
        keys = [f"{self.namespace}:lease:{name}"]
        await self._call(lambda: self._release(keys=keys, args=[owner]))

    async def cache_put(
        self, key: str, value: bytes, ttl_s: float, max_total_bytes: int | None = None
    ) -> None:
        keys = [f"{self.namespace}:cache:{key}", *self._cache_sizes]
        expires_at = self._clock() + ttl_s
        args: list[str | int | bytes] = [
            EXPIRY.pack(expires_at) + value,
            repr(expires_at),
            max(1, math.ceil(ttl_s * 1000)),
            len(value),
            "" if max_total_bytes is None else max_total_bytes,
        ]
        await self._call(lambda: self._cache_put(keys=keys, args=args))

    async def cache_get(self, key: str) -> bytes | None:
        name = f"{self.namespace}:cache:{key}"
        raw = cast(bytes | None, await self._call(lambda: self._redis().get(name)))
        if raw is None or EXPIRY.unpack_from(raw)[0] <= self._clock():
            return None
        return raw[EXPIRY.size :]

    async def cache_bytes(self) -> int:
        args = [repr(self._clock())]
        total: int = await self._call(lambda: self._cache_bytes(keys=self._cache_sizes, args=args))
        return total

    # Journal.

    async def journal_append(self, entry: JournalEntry) -> JournalEntry:
        """Append to Redis, or to the local spool while Redis is unreachable or the spool
        still holds earlier entries (so acceptance order is kept); seq is 0 if spooled."""
        if self.reachable and not self._spool.count:
            try:
                seq: int = await self._call(lambda: self._append_to(self._redis(), entry))
            except StoreUnavailable:
                pass  # an append that did land after all is recognised when moved
            else:
                if not seq:
                    raise DuplicateTicket(entry.ticket)
                return replace(entry, seq=seq)
        first = not self._spool.count
        try:
            await self._spool.add(entry)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable and the spool failed: {exc}") from exc
        if first:
            log.warning("journal_spooling", spool=str(self._spool.path), error=self.last_error)
        self._spool_waiting.set()
        return replace(entry, seq=0)

    async def journal_get(self, ticket: str) -> JournalEntry | None:
        try:
            rows = await self._call(lambda: self._get(keys=self._journal_keys, args=[ticket]))
        except StoreUnavailable:
            spooled = await self._spool.get(ticket)  # what an outage spools is still findable
            if spooled is None:
                raise
            return spooled
        found = _entries(rows)
        if found:
            return found[0]
        return await self._spool.get(ticket)

    async def journal_list(
        self, states: frozenset[str] | None = None, limit: int = 1000, queue: str | None = None
    ) -> list[JournalEntry]:
        source = "open" if states is not None and states <= set(OPEN_STATES) else "order"
        of_queue = ["*"] if queue is None else ["=", queue]
        wanted = ["*"] if states is None else sorted(states) or ["-"]
        args: list[str | int] = [limit, source, *of_queue, *wanted]
        rows = await self._call(lambda: self._list(keys=self._journal_keys, args=args))
        return _entries(rows)

    async def journal_claim(
        self, queue: str, owner: str, limit: int, lease_s: float
    ) -> list[JournalEntry]:
        if limit < 1:
            return []  # ZRANGE would read a negative end as counted from the last entry
        now = self._clock()
        args: list[str | int] = [queue, owner, repr(now), repr(now + lease_s), limit]
        rows = await self._call(lambda: self._claim(keys=self._journal_keys, args=args))
        return _entries(rows)

    async def journal_note(self, ticket: str, owner: str, detail: str) -> bool:
        args = [ticket, owner, detail]
        outcome = await self._call(lambda: self._note(keys=self._journal_keys, args=args))
        if outcome == 0:
            raise KeyError(ticket)
        return bool(outcome == 1)

    async def journal_finish(
        self, ticket: str, owner: str, state: JournalState, detail: str
    ) -> bool:
        args = [ticket, state, detail, _group(state), repr(self._clock()), owner]
        outcome = await self._call(lambda: self._finish(keys=self._journal_keys, args=args))
        if outcome == 0:
            raise KeyError(ticket)
        return bool(outcome == 1)

    async def journal_stats(self) -> list[QueueStats]:
        rows = await self._call(lambda: self._stats(keys=self._journal_keys))
        stats = [
            QueueStats(
                queue=_text(queue),
                open=int(open_),
                oldest_open_at=JournalEntry.from_json(head).created_at if head else None,
                dead=int(dead),
            )
            for queue, open_, dead, head in _batched(rows, 4)
        ]
        return sorted(stats, key=lambda queue: queue.queue)

    async def journal_reopen(self, ticket: str, detail: str) -> JournalEntry | None:
        args = [ticket, detail]
        outcome = await self._call(lambda: self._reopen(keys=self._journal_keys, args=args))
        return await self._changed_entry(outcome, ticket)

    async def journal_discard(self, ticket: str, detail: str, now: float) -> JournalEntry | None:
        args = [ticket, detail, repr(now), repr(self._clock())]
        outcome = await self._call(lambda: self._discard(keys=self._journal_keys, args=args))
        return await self._changed_entry(outcome, ticket)

    async def _changed_entry(self, outcome: Any, ticket: str) -> JournalEntry | None:
        """The entry an ops script returned; None if it refused; KeyError if unknown."""
        if outcome == 0:
            if await self._spool.get(ticket) is not None:
                raise StoreUnavailable(f"journal entry {ticket} is not yet moved from the spool")
            raise KeyError(ticket)
        if outcome == -1:
            return None
        return _entries(outcome)[0]

    async def _build_index(self, mode: str) -> None:
        args: list[str | float] = [mode, repr(self._clock()), INDEX_MARGIN_S]
        await self._call(lambda: self._index(keys=self._journal_keys, args=args))

    # Documents.

    async def doc_put(self, kind: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        name, index = self._doc_names(kind, key)

        async def put() -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                if ttl_s is None:
                    pipe.set(name, value)
                else:
                    pipe.set(name, value, px=max(1, math.ceil(ttl_s * 1000)))
                pipe.sadd(index, key)
                pipe.sadd(self._doc_kinds, _escaped(kind))
                await pipe.execute()

        await self._call(put)

    async def doc_get(self, kind: str, key: str) -> bytes | None:
        name, _ = self._doc_names(kind, key)
        return cast(bytes | None, await self._call(lambda: self._redis().get(name)))

    async def doc_list(self, kind: str) -> dict[str, bytes]:
        *rows, _ = await self._prune_docs(_escaped(kind))
        return {_text(key): value for key, value in _batched(rows, 2)}

    async def doc_delete(self, kind: str, key: str) -> None:
        name, index = self._doc_names(kind, key)

        async def delete() -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                pipe.delete(name)
                pipe.srem(index, key)
                await pipe.execute()

        await self._call(delete)

    async def _prune_docs(self, kind: str) -> list[Any]:
        """Run the documents script for one kind, or '*' for all."""
        args = [f"{self.namespace}:docs:", f"{self.namespace}:doc:", kind]
        rows: list[Any] = await self._call(lambda: self._docs(keys=[self._doc_kinds], args=args))
        return rows

    def _doc_names(self, kind: str, key: str) -> tuple[str, str]:
        """The document's key and its kind's index set."""
        kind = _escaped(kind)
        return f"{self.namespace}:doc:{kind}:{key}", f"{self.namespace}:docs:{kind}"

    # Audit and retention.

    async def audit_append(self, record: AuditRecord) -> None:
        args: list[str | bytes] = [repr(record.at), record.to_json()]
        await self._call(lambda: self._audit_append(keys=[self._audit, self._audit_seq], args=args))

    async def audit_list(self, limit: int = 100) -> list[AuditRecord]:
        if limit <= 0:
            return []
        raw = cast(
            list[bytes],
            await self._call(lambda: self._redis().zrevrange(self._audit, 0, limit - 1)),
        )
        return [AuditRecord.from_json(member[AUDIT_SEQ_WIDTH:]) for member in raw]

    async def trim(
        self, now: float, audit_keep_s: float, journal_keep_s: float, verdict_keep_s: float
    ) -> int:
        keys = [*self._journal_keys, self._audit, *self._cache_sizes]
        args = [repr(now - journal_keep_s), repr(now - audit_keep_s), repr(now)]
        removed: int = await self._call(lambda: self._trim(keys=keys, args=args))
        await self._build_index("trim")
        removed += int((await self._prune_docs("*"))[-1])
        stale = [
            f"{v.endpoint}|{v.replica}"
            for v in await self.load_verdicts()
            if v.at < now - verdict_keep_s
        ]
        if stale:
            removed += await self._call(lambda: self._redis().hdel(self._verdicts, *stale))
        return removed

    # Internals.

    def _redis(self) -> Redis:
        if self._client is None:
            raise StoreUnavailable("RedisStore is not open")
        return self._client

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within the op timeout; any failure is StoreUnavailable."""
        task = asyncio.current_task()
        cancellations = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self._op_timeout_s):
                result = await operation()
        except (RedisError, OSError, TimeoutError) as exc:
            if task is not None and task.cancelling() > cancellations:
                # redis-py turned our cancellation into an error (seen while a Sentinel
                # refused a connection); re-raise it, or close() would wait forever.
                raise asyncio.CancelledError() from exc
            self._mark(False, exc)
            raise StoreUnavailable(f"redis {self.url}: {type(exc).__name__}: {exc}") from exc
        self._mark(True)
        return result

    def _mark(self, reachable: bool, error: BaseException | None = None) -> None:
        self.reachable = reachable
        if reachable:
            self._back.set()
        else:
            self._back.clear()
            self.last_error = f"{type(error).__name__}: {error}"[:200]

    async def _announce(self, write: Callable[[Any], Any]) -> None:
        async def run() -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                write(pipe)
                pipe.publish(self._channel, b"1")
                await pipe.execute()

        await self._call(run)

    async def _append_to(self, client: Any, entry: JournalEntry) -> int:
        """Run the append script on ``client`` (the Redis client or a pipeline)."""
        data = replace(entry, state="accepted", detail="", seq=0).to_json()
        args: list[str | bytes] = [
            entry.ticket,
            data,
            entry.state,
            entry.detail,
            _group(entry.state),
            entry.queue,
        ]
        seq: int = await self._append(keys=self._journal_keys, args=args, client=client)
        return seq

    async def _subscribe(self) -> PubSub:
        """Subscribe to the changes channel; returns once Redis confirmed it."""
        pubsub = self._redis().pubsub()

        async def subscribe() -> None:
            await pubsub.subscribe(self._channel)
            confirmed = await pubsub.get_message(timeout=self._op_timeout_s)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise TimeoutError("no subscribe confirmation")

        try:
            await self._call(subscribe)
        except BaseException:
            await _close(pubsub)
            raise
        return pubsub

    async def _watch(self) -> None:
        """Keep the subscription alive; after each new one, report a (possibly missed) change."""
        delay = RECONNECT_MIN_S
        while True:
            if self._pubsub is None:
                try:
                    self._pubsub = await self._subscribe()
                except StoreUnavailable:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                delay = RECONNECT_MIN_S
                self._changed.set()
            try:
                await self._listen(self._pubsub)
            except Exception as exc:  # the link is lost; whatever broke, subscribe again
                self._mark(False, exc)
                await _close(self._pubsub)
                self._pubsub = None

    async def _listen(self, pubsub: PubSub) -> None:
        """Set the change event on each announcement; raise when the link is lost."""
        ping_sent: float | None = None
        while True:
            wait = self._op_timeout_s if ping_sent is not None else PUBSUB_PING_S
            message = await pubsub.get_message(timeout=wait)
            if message is None:
                if ping_sent is not None:
                    raise TimeoutError("no answer to PING on the change subscription")
                async with asyncio.timeout(self._op_timeout_s):
                    await pubsub.ping()
                ping_sent = time.monotonic()
                continue
            ping_sent = None
            if message["type"] == "message":
                self._changed.set()

    async def _drain_forever(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            if not self._spool.count:
                self._spool_waiting.clear()
                await self._spool_waiting.wait()
                continue
            try:
                await self._drain_batch()
            except Exception as exc:  # Redis or the spool failed; the rows stay, try again
                self.last_error = f"drain: {type(exc).__name__}: {exc}"[:200]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._back.wait()
                delay = min(delay * 2, RECONNECT_MAX_S)
            else:
                delay = RECONNECT_MIN_S

    async def _drain_batch(self) -> None:
        """Move the oldest spooled entries to Redis, in order; a ticket Redis already has
        was moved before (the row outlived its move) and is only dropped from the spool."""
        rows = await self._spool.head(DRAIN_BATCH)

        async def push() -> None:
            async with self._redis().pipeline(transaction=False) as pipe:
                for _, entry in rows:
                    await self._append_to(pipe, entry)
                await pipe.execute()

        await self._call(push)
        await self._spool.remove([row_id for row_id, _ in rows])
        if not self._spool.count:
            log.info("journal_spool_drained", spool=str(self._spool.path))


async def _close(pubsub: PubSub) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call]


def _batched(rows: list[Any], size: int) -> list[list[Any]]:
    """A flat script reply as its records (itertools.batched is Python 3.12)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _group(state: str) -> str:
    """How the journal scripts are told which sets an entry in ``state`` belongs in."""
    if state in OPEN_STATES:
        return "open"
    return "dead" if state in DEAD else "finished"


def _escaped(kind: str) -> str:
    """A document kind as a key segment: no ``:`` in it, so (kind, key) pairs never meet."""
    return kind.replace("%", "%25").replace(":", "%3A")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(rows: list[bytes | None]) -> list[JournalEntry]:
    """Decode the flat (data, seq, state, detail)* reply of the journal scripts."""
    entries = []
    for i in range(0, len(rows), 4):
        data, seq, state, detail = rows[i : i + 4]
        assert data is not None and seq is not None and state is not None
        entry = JournalEntry.from_json(data)
        entries.append(
            replace(entry, seq=int(seq), state=_text(state), detail=_text(detail or b""))  # type: ignore[arg-type]
        )
    return entries
