"""The configuration: a declared schema, validated once, then frozen.

One main YAML file (listeners, workers, state, upstreams) includes the hospital's route tables
(``routes/*.yaml``). Every problem is reported as ``file:line: field: reason``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    UrlConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
UpstreamUrl = Annotated[AnyHttpUrl, UrlConstraints(allowed_schemes=["http", "https"])]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listener(_Model):
    """An address the gateway listens on."""

    host: str = Field("127.0.0.1", description="Address to bind; `0.0.0.0` for all IPv4.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free port.")


class Listeners(_Model):
    """The gateway's listeners."""

    public: Listener = Field(
        default_factory=Listener,
        description="Where clients (HIS workstations, kiosks, the patient app) connect.",
    )
    admin: Listener = Field(
        default_factory=lambda: Listener(host="127.0.0.1", port=9090),
        description="The admin API (status, modes, journal, drills, metrics): never the public "
        "address; keep it on a management network.",
    )

    @model_validator(mode="after")
    def _apart(self) -> Listeners:
        # Workers bind with SO_REUSEPORT: the same address for both would split connections
        # between the public and the admin application without any error.
        public, admin = self.public, self.admin
        wildcard = {"0.0.0.0", "::", ""}
        overlap = public.host == admin.host or public.host in wildcard or admin.host in wildcard
        if public.port == admin.port and public.port != 0 and overlap:
            raise ValueError(
                f"admin ({admin.host}:{admin.port}) and public ({public.host}:{public.port}) "
                "listeners overlap: the admin API must have its own port"
            )
        return self


class RedisSentinel(_Model):
    """Redis behind Sentinel: the sentinels name the current master, and after a failover the
    gateway's connections follow the new one."""

    hosts: list[str] = Field(min_length=1, description="Sentinels as `host:port`.")
    master: str = Field(
        min_length=1, description="The master's name in the sentinels' `sentinel monitor` line."
    )
    db: int = Field(0, ge=0, description="Redis database number.")
    password_env: str = Field(
        "RESILGATE_SENTINEL_PASSWORD",
        description="Environment variable with the sentinels' own password (their "
        "`requirepass`); unset or empty: none.",
    )

    @field_validator("hosts")
    @classmethod
    def _host_port(cls, hosts: list[str]) -> list[str]:
        for value in hosts:
            host, sep, port = value.rpartition(":")
            if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port (e.g. sentinel-0.redis:26379)")
        return hosts


class StateConfig(_Model):
    """Where shared state lives: modes, breaker verdicts, counters, cache, journal, audit."""

    backend: Literal["sqlite", "redis", "memory"] = Field(
        "sqlite",
        description="`sqlite`: embedded default, one node; `redis`: many replicas; "
        "`memory`: unit tests only (nothing shared or kept).",
    )
    path: Path = Field(
        Path("var/resilgate.db"),
        description="SQLite file, relative to the main config file's directory.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (`redis://`, `rediss://` or `unix://`); redis needs this or "
        "`redis_sentinel`.",
    )
    redis_sentinel: RedisSentinel | None = Field(
        None, description="Find the Redis master through Sentinel instead of `redis_url`."
    )
    redis_password_env: str = Field(
        "RESILGATE_REDIS_PASSWORD",
        description="Environment variable with the Redis password (kept out of this file and "
        "the URL); unset or empty: the URL's, if any.",
    )
    spool_path: Path = Field(
        Path("var/journal-spool.db"),
        description="Local SQLite file for journal entries while Redis is unreachable.",
    )
    op_timeout_s: float = Field(
        0.5, gt=0, description="A Redis operation slower than this counts as the store down."
    )
    refresh_s: float = Field(
        1.0, gt=0, description="Longest time between two reads of modes and verdicts."
    )
    audit_retention_days: float = Field(400, gt=0, description="How long audit records are kept.")
    journal_retention_days: float = Field(
        30, gt=0, description="How long finished journal entries are kept (unfinished: always)."
    )
    verdict_retention_s: float = Field(
        86400,
        gt=0,
        description="Breaker verdicts not updated for this long are dropped (replicas that left).",
    )
    trim_interval_s: float = Field(3600, gt=0, description="How often expired records are removed.")

    @model_validator(mode="after")
    def _redis_has_url(self) -> StateConfig:
        if self.backend == "redis" and (self.redis_url is None) == (self.redis_sentinel is None):
            raise ValueError("backend redis needs one of redis_url and redis_sentinel")
        return self


