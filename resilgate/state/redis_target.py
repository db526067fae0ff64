"""Where the Redis store connects: one URL, or the master that a set of Sentinels names."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilgate.config import StateConfig


class SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to the master the sentinels name, and, like the single-URL pool, a burst
    beyond the pool waits for a free connection instead of failing at once."""


def without_password(url: str) -> str:
    return re.sub(r"(//[^:@/]*:)[^@/]*@", r"\1***@", url)


def _address(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A Redis URL, or Sentinels and a master name; passwords come from the environment."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def from_config(
        cls, state: StateConfig, environ: Mapping[str, str] = os.environ
    ) -> RedisTarget:
        password = environ.get(state.redis_password_env) or None
        sentinel = state.redis_sentinel
        if sentinel is None:
            assert state.redis_url is not None, "checked by the config schema"
            return cls(url=state.redis_url, password=password)
        return cls(
            sentinels=tuple(_address(host) for host in sentinel.hosts),
            master=sentinel.master,
            db=sentinel.db,
            password=password,
            sentinel_password=environ.get(sentinel.password_env) or None,
        )

    def __str__(self) -> str:
        """For logs and errors: never a password."""
        if self.url is not None:
            return without_password(self.url)
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel://{hosts}/{self.master}/{self.db}"

    def connect(self, max_connections: int, timeout_s: float, **options: Any) -> Connected:
        """A client whose pool holds at most ``max_connections``, waits at most ``timeout_s``
        for a free one, and connects and answers within ``timeout_s``."""
        timeouts: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        if self.password is not None:
            options["password"] = self.password
        if self.url is not None:
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=timeout_s, **timeouts, **options
            )
            if self.password is not None:  # the environment's password wins over the URL's
                pool.connection_kwargs["password"] = self.password
            return Connected(Redis.from_pool(pool))  # the client owns the pool and closes it
        # Asking the sentinels in turn must fit in one operation's time, a dead or silent one
        # included: each gets its share, and no retries.
        share_s = timeout_s / (len(self.sentinels) + 1)
        sentinel_options: dict[str, Any] = {
            "socket_timeout": share_s,
            "socket_connect_timeout": share_s,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.sentinel_password is not None:
            sentinel_options["password"] = self.sentinel_password
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        client: Redis = sentinel.master_for(
            self.master,
            connection_pool_class=SentinelBlockingPool,
            db=self.db,
            max_connections=max_connections,
            timeout=timeout_s,
            **timeouts,
            **options,
        )
        return Connected(client, list(sentinel.sentinels))


@dataclass(frozen=True, slots=True)
class Connected:
    """The client of the data, and the clients of the sentinels it asks (closed with it)."""

    redis: Redis
    sentinels: list[Redis] = field(default_factory=list)

    async def aclose(self) -> None:
        try:
            await self.redis.aclose()
        finally:
            for sentinel in self.sentinels:
                await sentinel.aclose()
