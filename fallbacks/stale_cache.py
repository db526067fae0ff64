"""``stale-cache``: HIS reads are down: earlier reads, encrypted and per caller, served stale.

Every live ``200`` to a GET of a route with this fallback is kept, sealed (AES-256-GCM, see
:mod:`resilgate.sealing`), under a store key that only holders of the cache key can compute
from the route, the path and query, and the caller (:mod:`resilgate.identity`): the store sees
neither a patient nor a user. When no endpoint can answer, the same caller's copy is served,
marked with its ``Age``, if it is not older than ``max_staleness_s``; anyone else gets the
notice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiohttp import web

from resilgate.config import Route
from resilgate.errors import StartupError
from resilgate.fallback import Fallback, FallbackRequest, FallbackServices, degraded
from resilgate.identity import Caller, caller_of
from resilgate.logs import get_logger
from resilgate.sealing import Keyring, KeyringError, Unsealable, load_keyring

log = get_logger("fallbacks.stale_cache")

FETCHED_AT = "X-Resilgate-Fetched-At"
_KEPT_HEADERS = ("Content-Type", "Content-Encoding")


@dataclass(frozen=True, slots=True)
class CachedCopy:
    """A live answer as kept: status, the headers needed to replay it, when, and the body."""

    status: int
    headers: Mapping[str, str]
    fetched_at: float
    body: bytes

    def __repr__(self) -> str:
        return f"<CachedCopy {self.status} {len(self.body)} bytes at {self.fetched_at:.0f}>"

    def encode(self) -> bytes:
        meta = {"status": self.status, "headers": dict(self.headers), "at": self.fetched_at}
        return orjson.dumps(meta) + b"\n" + self.body  # orjson writes no line breaks

    @classmethod
    def decode(cls, raw: bytes) -> CachedCopy:
        """ValueError when ``raw`` is not what :meth:`encode` wrote."""
        meta_raw, newline, body = raw.partition(b"\n")
        meta = orjson.loads(meta_raw)
        if not newline or not isinstance(meta, dict):
            raise ValueError("not a cached copy")
        status, headers, at = meta.get("status"), meta.get("headers"), meta.get("at")
        if not isinstance(status, int) or not isinstance(at, int | float):
            raise ValueError("not a cached copy")
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("not a cached copy")
        return cls(status, headers, float(at), body)

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.fetched_at)


def copy_label(route: str, raw_path: str, caller: Caller) -> bytes:
    """What a copy is kept for: one route, one path and query as sent, one caller."""
    parts = (route.encode(), raw_path.encode(), caller.scope)
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def store_keys(keyring: Keyring, label: bytes) -> tuple[str, ...]:
    """The store keys a copy for ``label`` may be under: the sealing key's first."""
    return tuple(f"stale-cache:{name}" for name in keyring.index_names(label))


def keep_for_s(max_staleness_s: float, caller: Caller, now: float) -> float:
    """How long the store keeps a copy: until it is too old, or its caller's token expires."""
    if caller.expires_at is None:
        return max_staleness_s
    return min(max_staleness_s, caller.expires_at - now)


def stale_headers(copy: CachedCopy, now: float) -> dict[str, str]:
    """The headers of a stale answer: the kept ones, ``Age`` and when it was fetched."""
    headers = {name: copy.headers[name] for name in _KEPT_HEADERS if name in copy.headers}
    headers["Age"] = str(math.floor(copy.age_s(now)))
    fetched = datetime.fromtimestamp(copy.fetched_at, UTC)
    headers[FETCHED_AT] = fetched.isoformat(timespec="seconds").replace("+00:00", "Z")
    return headers


class StaleCache(Fallback):
    """Keeps live GET answers per caller, sealed; serves them stale when no endpoint can.

    Without a cache key it keeps nothing (and says so once at start); with an unusable one
    the gateway does not start.
    """

    name = "stale-cache"

    def __init__(self, services: FallbackServices) -> None:
        super().__init__(services)
        self.options = services.config.fallbacks.stale_cache
        keys_file = self.options.keys_file
        try:
            self.keyring = load_keyring(
                self.options.keys_env,
                services.config.resolve(keys_file) if keys_file is not None else None,
            )
        except KeyringError as exc:
            raise StartupError(f"fallbacks.stale_cache: {exc}") from None

    def __repr__(self) -> str:
        return f"<StaleCache {self.keyring!r}>" if self.keyring else "<StaleCache off (no key)>"

    async def start(self) -> None:
        if self.keyring is None:
            log.warning(
                "stale_cache_off",
                reason=f"no cache key (environment variable {self.options.keys_env} or "
                "fallbacks.stale_cache.keys_file): nothing is cached, outages get the notice",
            )

    def observes(self, route: Route, method: str) -> bool:
        return method == "GET" and self.keyring is not None

    async def observe(
        self, request: FallbackRequest, status: int, headers: Mapping[str, str], body: bytes
    ) -> None:
        if self.keyring is None or request.method != "GET" or status != 200:
            return
        if len(body) > self.options.max_entry_bytes:
            return
        now = self.services.clock()
        caller = caller_of(request.headers, self.options.identity_header, now)
        if caller is None:
            return
        keep_s = keep_for_s(self.options.max_staleness_s, caller, now)
        if keep_s <= 0:
            return
        kept = {name: headers[name] for name in _KEPT_HEADERS if name in headers}
        copy = CachedCopy(status, kept, now, body)
        key = store_keys(self.keyring, copy_label(request.route.name, request.raw_path, caller))[0]
        sealed = self.keyring.seal(copy.encode(), key.encode())
        # Over the total bound, the store evicts the copies nearest to expiry.
        await self.services.store.cache_put(key, sealed, keep_s, self.options.max_total_bytes)

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        if self.keyring is None or request.method != "GET":
            return None
        now = self.services.clock()
        caller = caller_of(request.headers, self.options.identity_header, now)
        if caller is None:
            reason = "no identity"
        elif (copy := await self._find(request, caller)) is None:
            reason = "no copy"
        elif copy.age_s(now) > self.options.max_staleness_s:
            reason = "too old"
        else:
            headers = stale_headers(copy, now)
            return degraded(self.name, copy.status, copy.body, request.request_id, headers)
        log.info(
            "stale_cache_declined",
            route=request.route.name,
            request_id=request.request_id,
            reason=reason,
        )
        return None

    async def _find(self, request: FallbackRequest, caller: Caller) -> CachedCopy | None:
        """The caller's copy, under whichever key sealed it; None if none opens (a copy that
        does not open is logged: a key was removed too early, or the store was tampered with)."""
        assert self.keyring is not None
        label = copy_label(request.route.name, request.raw_path, caller)
        for key in store_keys(self.keyring, label):
            sealed = await self.services.store.cache_get(key)
            if sealed is None:
                continue
            try:
                return CachedCopy.decode(self.keyring.open(sealed, key.encode()))
            except Unsealable as exc:
                reason = exc.reason
            except ValueError:
                reason = "malformed"
            log.warning(
                "stale_cache_unreadable",
                route=request.route.name,
                request_id=request.request_id,
                reason=reason,
            )
        return None
