"""One request's outcome, as the public app hands it to metrics, incident counting and drills."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How one request to the public listener ended."""

    route: str | None  # route name, None if no route matched
    criticality: str | None  # "core" | "support" | "reporting"
    upstream: str | None  # the route's upstream name
    served_by: str | None  # endpoint label ("his/primary") that answered, None if none
    degraded: str | None  # the fallback that answered, else None
    status: int
    duration_s: float
    at: float  # time.time() when the answer was complete

    @property
    def affected(self) -> bool:
        """Failed or degraded: counts toward the incident share."""
        return self.degraded is not None or self.status >= 500
