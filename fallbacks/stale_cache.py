"""``stale-cache``: HIS reads are down: earlier reads, encrypted and per caller, served stale."""

from __future__ import annotations

from resilgate.fallback import Fallback


class StaleCache(Fallback):
    name = "stale-cache"
