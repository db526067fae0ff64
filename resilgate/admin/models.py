"""What the admin API takes and answers: pydantic models, which the OpenAPI document is built
from, so the document and the validation cannot disagree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from resilgate.drills import MAX_DRILL_S, DrillView

Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        pattern=r"\S",
        description="Why (kept in the audit log with the token's name).",
    ),
]
ModeChoice = Literal["auto", "primary", "dr", "fallback", "maintenance"]
MAX_EXPIRY_S = 30 * 86400  # a forced mode that should outlast a month is a config change


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(_Model):
    """Every error answer of the admin API."""

    error: str = Field(description="Machine-readable code, e.g. `unauthorized`, `not_found`.")
    detail: str = Field(description="What was wrong, for a person.")


class Alive(_Model):
    """`/healthz`: the process answers."""

    status: Literal["alive"]
    replica: str = Field(description="This worker: host/pid.")


class Ready(_Model):
    """`/readyz`: whether this worker takes traffic."""

    ready: bool
    reason: str = Field(description="Why not, or `ok`.")


# -- modes ------------------------------------------------------------------------------------


class ModeChange(_Model):
    """Body of `PUT /modes/{target}`."""

    mode: ModeChoice = Field(
        description="`primary` or `dr` pins the site, `fallback` answers from the fallback, "
        "`maintenance` closes the target (fences an endpoint); `auto` gives the decision back "
        "to the breakers."
    )
    reason: Reason
    expires_in_s: float | None = Field(
        None,
        gt=0,
        le=MAX_EXPIRY_S,
        description="Seconds until the mode ends by itself (auto again); at most 30 days.",
    )


class ModeView(_Model):
    """The mode of one target: forced by ops (who, why, until when), or `auto`."""

    target: str
    mode: ModeChoice
    reason: str | None = None
    actor: str | None = Field(None, description="Token name (or `drill:<id>`) that set it.")
    set_at: float | None = Field(None, description="Unix time it was set.")
    expires_at: float | None = Field(None, description="Unix time it ends; null: until cleared.")


class ModeList(_Model):
    """Every forced mode in force."""

    modes: list[ModeView]


# -- audit ------------------------------------------------------------------------------------


class AuditView(_Model):
    """One change: who, what, when and why."""

    at: float
    actor: str
    action: str = Field(
        description="`mode.set`, `mode.clear`, `mode.expired`, `journal.retry`, ..."
    )
    target: str
    reason: str
    detail: str


class AuditList(_Model):
    """Newest first."""

    records: list[AuditView]


# -- journal ----------------------------------------------------------------------------------


class JournalItem(_Model):
    """A journaled write, self-pay claim or local registration (never its body)."""

    ticket: str
    queue: str
    route: str
    state: str = Field(
        description="`accepted`, `replaying`, `applied`, `duplicate`, `conflict`, `failed` "
        "or `discarded`."
    )
    accepted_at: float
    detail: Any = Field(None, description="The upstream's last answer or the replay's progress.")


class QueueView(_Model):
    """How far behind one journal queue is."""

    queue: str
    open: int
    oldest_age_s: float | None
    dead: int


class JournalList(_Model):
    """Entries in acceptance order, and every queue's depth."""

    entries: list[JournalItem]
    queues: list[QueueView]


class ReasonBody(_Model):
    """Body of a journal retry or discard."""

    reason: Reason


# -- drills -----------------------------------------------------------------------------------


class DrillRequest(_Model):
    """Body of `POST /drills`."""

    target: str = Field(min_length=1, max_length=200, description="A route or upstream name.")
    mode: Literal["fallback", "maintenance", "dr"] = Field(description="The mode to rehearse.")
    duration_s: float = Field(
        gt=0, le=MAX_DRILL_S, description="How long (at most a day); then it is lifted by itself."
    )
    reason: Reason


# -- status -----------------------------------------------------------------------------------


class IncidentView(_Model):
    """The incident level of the emergency plan, from recent core traffic."""

    level: int = Field(ge=0, le=3, description="1 (worst) .. 3; 0: nothing degraded.")
    share: float = Field(description="Weighted share of recent requests failed or degraded.")
    requests: float = Field(description="Weighted requests in the window.")
    since: float | None = Field(description="Unix time the level was entered.")


class StoreView(_Model):
    """The state store as this worker sees it."""

    backend: str
    healthy: bool | None = Field(description="null until the first read.")
    error: str


class EndpointView(_Model):
    """One endpoint as this worker judges it, and its breaker at every replica."""

    label: str
    url: str
    priority: int
    read_only: bool
    down: str = Field(description="Why it is down, or empty.")
    breaker: str = Field(description="This worker's breaker: `closed`, `open`, `half_open`.")
    breaker_detail: str
    probes: str = Field(description="Probe verdict: `up`, `down`, `unknown`.")
    probe_detail: str
    share: float = Field(description="Share of traffic it may take now (failback ramp).")
    fenced: bool
    fleet: dict[str, str] = Field(description="Breaker state by replica, as published.")


class UpstreamView(_Model):
    """An upstream with its forced mode and endpoints."""

    name: str
    mode: ModeView
    endpoints: list[EndpointView]


class RouteView(_Model):
    """A route, its mode and whether its requests are degraded now."""

    name: str
    upstream: str
    criticality: str
    fallback: str | None
    mode: ModeChoice = Field(description="The mode in effect (the route's, else its upstream's).")
    forced_by: str | None = Field(description="Who forced it, when forced.")
    degraded: bool = Field(
        description="Answered by its fallback or not at all: forced fallback/maintenance, or "
        "no endpoint of its upstream can serve."
    )


class SelfPayView(_Model):
    """Self-pay claims waiting to be re-settled with the insurer."""

    pending: int
    oldest_age_s: float | None


class Status(_Model):
    """Everything ops look at first."""

    replica: str
    incident: IncidentView
    store: StoreView
    upstreams: list[UpstreamView]
    routes: list[RouteView]
    journal: list[QueueView] | None = Field(description="null when the store cannot be read.")
    self_pay: SelfPayView | None
    warnings: list[dict[str, Any]] = Field(description="Early warnings in force.")
    drills: list[str] = Field(description="Ids of drills running now.")


class DrillList(_Model):
    """Drills, newest first."""

    drills: list[DrillView]
