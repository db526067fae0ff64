"""Upstreams and their endpoints, and the one pooled client session of a worker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from resilgate.config import Config, Upstream
from resilgate.errors import (
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# Headers aiohttp would add on its own; a proxy sends only what the client sent.
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One site of an upstream, as the request path uses it."""

    upstream: str
    name: str
    priority: int
    read_only: bool
    base: str  # scheme://host:port/path without a trailing slash

    @property
    def label(self) -> str:
        """``upstream/endpoint``, the value of ``X-Resilgate-Upstream``."""
        return f"{self.upstream}/{self.name}"

    def url_for(self, raw_target: str) -> URL:
        """The upstream URL of a client's raw path and query, percent-encoding untouched."""
        return URL(self.base + raw_target, encoded=True)


@dataclass(frozen=True, slots=True)
class Cluster:
    """The endpoints of one upstream, lowest priority number first."""

    name: str
    endpoints: tuple[Endpoint, ...]

    def __repr__(self) -> str:
        sites = ", ".join(f"{e.name}({e.priority})" for e in self.endpoints)
        return f"<Cluster {self.name}: {sites}>"

    @classmethod
    def from_config(cls, name: str, upstream: Upstream) -> Cluster:
        ordered = sorted(upstream.endpoints, key=lambda endpoint: endpoint.priority)
        return cls(
            name,
            tuple(
                Endpoint(name, e.name, e.priority, e.read_only, str(e.url).rstrip("/"))
                for e in ordered
            ),
        )


def clusters_from(config: Config) -> Mapping[str, Cluster]:
    return {name: Cluster.from_config(name, up) for name, up in config.upstreams.items()}


def new_session(config: Config) -> aiohttp.ClientSession:
    """The worker's keep-alive pool: no decompression, no redirects, no cookie jar."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=config.max_connections_per_endpoint,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
    )


def _cause(exc: BaseException) -> str:
    """Exception class and OS reason, e.g. ``ClientConnectorError: Connection refused``."""
    reason = getattr(exc, "strerror", None) or getattr(
        getattr(exc, "os_error", None), "strerror", None
    )
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def upstream_error(exc: BaseException, endpoint: Endpoint) -> UpstreamError:
    """The gateway error for an exception of an upstream call, split by phase."""
    where = endpoint.label
    cause = _cause(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(
            f"connecting to {where} timed out", upstream=where, cause=cause
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(f"cannot connect to {where}", upstream=where, cause=cause)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time", upstream=where, cause=cause)
    return UpstreamBroken(f"connection to {where} broke", upstream=where, cause=cause)
