"""What one worker knows of the shared state, kept fresh in the background.

The request path reads :class:`StateView` attributes and never awaits the store; a store outage
only means the view stops changing (and says so).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping

from resilgate.logs import get_logger
from resilgate.state.records import ForcedMode, Verdict
from resilgate.state.store import StateStore

log = get_logger("resilgate.state")
RETRY_S = 0.5


class StateView:
    """Forced modes and breaker verdicts of the whole fleet, as last read from the store."""

    def __init__(
        self, store: StateStore, refresh_s: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._clock = clock
        self.modes: Mapping[str, ForcedMode] = {}
        self.verdicts: tuple[Verdict, ...] = ()
        self.healthy: bool | None = None  # None until the first read
        self.error = ""
        self.refreshed_at = 0.0
        self._durability_checked = False

    def __repr__(self) -> str:
        health = {None: "starting", True: "healthy", False: f"UNREACHABLE ({self.error})"}
        age = self._clock() - self.refreshed_at if self.refreshed_at else float("nan")
        return (
            f"<StateView {self.store.backend} {health[self.healthy]}, {len(self.modes)} modes, "
            f"{len(self.verdicts)} verdicts, refreshed {age:.1f}s ago>"
        )

    def mode_of(self, target: str) -> ForcedMode | None:
        """The forced mode of an upstream or route, unless it has expired."""
        mode = self.modes.get(target)
        return mode if mode is not None and mode.active(self._clock()) else None

    async def refresh(self) -> None:
        """Read modes and verdicts now; raises what the store raises."""
        modes = await self.store.load_modes()
        self.verdicts = tuple(await self.store.load_verdicts())
        now = self._clock()
        for target, mode in modes.items():
            if self.modes.get(target) != mode and mode.active(now):
                log.info(
                    "mode_seen",
                    pid=os.getpid(),
                    target=target,
                    mode=mode.mode,
                    actor=mode.actor,
                    lag_ms=round((now - mode.set_at) * 1000, 1),
                )
        for target in set(self.modes) - set(modes):
            log.info("mode_cleared_seen", target=target)
        self.modes = modes
        self.refreshed_at = now

    async def _mark(self, healthy: bool, error: str = "") -> None:
        if healthy != self.healthy:
            if healthy:
                log.info("state_store_ok", backend=self.store.backend)
                if not self._durability_checked:
                    # Checked once the store answers, also when it was down at start-up.
                    self._durability_checked = True
                    warning = await self.store.durability_warning()
                    if warning:
                        log.warning(
                            "state_store_not_durable", backend=self.store.backend, detail=warning
                        )
            else:
                log.warning(
                    "state_store_unreachable",
                    backend=self.store.backend,
                    error=error,
                    note="routing continues on the last known state",
                )
        self.healthy, self.error = healthy, error

    async def run(self) -> None:
        """Keep the view fresh until cancelled: on every announced change, and at least
        every ``refresh_s`` in case an announcement was lost."""
        while True:
            try:
                if self.healthy:
                    await self.store.wait_for_change(self.refresh_s)
                await self.refresh()
                await self._mark(True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any store failure: keep the last known state
                await self._mark(False, f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(RETRY_S)


async def trim_forever(
    store: StateStore,
    interval_s: float,
    audit_keep_s: float,
    journal_keep_s: float,
    verdict_keep_s: float,
) -> None:
    """Apply retention soon after start, then every ``interval_s`` (jittered, so the workers
    of a fleet do not all trim at once); a failure is logged and tried next time."""
    delay = random.uniform(5, 60)
    while True:
        await asyncio.sleep(delay)
        delay = interval_s * random.uniform(0.9, 1.1)
        try:
            removed = await store.trim(time.time(), audit_keep_s, journal_keep_s, verdict_keep_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("state_trim_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        else:
            if removed:
                log.info("state_trimmed", records=removed)
