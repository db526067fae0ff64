"""The configured state backend."""

from __future__ import annotations

from resilgate.config import Config
from resilgate.state.store import StateStore


def make_store(config: Config) -> StateStore:
    state = config.state
    if state.backend == "sqlite":
        from resilgate.state.sqlite import SqliteStore

        return SqliteStore(config.resolve(state.path))
    if state.backend == "redis":
        from resilgate.state.redis import RedisStore
        from resilgate.state.redis_target import RedisTarget

        return RedisStore(
            RedisTarget.from_config(state),
            spool_path=config.resolve(state.spool_path),
            op_timeout_s=state.op_timeout_s,
        )
    from resilgate.state.memory import MemoryStore

    return MemoryStore()