class Endpoint(_Model):
    """One site serving an upstream: the primary data center or a DR site."""

    name: Name = Field(description="Endpoint name, e.g. `primary`, `dr`, `remote-dr`.")
    url: UpstreamUrl = Field(description="Base URL; the client's path is appended to it.")
    priority: int = Field(
        ge=0, le=9, description="0 primary, 1 same-city DR, 2 remote DR; lowest serves first."
    )
    read_only: bool = Field(False, description="A read-only replica that must not take writes.")

    @field_validator("url")
    @classmethod
    def _no_query(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.query or url.fragment:
            raise ValueError("an endpoint URL takes no query or fragment")
        return url


class FailureBody(_Model):
    """How a failure of the upstream is read from an answer's body (DOMAIN.md sections 3, 7)."""

    format: Literal["insurance_envelope", "fhir"] = Field(
        description='`insurance_envelope`: `infcode` other than "0" whose `err_msg` names a '
        "platform error; `fhir`: an `OperationOutcome` with an error of a transient kind "
        "(exception, timeout, throttled, lock-error, no-store, incomplete)."
    )
    platform_error_markers: list[str] = Field(
        default_factory=lambda: [
            "系统异常",
            "系统繁忙",
            "服务繁忙",
            "服务不可用",
            "超时",
            "数据库",
            "platform error",
            "system error",
            "timed out",
            "unavailable",
        ],
        description="Texts in `err_msg` that mark a platform error; any other `infcode` is a "
        "business answer (not insured, suspended, bad input) and not a failure.",
    )


FailureStatus = Annotated[int, Field(ge=500, le=599)]


class Breaker(_Model):
    """When an endpoint's circuit breaker opens, how long it stays open, how it closes again."""

    failure_statuses: list[FailureStatus] = Field(
        default_factory=lambda: [500, 502, 503, 504],
        description="Answer statuses that count as a failure of the endpoint (5xx only: a 4xx "
        "is the client's problem). Connection errors and timeouts always count.",
    )
    consecutive_failures: int = Field(
        5, ge=1, description="Open after this many failures in a row."
    )
    window_s: float = Field(
        10.0, gt=0, le=300, description="Sliding window for the failure and slow-call rates."
    )
    min_calls: int = Field(
        20, ge=1, description="Calls the window must hold before a rate can open the breaker."
    )
    failure_rate: float = Field(
        0.5, gt=0, le=1, description="Open when this share of the window's calls failed."
    )
    slow_call_s: float = Field(
        5.0, gt=0, description="A call slower than this (to the answer's headers) is slow."
    )
    slow_call_rate: float = Field(
        0.8, gt=0, le=1, description="Open when this share of the window's calls was slow."
    )
    open_s: float = Field(5.0, gt=0, description="Time the breaker stays open the first time.")
    max_open_s: float = Field(
        120.0, gt=0, description="Cap of the open time, which doubles on each repeated opening."
    )
    open_jitter: float = Field(
        0.2, ge=0, lt=1, description="Random share added to or taken from each open time."
    )
    half_open_trials: int = Field(
        2, ge=1, description="Trial requests let through at a time while half-open."
    )
    close_after: int = Field(
        3, ge=1, description="Successful trials in a row that close the breaker again."
    )
    quorum: int = Field(
        2,
        ge=1,
        description="Replicas whose breaker must be open before a replica that sees no "
        "failures itself stops using the endpoint (its own breaker still decides on its own).",
    )
    verdict_fresh_s: float = Field(
        120.0, gt=0, description="A replica's open verdict older than this no longer counts."
    )

    @model_validator(mode="after")
    def _open_cap(self) -> Breaker:
        if self.max_open_s < self.open_s:
            raise ValueError("max_open_s must be at least open_s")
        return self


class HttpCheck(_Model):
    """An active HTTP check of an endpoint."""

    method: HttpMethod = Field("GET", description="Request method.")
    path: str = Field("/health", pattern=r"^/", description="Path on the endpoint.")
    expect_status: int = Field(200, ge=100, le=599, description="Status of a passing check.")
    interval_s: float = Field(2.0, gt=0, description="Time between two checks.")
    timeout_s: float = Field(1.0, gt=0, description="A check slower than this fails.")
    rise: int = Field(2, ge=1, description="Passing checks in a row that mark the endpoint up.")
    fall: int = Field(3, ge=1, description="Failing checks in a row that mark it down.")


class SyntheticCheck(HttpCheck):
    """A transaction acting like a test patient, e.g. reading `Patient/test-0001`.

    In `body`, `{msgid_time}` becomes the time as `yyyyMMddHHmmss`, `{seq4}` a 4-digit
    sequence number and `{inf_time}` the time as `yyyy-MM-dd HH:mm:ss`.
    """

    path: str = Field(pattern=r"^/", description="Path of the transaction on the endpoint.")
    interval_s: float = Field(10.0, gt=0, description="Time between two transactions.")
    timeout_s: float = Field(3.0, gt=0, description="A transaction slower than this fails.")
    rise: int = Field(1, ge=1, description="Passing transactions in a row that mark it up.")
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers.")
    body: str | None = Field(None, description="Request body text (a template, see above).")
    failure_body: FailureBody | None = Field(
        None, description="How to read a failure from the body of an answer with the status."
    )


class Probes(_Model):
    """Active checks of every endpoint of an upstream, apart from real traffic."""

    http: HttpCheck | None = Field(
        default_factory=HttpCheck, description="HTTP check; `null` turns it off."
    )
    synthetic: SyntheticCheck | None = Field(
        None, description="Synthetic transaction with a test patient; off when unset."
    )


class Failback(_Model):
    """How traffic returns to a recovered endpoint."""

    hold_down_s: float = Field(
        30.0, ge=0, description="Time an endpoint must stay healthy before traffic returns."
    )
    ramp_s: float = Field(
        30.0, ge=0, description="Time over which its share of traffic ramps up to all of it."
    )
    ramp_start: float = Field(
        0.1, gt=0, le=1, description="Share of traffic it gets when the ramp starts."
    )


class Stall(_Model):
    """Telling a stopped endpoint (connections accepted, no answers) before timeouts do."""

    enabled: bool = Field(True, description="Detect stalls and hedge around them.")
    factor: float = Field(
        10.0,
        ge=1,
        description="Stalled when nothing answered for this many times the recent "
        "slow-end latency ...",
    )
    floor_s: float = Field(0.05, gt=0, description="... and for at least this long ...")
    min_pending: int = Field(
        3, ge=1, description="... while at least this many requests were waiting."
    )


class RetryBudget(_Model):
    """Bounds retries and hedges, so a failure never multiplies the load."""

    ratio: float = Field(
        0.2, ge=0, le=1, description="Retries allowed as a share of requests in the window."
    )
    min_per_s: float = Field(
        3.0, ge=0, description="Retries allowed per second even with little traffic."
    )
    window_s: float = Field(10.0, gt=0, le=300, description="Window the share is counted over.")


class Upstream(_Model):
    """A hospital system served by one or more endpoints."""

    endpoints: list[Endpoint] = Field(
        min_length=1, description="The sites that can serve this upstream."
    )
    breaker: Breaker = Field(
        default_factory=Breaker, description="Circuit breaker of each endpoint."
    )
    probes: Probes = Field(default_factory=Probes, description="Active checks of each endpoint.")
    failback: Failback = Field(
        default_factory=Failback, description="Return of traffic to a recovered endpoint."
    )
    stall: Stall = Field(default_factory=Stall, description="Stall detection and hedging.")
    retry_budget: RetryBudget = Field(
        default_factory=RetryBudget, description="Bound on retries and hedges."
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="Bulkhead: requests in flight per endpoint and worker; beyond it the next "
        "endpoint is used, or the request fails fast.",
    )

    @model_validator(mode="after")
    def _unique_endpoints(self) -> Upstream:
        names = [endpoint.name for endpoint in self.endpoints]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate endpoint name {', '.join(duplicates)}")
        return self


class BodyMatch(_Model):
    """Match on a top-level field of a small JSON request body."""

    field: str = Field(description="Top-level JSON field, e.g. `infno` of the insurance envelope.")
    values: list[str] = Field(min_length=1, description="Values that match (compared as text).")


class Match(_Model):
    """Which requests a route takes; every given condition must hold."""

    host: str | None = Field(None, description="Host header without port; any host when unset.")
    path: str | None = Field(None, description="Exact path. Give `path` or `path_prefix`.")
    path_prefix: str | None = Field(None, description="Path prefix, e.g. `/fhir/`.")
    methods: list[HttpMethod] | None = Field(None, description="Methods; any when unset.")
    body: BodyMatch | None = Field(
        None, description="JSON body field match; the body is read up to `body_read_cap_bytes`."
    )

    @field_validator("host")
    @classmethod
    def _host_without_port(cls, host: str | None) -> str | None:
        if host is not None and (":" in host.rsplit("]", 1)[-1] or "/" in host):
            raise ValueError(f"give the host name without port or path: {host!r}")
        return host

    @model_validator(mode="after")
    def _one_path(self) -> Match:
        if (self.path is None) == (self.path_prefix is None):
            raise ValueError("give exactly one of path or path_prefix")
        for value in (self.path, self.path_prefix):
            if value is not None and not value.startswith("/"):
                raise ValueError(f"paths start with '/': {value!r}")
        return self


class Timeouts(_Model):
    """Upstream call timeouts, in seconds."""

    connect_s: float = Field(2.0, gt=0, description="TCP connect to the endpoint.")
    total_s: float = Field(
        30.0, gt=0, description="Whole upstream exchange, including streaming the body."
    )


FallbackName = Literal["self-pay", "local-queue", "stale-cache", "journal", "notice"]


class NoticeOptions(_Model):
    """The `notice` fallback: what a patient app shows when nothing can serve."""

    retry_after_s: int = Field(60, ge=1, description="`Retry-After` of the 503 answer.")
    message_zh: str = Field(
        "部分功能正在抢修，请稍候或前往人工窗口", description="Notice text in Chinese."
    )
    message_en: str = Field(
        "Some functions are being repaired; please wait or go to a staffed counter.",
        description="Notice text in English.",
    )


class SelfPayOptions(_Model):
    """The `self-pay` fallback: insurance settlement is down, the patient pays in full now."""

    message_zh: str = Field(
        "医保结算暂停，请先全额自费；医保部分将在系统恢复后补结算并退还差额",
        description="Notice on a self-pay answer, in Chinese.",
    )
    message_en: str = Field(
        "Insurance settlement is paused: please pay the full amount now; the insured share "
        "will be settled later and the difference refunded.",
        description="Notice on a self-pay answer, in English.",
    )
    settle_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Timeout of each re-settlement call (2207, 5203, 2601); a 2207 past it is "
        "`unknown`. Under half of `fallbacks.journal.claim_lease_s`: a replay starts a call "
        "only if it ends within the first half of its lease on the claim.",
    )
    resolve_after_s: float = Field(
        30.0,
        gt=0,
        description="Wait, once a re-settlement 2207 is `unknown` and its call is over, before "
        "querying it (5203). The HIS's own 2207 behind a claim is queried `settle_timeout_s` "
        "after the claim was made.",
    )
    not_found_markers: list[str] = Field(
        ["不存在", "no settlement", "no message", "not found"],
        min_length=1,
        description="Texts (any case) in the insurer's refusal of a 5203 query or 2601 "
        'reversal that mean "no such settlement / message"; only these let a new 2207 '
        "follow. Any other refusal is inconclusive.",
    )
    max_inconclusive: int = Field(
        5,
        ge=1,
        description="Inconclusive insurer answers in a row about a 2207 that may stand (a "
        "refusal without a not-found marker, a success without a settlement) after which the "
        "claim is a dead letter (`conflict`) for a person, with those answers. Timeouts and "
        "platform errors are not answers: the claim waits.",
    )
    msgid_sequence_from: int = Field(
        9000,
        ge=0,
        le=9999,
        description="First of the 4-digit msgid sequence numbers the re-settlement uses "
        "(drawn fleet-wide from the state store); the HIS's own msgids must stay outside "
        "`msgid_sequence_from`..`msgid_sequence_to`.",
    )
    msgid_sequence_to: int = Field(
        9999, ge=0, le=9999, description="Last msgid sequence number the re-settlement uses."
    )
    utc_offset_hours: float = Field(
        8.0,
        ge=-12,
        le=14,
        description="The insurer's local time, in hours east of UTC, for the timestamp in "
        "re-settlement msgids and `inf_time` (China: 8).",
    )

    @model_validator(mode="after")
    def _sequence_range(self) -> SelfPayOptions:
        if self.msgid_sequence_to < self.msgid_sequence_from:
            raise ValueError("msgid_sequence_to must be at least msgid_sequence_from")
        return self


