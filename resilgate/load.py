"""What one worker sends to one endpoint: requests in flight (the bulkhead), recent latency,
and whether the endpoint has stalled (accepts connections, answers nothing)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from resilgate.config import Stall

# A stall verdict nobody confirms or clears (no answer, no breaker change) expires after this.
STALL_MAX_S = 30.0


class EndpointLoad:
    """In-flight attempts and answer times of one endpoint, as seen by one worker.

    Latency is smoothed like TCP's round-trip estimate (``srtt + 4 * rttvar``, RFC 6298), so
    "far above its recent latency" follows the endpoint instead of a fixed number.
    """

    def __init__(
        self, label: str, max_in_flight: int, stall: Stall, clock: Callable[[], float]
    ) -> None:
        self.label = label
        self.max_in_flight = max_in_flight
        self._stall = stall
        self._clock = clock
        self.in_flight = 0
        self._waiting: dict[int, float] = {}  # attempt -> start, oldest first
        self._ids = itertools.count()
        self._srtt: float | None = None
        self._rttvar = 0.0
        self.last_answer_at = clock()
        self.stalled_since: float | None = None

    def __repr__(self) -> str:
        now = self._clock()
        stalled = f", STALLED {now - self.stalled_since:.2f}s" if self.stalled_since else ""
        return (
            f"<EndpointLoad {self.label} {self.in_flight}/{self.max_in_flight} in flight, "
            f"{len(self._waiting)} waiting, stall after {self.stall_after_s() * 1000:.0f}ms"
            f"{stalled}>"
        )

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight

    def start(self) -> int:
        """An attempt begins; returns its id for :meth:`answered` and :meth:`finished`."""
        attempt = next(self._ids)
        self.in_flight += 1
        self._waiting[attempt] = self._clock()
        return attempt

    def answered(self, attempt: int) -> None:
        """The endpoint answered (headers of any status): it is alive."""
        started = self._waiting.pop(attempt, None)
        now = self._clock()
        self.last_answer_at = now
        self.stalled_since = None
        if started is not None:
            self._observe(now - started)

    def finished(self, attempt: int) -> None:
        """The attempt is over: answered and streamed, failed, or cancelled."""
        self._waiting.pop(attempt, None)
        self.in_flight -= 1

    def alive(self) -> None:
        """Something else (a probe) got an answer: clear a stall verdict."""
        self.last_answer_at = self._clock()
        self.stalled_since = None

    def clear_stall(self) -> None:
        self.stalled_since = None

    def stall_after_s(self) -> float:
        """How long without any answer, with requests waiting, counts as a stall."""
        if self._srtt is None:
            return max(self._stall.floor_s, 1.0)  # no answer seen yet: be patient
        return max(self._stall.floor_s, self._stall.factor * (self._srtt + 4 * self._rttvar))

    def stalled(self) -> bool:
        """Requests are waiting and nothing has answered for far longer than usual."""
        if not self._stall.enabled:
            return False
        now = self._clock()
        if self.stalled_since is not None:
            if now - self.stalled_since < STALL_MAX_S:
                return True
            self.stalled_since = None
        if len(self._waiting) < self._stall.min_pending:
            return False
        oldest = next(iter(self._waiting.values()))
        if now - max(oldest, self.last_answer_at) < self.stall_after_s():
            return False
        self.stalled_since = now
        return True

    def _observe(self, sample: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
            return
        self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
        self._srtt = 0.875 * self._srtt + 0.125 * sample
