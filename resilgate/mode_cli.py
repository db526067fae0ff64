"""``resilgate mode``: force, clear and list modes in the configured state store.

Until the admin API exists, this is how ops change a mode on a node: it writes the same records
the admin API will write (the mode, and an audit record of who, what and why), and every worker
and replica picks the change up from the store.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from resilgate.config import Config
from resilgate.state.factory import make_store
from resilgate.state.records import AuditRecord, ForcedMode, ModeName
from resilgate.state.store import StateStore, StoreUnavailable

NOT_YET = (
    "note: until the fallbacks land, an upstream or route in fallback mode answers 503 "
    "upstream_in_maintenance, like maintenance"
)


def default_actor() -> str:
    return f"cli:{getpass.getuser()}"


Action = Callable[[StateStore], Awaitable[int]]


async def with_store(config: Config, action: Action) -> int:
    """Run ``action`` on the configured state store; 1 if the store cannot be reached."""
    store = make_store(config)
    try:
        await store.open()
        return await action(store)
    except StoreUnavailable as exc:
        print(f"error: state store: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _set(
    store: StateStore, target: str, mode: str, reason: str, actor: str, expires_in: float | None
) -> int:
    now = time.time()
    expires_at = now + expires_in if expires_in else None
    forced = ForcedMode(target, _mode_name(mode), reason, actor, now, expires_at)
    await store.put_mode(forced)
    detail = f"mode={mode}" + (f" expires_in_s={expires_in:g}" if expires_in else "")
    await store.audit_append(AuditRecord(now, actor, "mode.set", target, reason, detail))
    print(f"{target}: {mode} ({reason})")
    if mode == "fallback":
        print(NOT_YET, file=sys.stderr)
    return 0


async def _clear(store: StateStore, target: str, reason: str, actor: str) -> int:
    await store.delete_mode(target)
    await store.audit_append(AuditRecord(time.time(), actor, "mode.clear", target, reason))
    print(f"{target}: auto")
    return 0


async def _list(store: StateStore) -> int:
    now = time.time()
    for target, forced in sorted((await store.load_modes()).items()):
        if not forced.active(now):
            continue
        until = (
            datetime.fromtimestamp(forced.expires_at, UTC).isoformat(timespec="seconds")
            if forced.expires_at
            else "until cleared"
        )
        print(f"{target}\t{forced.mode}\t{until}\t{forced.actor}\t{forced.reason}")
    return 0


def _mode_name(mode: str) -> ModeName:
    assert mode in ("primary", "dr", "fallback", "maintenance"), "argparse choices"
    return mode  # type: ignore[return-value]


def set_mode(target: str, mode: str, reason: str, actor: str, expires_in: float | None) -> Action:
    return lambda store: _set(store, target, mode, reason, actor, expires_in)


def clear_mode(target: str, reason: str, actor: str) -> Action:
    return lambda store: _clear(store, target, reason, actor)


def list_modes() -> Action:
    return _list


def run_mode(config: Config, action: Action) -> int:
    return asyncio.run(with_store(config, action))