class LocalQueueOptions(_Model):
    """The `local-queue` fallback: queue numbers the gateway issues while registration is down."""

    prefix: str = Field(
        "L-",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,11}$",
        description="Put before every local number (`L-` + department + number: `L-NEI-0007`) "
        "so it never looks like the registration system's own (`A023`); letters, digits, "
        "`-`, `_` (numbers appear in URL paths).",
    )
    block_size: int = Field(
        100, ge=1, description="Numbers leased from the store at a time per department and day."
    )
    spare_blocks: int = Field(
        1,
        ge=0,
        description="Blocks held in reserve beyond the current one, so numbers keep coming "
        "while the store is unreachable.",
    )
    departments: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")]] = Field(
        default_factory=list,
        description="Departments whose numbers are leased ahead at start-up and each day (any "
        "other department leases its first block when it first needs one).",
    )
    timezone: str | None = Field(
        None,
        description="IANA time zone whose date scopes the numbers (`Asia/Shanghai`): they "
        "restart per department and hospital day. Unset: the gateway host's local time.",
    )
    board_refresh_s: float = Field(
        1.0,
        gt=0,
        description="Longest age of the locally issued queue a worker shows on boards: one "
        "store read per interval and worker, however many boards poll.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value


class StaleCacheOptions(_Model):
    """The `stale-cache` fallback: earlier successful reads, encrypted, per caller."""

    keys_env: str = Field(
        "RESILGATE_CACHE_KEYS",
        description="Environment variable with the AES-256-GCM keys as `id:base64key` (32 "
        "bytes, e.g. `k1:$(openssl rand -base64 32)`), comma-separated; the first one "
        "encrypts, every one decrypts (rotation: put the new key first, drop the old one "
        "`max_staleness_s` later). No key: nothing is cached; an unusable key: no start.",
    )
    keys_file: Path | None = Field(
        None,
        description="File with the same content (also one key a line), read instead of the "
        "environment variable; relative to the main config file's directory.",
    )
    identity_header: str | None = Field(
        None,
        description="Request header naming the caller, set by a trusted front proxy (then only "
        "it counts); unset: the bearer token's `sub`, bound to the whole token, so a copy is "
        "served only to the same unexpired token. A request without identity is never cached.",
    )
    max_staleness_s: float = Field(
        86400.0, gt=0, description="Oldest copy that is still served; older ones are dropped."
    )
    max_entry_bytes: int = Field(256 * 1024, ge=1, description="Larger answers are not cached.")
    max_total_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Bound on the total size of the kept copies; to keep within it, the "
        "store drops the copies nearest to expiry first.",
    )


