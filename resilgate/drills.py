"""Emergency drills: force a degraded mode on a target for a bounded time, restore it, report.

A drill is a document in the state store plus a :class:`ForcedMode` that expires by itself at
the drill's end, so the target is restored even if every worker dies mid-drill. Every worker
counts the target's traffic (``record``, synchronous, from the access log) and publishes its
tally; a drill's report is the sum of all workers' tallies. Once finished, the drill moves to
another kind of document with its final report and a time to live (the audit retention), and
its tallies go: every worker lists the unfinished drills twice a second, and only those.

A request belongs to a drill when it *started* within ``[started_at, ends_at)``: the mode gate
decided it then. So an answer still in flight at the end is counted (the drill degraded it),
and a request that started after the end is not (the forced mode had expired for it).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, TypeVar, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resilgate.config import Config
from resilgate.logs import get_logger
from resilgate.outcomes import RequestOutcome
from resilgate.state.records import AuditRecord, ForcedMode
from resilgate.state.store import StateStore, StoreUnavailable

log = get_logger("resilgate.drills")

DrillMode = Literal["fallback", "maintenance", "dr"]
DrillState = Literal["running", "restoring", "finished"]
DRILL_KIND = "drill"  # drills not finished yet
FINISHED_KIND = "drill-finished"  # with their report, for the audit retention
TALLY_KIND = "drill-tally"  # key: <drill id>/<replica>
DRILL_ACTOR = "drill:"  # how a drill's forced mode is told from an operator's
TICK_S = 0.5
# Outcomes are kept this long, so a worker that learns of a drill a tick late (the forced mode
# may reach it first) still counts the drill's first requests.
BUFFER_S = 5.0
BUFFER_MAX = 50_000
# The finisher waits this long after the restore grace, so every worker has published its last
# counts before the report goes into the audit log.
SETTLE_S = 2 * TICK_S
END_LEASE_S = 10.0
FINISHER = "resilgate"
MAX_DRILL_S = 86400.0  # a drill is a rehearsal, not a way to leave a mode forced for days


class InvalidDrill(ValueError):
    """The drill is not one that can be asked for: unknown mode, duration out of bounds."""


class UnknownDrillTarget(InvalidDrill):
    """No route or upstream has the drill's target name (HTTP 404)."""


class DrillRefused(Exception):
    """The target cannot take the drill now: a mode is forced on it, ops forced one on its
    upstream, routes or endpoints, another drill on it is not finished, or a ``dr`` drill on a
    target with no DR site (HTTP 409)."""


def is_drill_mode(mode: ForcedMode) -> bool:
    """Whether a drill forced ``mode`` (its runner lifts it), rather than an operator."""
    return mode.actor.startswith(DRILL_ACTOR)


def mode_in_the_way(
    target: str, related: Iterable[str], modes: Mapping[str, ForcedMode], now: float
) -> ForcedMode | None:
    """The mode that refuses a drill on ``target`` at ``now``, or None: any active mode on the
    target itself, or an operator's on a ``related`` one (the drill would override or blur it)."""
    own = modes.get(target)
    if own is not None and own.active(now):
        return own
    for name in related:
        forced = modes.get(name)
        if forced is not None and forced.active(now) and not is_drill_mode(forced):
            return forced
    return None


def _refusal(target: str, forced: ForcedMode) -> str:
    where = "" if forced.target == target else f" (related to {target})"
    return (
        f"{forced.target}{where} is in {forced.mode} mode, forced by {forced.actor}:"
        f" {forced.reason}"
    )


class _Model(BaseModel):
    # Unknown fields are ignored: a newer replica may write more (rolling upgrade).
    model_config = ConfigDict(frozen=True)


class WorkerTally(_Model):
    """One worker's counts for one drill. Cumulative, so a flush sent twice counts once."""

    replica: str
    requests: int = 0
    served_live: int = 0
    served_by: dict[str, int] = Field(default_factory=dict)
    fallback_serves: dict[str, int] = Field(default_factory=dict)
    client_errors: int = 0
    statuses: dict[str, int] = Field(default_factory=dict)
    first_drilled_at: float | None = None
    first_normal_after_end_at: float | None = None


