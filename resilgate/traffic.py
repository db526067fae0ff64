"""One worker's recent requests by route criticality: the input of the incident level."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import get_args

from resilgate.config import Criticality
from resilgate.outcomes import RequestOutcome

CRITICALITIES: tuple[str, ...] = get_args(Criticality)
_INDEX = {name: index for index, name in enumerate(CRITICALITIES)}
# A bucket: its second, then (total, affected) for each criticality, flattened.
_Bucket = list[int]


class TrafficWindow:
    """Requests of the last ``window_s`` seconds, in 1-second buckets.

    ``record`` is called on every request and does a few additions; ``summary`` (about once a
    second) adds the buckets up. Requests that matched no route are not counted.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._span = max(1, math.ceil(window_s))
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()

    def __repr__(self) -> str:
        counts = self.summary()
        text = ", ".join(f"{name} {c['affected']}/{c['total']}" for name, c in counts.items())
        return f"<TrafficWindow {self.window_s:g}s: {text} affected>"

    def record(self, outcome: RequestOutcome) -> None:
        index = _INDEX.get(outcome.criticality or "")
        if index is None:
            return
        second = math.floor(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second] + [0] * (2 * len(CRITICALITIES)))
            self._evict(second)
        bucket = buckets[-1]
        bucket[1 + 2 * index] += 1
        if outcome.affected:
            bucket[2 + 2 * index] += 1

    def summary(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """Per criticality ``{"total": n, "affected": m}`` over the window (JSON-able)."""
        self._evict(math.floor(self._clock() if now is None else now))
        totals = [0] * (2 * len(CRITICALITIES))
        for bucket in self._buckets:
            for position in range(len(totals)):
                totals[position] += bucket[1 + position]
        return {
            name: {"total": totals[2 * index], "affected": totals[2 * index + 1]}
            for index, name in enumerate(CRITICALITIES)
        }

    def _evict(self, second: int) -> None:
        oldest = second - self._span + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