class JournalOptions(_Model):
    """The `journal` fallback and the replay of every journaled write after recovery."""

    ticket_system: str = Field(
        "urn:resilgate:ticket",
        description="FHIR identifier system of the ticket put in journaled resources.",
    )
    message_zh: str = Field(
        "系统抢修中，本单已登记，将在系统恢复后自动录入；请保留单号",
        description="Notice on the `202 Accepted` answer, in Chinese.",
    )
    message_en: str = Field(
        "The system is being repaired: this order is recorded and will be entered "
        "automatically once it is back; keep the ticket number.",
        description="Notice on the `202 Accepted` answer, in English.",
    )
    replay_rate_per_s: float = Field(
        20.0, gt=0, description="Most entries replayed per second and upstream (recovery is load)."
    )
    claim_lease_s: float = Field(
        60.0,
        gt=0,
        description="How long taken entries stay with their replayer; after a crash another "
        "replayer resumes once it runs out. At least 2 x `timeouts.total_s` of `journal` routes "
        "and 1 x of `local-queue` ones (checked).",
    )
    retry_after_s: float = Field(
        5.0, gt=0, description="Pause of a queue after a replay the upstream could not take."
    )
    give_up_after_s: float = Field(
        3600.0,
        gt=0,
        description="An entry at the head of its queue that the upstream keeps failing (5xx, "
        "no answer) for this long, and at least 5 times, becomes a dead letter, so one entry "
        "cannot hold its queue forever.",
    )


