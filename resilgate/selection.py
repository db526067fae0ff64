"""Endpoint choice: which endpoints a request tries, in order. Pure; the caller supplies the
state of each endpoint and a random draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from resilgate.state.records import ModeName
from resilgate.upstream import Endpoint


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint as the choice sees it."""

    endpoint: Endpoint
    share: float  # of traffic it may take: 0 down or holding down, <1 ramping, 1 fully back
    admits: bool  # its breaker would let a call through now
    full: bool  # its bulkhead is full
    stalled: bool  # it has stopped answering
    fenced: bool  # ops put it in maintenance
    holding: bool = False  # back and healthy, but still in its failback hold-down


def plan(
    candidates: Sequence[Candidate], *, write: bool, forced: ModeName | None, draw: float
) -> list[Endpoint]:
    """The endpoints to try, best first; empty when none may take the request.

    Lowest priority number first among endpoints whose breaker admits and whose share is
    above zero; a write never goes to a ``read_only`` endpoint; a fenced endpoint is never
    used. An endpoint ramping up after recovery comes first for ``share`` of requests
    (``draw`` in [0, 1)), otherwise right after the next one. A stalled endpoint goes last; a
    full one is skipped. When nothing else may take the request, an endpoint still in its
    hold-down does (the hold-down keeps traffic from flapping back, not from the only site that
    can answer). Ops' forced ``primary`` uses the lowest priority tier whatever its health;
    ``dr`` skips the primary tier (priority 0).
    """
    usable = [c for c in candidates if not c.fenced and not (write and c.endpoint.read_only)]
    if forced == "primary" and usable:
        tier = min(c.endpoint.priority for c in usable)
        return [c.endpoint for c in usable if c.endpoint.priority == tier and not c.full]
    if forced == "dr":
        usable = [c for c in usable if c.endpoint.priority > 0]
    ready = [c for c in usable if c.share > 0 and c.admits and not c.full]
    if not ready:
        ready = [c for c in usable if c.holding and c.admits and not c.full]
    ready.sort(key=lambda c: (c.stalled, c.endpoint.priority))
    if len(ready) > 1 and not ready[1].stalled and draw >= ready[0].share:
        ready[0], ready[1] = ready[1], ready[0]
    return [c.endpoint for c in ready]
