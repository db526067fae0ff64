"""The retry budget: retries and hedges as a bounded share of requests, so that a failure of
every endpoint never multiplies the load on them (Envoy's retry budget, per worker)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from resilgate.config import RetryBudget as RetryBudgetConfig


class _Counts:
    """Events per whole second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        self._window = max(1, math.ceil(window_s))
        self._buckets: deque[list[int]] = deque()  # [second, count]
        self._total = 0

    def add(self, now: float) -> None:
        second = int(now)
        self._expire(second)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
        self._total += 1

    def total(self, now: float) -> int:
        self._expire(int(now))
        return self._total

    def _expire(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self._window:
            self._total -= self._buckets.popleft()[1]


class RetryBudget:
    """Allows a retry while retries in the window stay under ``ratio`` of requests, or under
    the floor of ``min_per_s`` per second when traffic is light."""

    def __init__(
        self, name: str, config: RetryBudgetConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self._config = config
        self._clock = clock
        self._requests = _Counts(config.window_s)
        self._retries = _Counts(config.window_s)
        self.refused = 0  # retries the budget turned down, for metrics and /status

    def __repr__(self) -> str:
        now = self._clock()
        return (
            f"<RetryBudget {self.name} {self._retries.total(now)}/{self.allowed(now)} retries "
            f"for {self._requests.total(now)} requests in {self._config.window_s:g}s>"
        )

    def allowed(self, now: float) -> int:
        config = self._config
        share = config.ratio * self._requests.total(now)
        floor = config.min_per_s * config.window_s
        return math.floor(max(share, floor) + 1e-9)  # 0.29 * 100 is 28.999...

    def usage(self) -> tuple[int, int]:
        """(taken, allowed) retries and hedges in the window now."""
        now = self._clock()
        return self._retries.total(now), self.allowed(now)

    def note_request(self) -> None:
        self._requests.add(self._clock())

    def try_spend(self) -> bool:
        """Take one retry (or hedge) from the budget; False when it is spent."""
        now = self._clock()
        if self._retries.total(now) >= self.allowed(now):
            self.refused += 1
            return False
        self._retries.add(now)
        return True