class DrillReport(_Model):
    """What the drill's target served, summed over every worker that saw its traffic."""

    requests: int = Field(description="Requests to the target that started during the drill.")
    served_live: int = Field(description="Of those, answered by an endpoint.")
    served_by: dict[str, int] = Field(description="Live answers by endpoint, e.g. `his/dr`.")
    fallback_serves: dict[str, int] = Field(
        description="Answers by the fallback that gave them: `journal`, `notice`, ..."
    )
    client_errors: int = Field(description="Answers with a 5xx status (a notice is one).")
    statuses: dict[str, int] = Field(description="Answers by status class: `2xx`, ..., `5xx`.")
    switch_to_degraded_s: float | None = Field(
        description="From the start to the first answer in the drilled mode (not from the "
        "primary site in a `dr` drill, not from any site otherwise); null if none."
    )
    switch_back_s: float | None = Field(
        description="From the end to the first normal answer to a request started after it, "
        "within `drills.restore_grace_s`; null if none came."
    )
    workers: int = Field(description="Workers that saw requests to the target during the drill.")

    @classmethod
    def summed(cls, drill: DrillRecord, tallies: Iterable[WorkerTally]) -> DrillReport:
        served_by: Counter[str] = Counter()
        fallbacks: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        requests = live = errors = workers = 0
        drilled: list[float] = []
        back: list[float] = []
        for tally in tallies:
            requests += tally.requests
            live += tally.served_live
            errors += tally.client_errors
            served_by.update(tally.served_by)
            fallbacks.update(tally.fallback_serves)
            statuses.update(tally.statuses)
            workers += tally.requests > 0
            if tally.first_drilled_at is not None:
                drilled.append(tally.first_drilled_at)
            if tally.first_normal_after_end_at is not None:
                back.append(tally.first_normal_after_end_at)
        return cls(
            requests=requests,
            served_live=live,
            served_by=dict(sorted(served_by.items())),
            fallback_serves=dict(sorted(fallbacks.items())),
            client_errors=errors,
            statuses=dict(sorted(statuses.items())),
            switch_to_degraded_s=round(min(drilled) - drill.started_at, 3) if drilled else None,
            switch_back_s=round(min(back) - drill.ends_at, 3) if back else None,
            workers=workers,
        )


class DrillRecord(_Model):
    """A drill as kept in the state store."""

    id: str = Field(description="`D-` and 12 random hex digits.")
    target: str = Field(description="The route or upstream drilled.")
    mode: DrillMode = Field(description="The mode forced on it: `fallback`, `maintenance`, `dr`.")
    reason: str = Field(description="Why, as given when it was started.")
    actor: str = Field(description="Name of the token that started it.")
    started_at: float = Field(description="Unix time the drill started.")
    ends_at: float = Field(description="Unix time the forced mode ends by itself.")
    finished_at: float | None = Field(
        None, description="Unix time the drill was closed and reported; null before."
    )
    report: DrillReport | None = Field(None, description="The final report, once finished.")

    @property
    def mode_actor(self) -> str:
        """The ``actor`` of the drill's forced mode."""
        return f"{DRILL_ACTOR}{self.id}"

    def forced_mode(self) -> ForcedMode:
        """The drill's forced mode, exactly as stored (so it is lifted only if still its own)."""
        return ForcedMode(
            target=self.target,
            mode=self.mode,
            reason=f"drill {self.id}: {self.reason}",
            actor=self.mode_actor,
            set_at=self.started_at,
            expires_at=self.ends_at,
        )

    def state(self, now: float) -> DrillState:
        if self.finished_at is not None:
            return "finished"
        return "running" if now < self.ends_at else "restoring"


class DrillView(_Model):
    """A drill and its report (`POST /drills`, `GET /drills/{id}`)."""

    id: str = Field(description="`D-` and 12 random hex digits.")
    target: str = Field(description="The route or upstream drilled.")
    mode: DrillMode = Field(description="The mode forced on it.")
    reason: str = Field(description="Why, as given when it was started.")
    actor: str = Field(description="Name of the token that started it.")
    started_at: float = Field(description="Unix time the drill started.")
    ends_at: float = Field(description="Unix time the forced mode ends by itself.")
    state: DrillState = Field(
        description="`running` until `ends_at`, `restoring` while the report waits for live "
        "traffic, then `finished` (the mode is gone and `drill.end` is in the audit log)."
    )
    finished_at: float | None = Field(description="Unix time it finished; null before.")
    report: DrillReport

    @classmethod
    def of(cls, drill: DrillRecord, tallies: Iterable[WorkerTally], now: float) -> DrillView:
        """A finished drill shows the report it was finished with; others the tallies' sum."""
        report = drill.report if drill.report is not None else DrillReport.summed(drill, tallies)
        return cls(**drill.model_dump(exclude={"report"}), state=drill.state(now), report=report)