class Fallbacks(_Model):
    """Options of the degraded paths that routes name in `fallback`."""

    notice: NoticeOptions = Field(default_factory=NoticeOptions, description="`notice`.")
    self_pay: SelfPayOptions = Field(default_factory=SelfPayOptions, description="`self-pay`.")
    local_queue: LocalQueueOptions = Field(
        default_factory=LocalQueueOptions, description="`local-queue`."
    )
    stale_cache: StaleCacheOptions = Field(
        default_factory=StaleCacheOptions, description="`stale-cache`."
    )
    journal: JournalOptions = Field(default_factory=JournalOptions, description="`journal`.")


Role = Literal["viewer", "operator"]


class AdminToken(_Model):
    """One bearer token of the admin API, kept as its SHA-256 (`resilgate token new` makes one)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$",
        description="Who holds it, e.g. `ops-alice`; the audit log names changes by it.",
    )
    role: Role = Field(
        description="`viewer` reads; `operator` also changes modes, journal, drills."
    )
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the token (never the token)."
    )


class Admin(_Model):
    """Who may use the admin API."""

    tokens: list[AdminToken] = Field(
        default_factory=list, description="Tokens written in this file (hashes only)."
    )
    tokens_file: Path | None = Field(
        None,
        description="A YAML list of more tokens in the same form, e.g. a mounted Kubernetes "
        "Secret; relative to this file. Read at start-up.",
    )


Criticality = Literal["core", "support", "reporting"]


def _core_weights() -> dict[Criticality, float]:
    return {"core": 1.0, "support": 0.0, "reporting": 0.0}


class Incident(_Model):
    """How the incident level is computed from recent traffic (the hospital emergency plan)."""

    window_s: float = Field(
        60, gt=0, le=3600, description="Recent traffic: the share is measured over this window."
    )
    min_requests: int = Field(
        20, ge=1, description="No level is declared on fewer weighted requests in the window."
    )
    weights: dict[Criticality, float] = Field(
        default_factory=_core_weights,
        description="Weight of each route criticality in the share (core traffic decides).",
    )
    level1_share: float = Field(
        0.5, gt=0, le=1, description="Level 1 above this share of failed or degraded traffic."
    )
    level2_share: float = Field(0.2, gt=0, le=1, description="Level 2 from this share up.")
    level3_share: float = Field(
        0.0, ge=0, lt=1, description="Level 3 above this share; at or below it, no incident."
    )
    calm_s: float = Field(
        30, ge=0, description="A level is lowered only after the share stayed lower this long."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Incident:
        if not self.level3_share < self.level2_share <= self.level1_share:
            raise ValueError(
                "shares must rise from level 3 to level 1: "
                f"level3_share {self.level3_share} < level2_share {self.level2_share} "
                f"<= level1_share {self.level1_share}"
            )
        return self


class Alerts(_Model):
    """Webhooks to departments: incident level changes and early warnings."""

    webhooks: list[UpstreamUrl] = Field(
        default_factory=list, description="URLs that get a JSON POST for every alert."
    )
    secret_env: str = Field(
        "RESILGATE_WEBHOOK_SECRET",
        description="Environment variable holding a secret; when set, each POST carries "
        "`X-Resilgate-Signature: sha256=<HMAC of the body>`.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Time one POST may take.")
    max_attempts: int = Field(8, ge=1, description="POSTs of one alert before it is dropped.")
    backoff_s: float = Field(1.0, gt=0, description="First wait before a retry; doubles.")
    max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between two retries.")
    queue_size: int = Field(
        1000, ge=1, description="Alerts waiting per URL; beyond it the oldest is dropped."
    )
    warning_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Early warning once an endpoint's failure or slow-call rate (summed over "
        "the fleet, breaker window) reaches this fraction of its breaker's rate.",
    )


class Drills(_Model):
    """Emergency drills."""

    restore_grace_s: float = Field(
        10, gt=0, description="After a drill ends, how long its report waits for live traffic."
    )


class Route(_Model):
    """Which requests go to which upstream."""

    name: Name = Field(description="Unique route name; appears in logs and metrics.")
    upstream: Name = Field(description="Name of the upstream that serves this route.")
    match: Match = Field(description="Which requests this route takes.")
    criticality: Criticality = Field(
        "support", description="`core` business, `support`, or `reporting` (shed first)."
    )
    timeouts: Timeouts = Field(
        default_factory=Timeouts, description="Connect and total timeouts of the upstream call."
    )
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=0, description="Largest request body accepted; larger gets 413."
    )
    body_read_cap_bytes: int = Field(
        64 * 1024, ge=1, description="Most body bytes read to evaluate `match.body`."
    )
    retries: Literal["by_method", "safe", "never"] = Field(
        "by_method",
        description="`by_method`: GET, HEAD, OPTIONS, PUT, DELETE and a POST with "
        "`Idempotency-Key` are retried on the next endpoint; `safe`: every call of the route "
        "commits nothing (e.g. insurance trial 2206); `never`: the call commits money and is "
        "never sent twice once it may have reached an endpoint.",
    )
    failure_body: FailureBody | None = Field(
        None, description="Read failures from the body of answers (insurance, FHIR)."
    )
    fallback: FallbackName | None = Field(
        None,
        description="What answers when no endpoint can serve, or ops forced `fallback`: "
        "`self-pay`, `local-queue`, `stale-cache`, `journal` or `notice`.",
    )


class Config(_Model):
    """The main configuration file."""

    listeners: Listeners = Field(
        default_factory=Listeners, description="Addresses the gateway listens on."
    )
    workers: int = Field(0, ge=0, le=256, description="Worker processes; 0 is one per core.")
    max_connections_per_endpoint: int = Field(
        256, ge=1, description="Pooled keep-alive connections per endpoint and worker."
    )
    client_body_timeout_s: float = Field(
        30.0, gt=0, description="Time a client has to send a body that routing must read."
    )
    max_header_bytes: int = Field(
        32768,
        ge=1024,
        description="Longest request line or header line accepted (FHIR searches are long).",
    )
    drain_deadline_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    drain_notice_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="On SIGTERM, how long `/readyz` says not ready while the listeners still "
        "take requests, before draining starts (time for a load balancer to stop sending; "
        "e.g. 5 behind a Kubernetes Service).",
    )
    state: StateConfig = Field(
        default_factory=StateConfig, description="Where shared state (modes, journal) is kept."
    )
    upstreams: dict[Name, Upstream] = Field(
        min_length=1, description="Hospital systems by name, e.g. `his`."
    )
    fallbacks: Fallbacks = Field(
        default_factory=Fallbacks, description="Options of the routes' fallbacks."
    )
    admin: Admin = Field(default_factory=Admin, description="Admin API tokens and limits.")
    incident: Incident = Field(
        default_factory=Incident, description="Incident levels from recent traffic."
    )
    alerts: Alerts = Field(default_factory=Alerts, description="Webhooks to departments.")
    drills: Drills = Field(default_factory=Drills, description="Emergency drills.")
    include_routes: list[str] = Field(
        default_factory=lambda: ["routes/*.yaml"],
        description="Globs of route table files, relative to this file; read in sorted order.",
    )
    routes: list[Route] = Field(
        default_factory=list,
        description="Routes, in match order: the ones written here, then the included ones.",
    )
    _base_dir: Path = PrivateAttr(Path("."))

    @model_validator(mode="after")
    def _self_pay_calls_within_lease(self) -> Config:
        # A replay starts a self-pay call only if it ends within the first half of the lease
        # on its claim (fallbacks/self_pay.py); the other half covers the time from the claim
        # to the replay and the store's writes. A longer timeout would let no call start.
        timeout_s = self.fallbacks.self_pay.settle_timeout_s
        lease_s = self.fallbacks.journal.claim_lease_s
        if timeout_s * 2 >= lease_s and any(r.fallback == "self-pay" for r in self.routes):
            raise ValueError(
                f"fallbacks.self_pay.settle_timeout_s ({timeout_s}s) must be under half of "
                f"fallbacks.journal.claim_lease_s ({lease_s}s): a re-settlement call must end "
                "well within the replayer's lease on its claim"
            )
        return self

    def resolve(self, path: Path) -> Path:
        """A path from the config, relative to the main file's directory."""
        return path if path.is_absolute() else self._base_dir / path