class _Tally:
    """This worker's counts for one drill, as requests end."""

    def __init__(
        self,
        drill: DrillRecord,
        replica: str,
        normal: Callable[[RequestOutcome], bool],
        grace_s: float,
    ) -> None:
        self.drill = drill
        self.replica = replica
        self.normal = normal  # an answer as if there were no drill
        self.grace_s = grace_s
        self.requests = self.served_live = self.client_errors = 0
        self.served_by: Counter[str] = Counter()
        self.fallback_serves: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.first_drilled_at: float | None = None
        self.first_normal_after_end_at: float | None = None
        self.changed = False  # since the last flush

    def __repr__(self) -> str:
        return (
            f"<_Tally {self.drill.id} {self.drill.target} {self.requests} requests, "
            f"{dict(self.fallback_serves)} fallback, {self.client_errors} 5xx>"
        )

    def add(self, outcome: RequestOutcome) -> None:
        began = outcome.at - outcome.duration_s
        drill = self.drill
        if drill.started_at <= began < drill.ends_at:
            self.requests += 1
            if outcome.served_by is not None:
                self.served_live += 1
                self.served_by[outcome.served_by] += 1
            if outcome.degraded:
                self.fallback_serves[outcome.degraded] += 1
            if outcome.status >= 500:
                self.client_errors += 1
            self.statuses[f"{outcome.status // 100}xx"] += 1
            if not self.normal(outcome) and _earlier(outcome.at, self.first_drilled_at):
                self.first_drilled_at = outcome.at
            self.changed = True
        elif (
            began >= drill.ends_at
            and outcome.at <= drill.ends_at + self.grace_s
            and self.normal(outcome)
            and _earlier(outcome.at, self.first_normal_after_end_at)
        ):
            self.first_normal_after_end_at = outcome.at
            self.changed = True

    def snapshot(self) -> WorkerTally:
        return WorkerTally(
            replica=self.replica,
            requests=self.requests,
            served_live=self.served_live,
            served_by=dict(self.served_by),
            fallback_serves=dict(self.fallback_serves),
            client_errors=self.client_errors,
            statuses=dict(self.statuses),
            first_drilled_at=self.first_drilled_at,
            first_normal_after_end_at=self.first_normal_after_end_at,
        )


def _earlier(at: float, first: float | None) -> bool:
    return first is None or at < first


def _normal_answer(mode: DrillMode, primaries: frozenset[str]) -> Callable[[RequestOutcome], bool]:
    """What the target answers outside the drill: from the primary site (a ``dr`` drill moves
    it off), or from any site (``fallback`` and ``maintenance`` take it off every site)."""
    if mode == "dr":
        return lambda outcome: outcome.served_by in primaries
    return lambda outcome: outcome.served_by is not None


_M = TypeVar("_M", bound=BaseModel)


def _parsed(model: type[_M], raw: bytes) -> _M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        log.warning("drill_document_unreadable", model=model.__name__)
        return None