class RouteFile(_Model):
    """A route table file under `routes/`."""

    routes: list[Route] = Field(description="Routes of this file, in match order.")


# ---------------------------------------------------------------------------------------------
# Loading with file and line numbers.

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` says where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


@dataclass(frozen=True)
class _Origin:
    file: str
    line: int
    loc: Loc  # the field path as written in that file


def _field_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _lines(node: yaml.Node, loc: Loc, out: dict[Loc, int], duplicates: list[Loc]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            child = (*loc, str(key.value))
            if child[-1] in seen:
                duplicates.append(child)
            seen.add(str(key.value))
            _lines(value, child, out, duplicates)
            out[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, (*loc, index), out, duplicates)


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(file, None, "", "not UTF-8 text")]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = f"YAML syntax error: {exc.problem or exc.context}"
        raise ConfigError([Problem(file, line, "", reason)]) from exc
    lines: dict[Loc, int] = {}
    duplicates: list[Loc] = []
    if node is not None:
        _lines(node, (), lines, duplicates)
    if duplicates:
        raise ConfigError(
            [
                Problem(file, lines[loc], _field_path(loc), "duplicate key (only one may be given)")
                for loc in duplicates
            ]
        )
    return data, lines


class _SourceMap:
    """Where each field of the merged configuration was written."""

    def __init__(self) -> None:
        self._origins: dict[Loc, _Origin] = {}

    def add(self, file: str, lines: dict[Loc, int], rebase: tuple[Loc, Loc] | None = None) -> None:
        for loc, line in lines.items():
            merged = loc
            if rebase is not None:
                local_prefix, merged_prefix = rebase
                if loc[: len(local_prefix)] != local_prefix:
                    continue
                merged = merged_prefix + loc[len(local_prefix) :]
            self._origins[merged] = _Origin(file, line, loc)

    def problem(self, loc: Loc, message: str, default_file: str) -> Problem:
        for cut in range(len(loc), -1, -1):
            origin = self._origins.get(loc[:cut])
            if origin is not None:
                local = origin.loc + loc[cut:]
                return Problem(origin.file, origin.line, _field_path(local), message)
        return Problem(default_file, None, _field_path(loc), message)


def _pydantic_problems(exc: ValidationError, sources: _SourceMap, file: str) -> Iterator[Problem]:
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        yield sources.problem(loc, message, file)


# How many of the route's timeouts one replay of these fallbacks may take (a journaled update
# is read back after a conflict).
REPLAY_CALLS = {"journal": 2, "local-queue": 1}


def _reference_problems(config: Config, sources: _SourceMap, file: str) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    lease_s = config.fallbacks.journal.claim_lease_s
    for index, route in enumerate(config.routes):
        calls = REPLAY_CALLS.get(route.fallback or "", 0)
        if calls * route.timeouts.total_s > lease_s:
            message = (
                f"a replay of this {route.fallback} route may take {calls} x "
                f"{route.timeouts.total_s}s, over fallbacks.journal.claim_lease_s ({lease_s}s):"
                " another replayer could take the entry mid-replay"
            )
            yield sources.problem(("routes", index, "timeouts", "total_s"), message, file)
        if route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams))
            message = f"unknown upstream {route.upstream!r} (known: {known})"
            yield sources.problem(("routes", index, "upstream"), message, file)
        if route.name in seen:
            first = sources.problem(("routes", seen[route.name], "name"), "", file)
            message = f"duplicate route name {route.name!r} (first at {first.file}:{first.line})"
            yield sources.problem(("routes", index, "name"), message, file)
        else:
            seen[route.name] = index


def _route_files(
    data: dict[str, Any], base_dir: Path, sources: _SourceMap, main_file: str
) -> tuple[list[Any], list[Problem]]:
    """Read the included route tables; their routes, rebased into the merged config."""
    problems: list[Problem] = []
    inline = data.get("routes", [])
    routes: list[Any] = list(inline) if isinstance(inline, list) else []
    includes = data.get("include_routes", ["routes/*.yaml"])
    for index, pattern in enumerate(includes if isinstance(includes, list) else []):
        matched = sorted(glob.glob(os.path.join(base_dir, str(pattern))))
        if not matched:
            where = ("include_routes", index)
            problems.append(sources.problem(where, f"no file matches {pattern!r}", main_file))
        for route_path in matched:
            try:
                route_data, route_lines = read_yaml(Path(route_path))
                RouteFile.model_validate(route_data)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            except ValidationError as exc:
                file_sources = _SourceMap()
                file_sources.add(route_path, route_lines)
                problems.extend(_pydantic_problems(exc, file_sources, route_path))
                continue
            for local_index, route in enumerate(route_data["routes"]):
                merged = ("routes", len(routes))
                sources.add(route_path, route_lines, rebase=(("routes", local_index), merged))
                routes.append(route)
    return routes, problems


def load_config(path: Path | str) -> Config:
    """Read, merge and validate the main file and its route tables; raise ConfigError.

    Every problem found in any file is reported at once.
    """
    main_path = Path(path)
    main_file = str(main_path)
    data, lines = read_yaml(main_path)
    if not isinstance(data, dict):
        raise ConfigError([Problem(main_file, 1, "", "the file must be a YAML mapping")])
    sources = _SourceMap()
    sources.add(main_file, lines)
    routes, problems = _route_files(data, main_path.parent, sources, main_file)
    merged = {**data, "routes": routes} if isinstance(data.get("routes", []), list) else data
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, sources, main_file))
        raise ConfigError(problems) from exc
    problems.extend(_reference_problems(config, sources, main_file))
    if not config.routes and not problems:
        reason = "no routes: neither this file nor the included route tables define any"
        problems.append(sources.problem(("include_routes",), reason, main_file))
    if problems:
        raise ConfigError(problems)
    config._base_dir = main_path.parent
    return config