class DrillRunner:
    """Starts drills, counts this worker's share of their traffic, and finishes them.

    ``record`` is called for every request this worker answers; ``run`` keeps the drills
    known, publishes the counts and finishes due drills, every ``TICK_S``; ``start``, ``view``
    and ``list`` serve the admin API. A store outage is logged once; counting goes on.
    """

    def __init__(
        self,
        config: Config,
        replica: str,
        store: Callable[[], StateStore | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.replica = replica
        self._store = store
        self._clock = clock
        self._grace_s = config.drills.restore_grace_s
        self._keep_s = config.state.audit_retention_days * 86400  # finished drills
        self._tallies: dict[str, _Tally] = {}  # by drill id: running or restoring
        self._by_target: dict[str, list[_Tally]] = {}
        self._recent: deque[RequestOutcome] = deque(maxlen=BUFFER_MAX)
        self._store_ok: bool | None = None
        # One flush at a time: two in flight could land out of order, leaving an older count.
        self._flushing = asyncio.Lock()

    def __repr__(self) -> str:
        now = self._clock()
        drills = ", ".join(
            f"{t.drill.id} {t.drill.mode} {t.drill.target} {t.drill.state(now)}"
            for t in self._tallies.values()
        )
        store = {None: "starting", True: "ok", False: "UNREACHABLE"}[self._store_ok]
        return f"<DrillRunner {self.replica} [{drills}] store {store}>"

    # -- the request path (synchronous, cheap) ------------------------------------------

    def record(self, outcome: RequestOutcome) -> None:
        """Count one request's outcome toward the drills on its route or upstream."""
        if outcome.route is None:
            return
        recent = self._recent
        recent.append(outcome)
        horizon = outcome.at - BUFFER_S
        while recent[0].at < horizon:
            recent.popleft()
        if self._by_target:
            for target in {outcome.route, outcome.upstream}:
                for tally in self._by_target.get(target or "", ()):
                    tally.add(outcome)

    def running_ids(self) -> list[str]:
        """Ids of the drills this worker knows to be running now."""
        now = self._clock()
        return [i for i, t in self._tallies.items() if t.drill.state(now) == "running"]

    # -- the admin API ----------------------------------------------------------------------

    async def start(
        self, target: str, mode: str, duration_s: float, reason: str, actor: str
    ) -> DrillView:
        """Force ``mode`` on ``target`` for ``duration_s`` and start counting.

        UnknownDrillTarget for a name that is no route or upstream; InvalidDrill for an unknown
        mode or a duration not in (0, MAX_DRILL_S]; DrillRefused if a mode is forced on the
        target, ops forced one on its upstream, routes or endpoints (see
        :func:`mode_in_the_way`), another drill on it is not finished, or ``dr`` has no DR site
        to move to; StoreUnavailable if the store cannot take it (what was written is undone as
        far as the store allows; a forced mode left over expires at the drill's end, a drill
        record left over is finished as usual).
        """
        drill_mode = self._checked(target, mode, duration_s)
        store = self._open_store()
        now = self._clock()
        # Refused early, with nothing written; put_mode_if_absent below is what makes the
        # target's own check atomic (the related targets' is not: a mode ops force on one of
        # them in the next instant is not seen).
        forced = mode_in_the_way(target, self._related(target), await store.load_modes(), now)
        if forced is not None:
            raise DrillRefused(_refusal(target, forced))
        drill = DrillRecord(
            id=f"D-{secrets.token_hex(6)}",
            target=target,
            mode=drill_mode,
            reason=reason,
            actor=actor,
            started_at=now,
            ends_at=now + duration_s,
        )
        # One drill per target at a time, fleet-wide, until it is finished.
        ttl_s = duration_s + self._grace_s + SETTLE_S + END_LEASE_S
        if not await store.lease(_target_lease(target), drill.id, ttl_s, now):
            raise DrillRefused(f"another drill on {target} is not finished yet")
        try:
            blocked = await store.put_mode_if_absent(drill.forced_mode(), now)
            if blocked is not None:  # an operator's PUT landed since the check above
                raise DrillRefused(_refusal(target, blocked))
            await store.doc_put(DRILL_KIND, drill.id, drill.model_dump_json().encode())
            detail = {"drill": drill.id, "mode": drill_mode, "duration_s": duration_s}
            await store.audit_append(
                AuditRecord(
                    now, actor, "drill.start", target, reason, orjson.dumps(detail).decode()
                )
            )
        except Exception:
            await self._undo(store, drill)
            raise
        self._learn(drill)
        log.info(
            "drill_started",
            drill=drill.id,
            target=target,
            mode=drill_mode,
            actor=actor,
            duration_s=duration_s,
        )
        return DrillView.of(drill, [], now)

    async def view(self, drill_id: str) -> DrillView | None:
        """The drill with its report so far, or None; StoreUnavailable if unreadable."""
        store = self._open_store()
        await self._flush(store)
        # Unfinished first: a finisher writes the finished drill before it deletes that one.
        # While both are there (or a finisher stopped half-way), the finished one wins.
        unfinished = await store.doc_get(DRILL_KIND, drill_id)
        raw = await store.doc_get(FINISHED_KIND, drill_id) or unfinished
        drill = None if raw is None else _parsed(DrillRecord, raw)
        if drill is None:
            return None
        tallies = (
            _tallies_by_drill(await store.doc_list(TALLY_KIND)).get(drill_id, [])
            if drill.report is None
            else []
        )
        return DrillView.of(drill, tallies, self._clock())

    async def list(self, limit: int = 100) -> list[DrillView]:
        """The latest drills first, with their reports; StoreUnavailable if unreadable."""
        store = self._open_store()
        await self._flush(store)
        drills = await self._records(store, DRILL_KIND)
        # Over one being finished meanwhile, the finished record wins.
        drills.update(await self._records(store, FINISHED_KIND))
        known = sorted(drills.values(), key=lambda d: -d.started_at)[:limit]
        unfinished = any(d.report is None for d in known)  # finished ones carry their report
        tallies = _tallies_by_drill(await store.doc_list(TALLY_KIND)) if unfinished else {}
        now = self._clock()
        return [DrillView.of(d, tallies.get(d.id, []), now) for d in known]

    # -- the background task -------------------------------------------------------------

    async def run(self) -> None:
        """Every ``TICK_S`` until cancelled: one :meth:`tick`; a failure is logged once."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any store failure: count on, publish later
                self._mark(False, f"{type(exc).__name__}: {exc}"[:200])
            else:
                self._mark(True)
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        """Learn of new drills, publish this worker's counts, finish the drills that are due."""
        store = self._store()
        if store is None:
            return
        unfinished = await self._records(store, DRILL_KIND)
        current = {i: drill for i, drill in unfinished.items() if drill.finished_at is None}
        for drill in current.values():
            self._learn(drill)
        await self._flush(store)
        for gone in set(self._tallies) - set(current):
            self._forget(gone)  # finished: its last counts are published above
        now = self._clock()
        for tally in list(self._tallies.values()):
            if now >= tally.drill.ends_at + self._grace_s + SETTLE_S:
                await self._finish(store, tally.drill.id, now)

    # -- inside ---------------------------------------------------------------------------

    def _checked(self, target: str, mode: str, duration_s: float) -> DrillMode:
        config = self.config
        if target not in config.upstreams and all(r.name != target for r in config.routes):
            raise UnknownDrillTarget(f"no route or upstream named {target!r}")
        if mode not in get_args(DrillMode):
            raise InvalidDrill(f"a drill forces fallback, maintenance or dr, not {mode!r}")
        if not 0 < duration_s <= MAX_DRILL_S:
            raise InvalidDrill(
                f"a drill lasts more than 0 and at most {MAX_DRILL_S}s, not {duration_s}s"
            )
        upstream = config.upstreams[self._upstream_of(target)]
        if mode == "dr" and not any(e.priority > 0 for e in upstream.endpoints):
            raise DrillRefused(f"{target} has no DR endpoint (priority above 0) to move to")
        return mode  # type: ignore[return-value]  # checked against DrillMode above

    def _upstream_of(self, target: str) -> str:
        """The upstream of a route target; an upstream target is its own."""
        return next((r.upstream for r in self.config.routes if r.name == target), target)

    def _related(self, target: str) -> tuple[str, ...]:
        """Targets whose operator modes a drill on ``target`` would override (a route's own
        mode wins over its upstream's) or blur: a route's upstream; an upstream's routes;
        either's endpoints."""
        upstream = self._upstream_of(target)
        endpoints = [f"{upstream}/{e.name}" for e in self.config.upstreams[upstream].endpoints]
        if upstream != target:
            return (upstream, *endpoints)
        return (*(r.name for r in self.config.routes if r.upstream == upstream), *endpoints)

    async def _records(self, store: StateStore, kind: str) -> dict[str, DrillRecord]:
        """The readable drills of ``kind`` by id."""
        parsed = (_parsed(DrillRecord, raw) for raw in (await store.doc_list(kind)).values())
        return {drill.id: drill for drill in parsed if drill is not None}

    def _open_store(self) -> StateStore:
        store = self._store()
        if store is None:
            raise StoreUnavailable("the state store is not open yet")
        return store

    def _learn(self, drill: DrillRecord) -> None:
        """Start counting for ``drill`` (once), from the outcomes kept since it started."""
        if drill.id in self._tallies:
            return
        upstream = self._upstream_of(drill.target)
        # Another replica may run a newer config that names targets this one does not know.
        known = self.config.upstreams.get(upstream)
        endpoints = known.endpoints if known is not None else []
        primaries = frozenset(f"{upstream}/{e.name}" for e in endpoints if e.priority == 0)
        tally = _Tally(drill, self.replica, _normal_answer(drill.mode, primaries), self._grace_s)
        for outcome in self._recent:
            if drill.target in (outcome.route, outcome.upstream):
                tally.add(outcome)
        self._tallies[drill.id] = tally
        self._by_target.setdefault(drill.target, []).append(tally)
        log.info("drill_seen", drill=drill.id, target=drill.target, mode=drill.mode)

    def _forget(self, drill_id: str) -> None:
        tally = self._tallies.pop(drill_id)
        watching = self._by_target[tally.drill.target]
        watching.remove(tally)
        if not watching:
            del self._by_target[tally.drill.target]

    async def _flush(self, store: StateStore) -> None:
        """Publish this worker's changed tallies (whole, so a repeated flush is harmless)."""
        async with self._flushing:
            for tally in list(self._tallies.values()):
                if not tally.changed:
                    continue
                tally.changed = False
                value = tally.snapshot().model_dump_json().encode()
                # The finisher deletes tallies; one flushed just after it must not stay forever.
                due = tally.drill.ends_at + self._grace_s + SETTLE_S
                ttl_s = self._keep_s + max(0.0, due - self._clock())
                key = f"{tally.drill.id}/{self.replica}"
                try:
                    await store.doc_put(TALLY_KIND, key, value, ttl_s=ttl_s)
                except BaseException:
                    tally.changed = True
                    raise

    async def _finish(self, store: StateStore, drill_id: str, now: float) -> None:
        """Close the drill once, fleet-wide: lift its mode if still its own, audit the report,
        keep it with the report for the audit retention, and drop what was kept to count it."""
        lease = f"drill-end:{drill_id}"
        if not await store.lease(lease, self.replica, END_LEASE_S, now):
            return  # another worker is at it
        try:
            raw = await store.doc_get(DRILL_KIND, drill_id)
            drill = None if raw is None else _parsed(DrillRecord, raw)
            if drill is None:
                return
            docs = await store.doc_list(TALLY_KIND)
            tally_docs = {key: raw for key, raw in docs.items() if _drill_of(key) == drill_id}
            tally_keys = list(tally_docs)
            if await store.doc_get(FINISHED_KIND, drill_id) is not None:
                await self._clear(store, drill, tally_keys)  # a finisher stopped half-way
                return
            # Only the drill's exact mode: ops may have changed it meanwhile.
            lifted = await store.delete_mode_if(drill.forced_mode())
            tallies = _tallies_by_drill(tally_docs).get(drill_id, [])
            report = DrillReport.summed(drill, tallies)
            detail = {"drill": drill_id, "mode": drill.mode, "report": report.model_dump()}
            # Audited before it is marked finished: a retry may audit twice, never not at all.
            summary = orjson.dumps(detail).decode()
            await store.audit_append(
                AuditRecord(now, FINISHER, "drill.end", drill.target, drill.reason, summary)
            )
            finished = drill.model_copy(update={"finished_at": now, "report": report})
            value = finished.model_dump_json().encode()
            await store.doc_put(FINISHED_KIND, drill_id, value, ttl_s=self._keep_s)
            await self._clear(store, drill, tally_keys)
            log.info(
                "drill_finished",
                drill=drill_id,
                target=drill.target,
                mode_lifted=lifted,
                requests=report.requests,
                fallback_serves=report.fallback_serves,
                client_errors=report.client_errors,
                switch_to_degraded_s=report.switch_to_degraded_s,
                switch_back_s=report.switch_back_s,
            )
        finally:
            await store.release(lease, self.replica)

    async def _clear(
        self, store: StateStore, drill: DrillRecord, tally_keys: Iterable[str]
    ) -> None:
        """After the finished drill is written: its unfinished record, tallies and lease go."""
        await store.doc_delete(DRILL_KIND, drill.id)
        for key in tally_keys:
            await store.doc_delete(TALLY_KIND, key)
        await store.release(_target_lease(drill.target), drill.id)

    async def _undo(self, store: StateStore, drill: DrillRecord) -> None:
        """Best effort after a failed start; what stays behind ends by itself."""
        try:
            await store.delete_mode_if(drill.forced_mode())
            await store.doc_delete(DRILL_KIND, drill.id)
            await store.release(_target_lease(drill.target), drill.id)
        except Exception as exc:
            log.warning(
                "drill_start_undo_failed", drill=drill.id, error=f"{type(exc).__name__}: {exc}"
            )

    def _mark(self, ok: bool, error: str = "") -> None:
        if ok == self._store_ok:
            return
        if ok:
            if self._store_ok is False:
                log.info("drill_store_ok")
        else:
            log.warning("drill_store_unreachable", error=error, note="drills keep counting")
        self._store_ok = ok


def _target_lease(target: str) -> str:
    return f"drill-target:{target}"


def _drill_of(tally_key: str) -> str:
    return tally_key.split("/", 1)[0]


def _tallies_by_drill(docs: dict[str, bytes]) -> dict[str, list[WorkerTally]]:
    found: dict[str, list[WorkerTally]] = {}
    for key, raw in docs.items():
        tally = _parsed(WorkerTally, raw)
        if tally is not None:
            found.setdefault(_drill_of(key), []).append(tally)
    return found
