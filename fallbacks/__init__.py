"""The hospital's degraded paths (self-pay, local queue, stale cache, journal, notice).

Route tables name these fallbacks; the engine in :mod:`resilgate` runs them when no
endpoint of a route's upstream can serve. ``REGISTRY`` maps the names routes use to them.
"""

from __future__ import annotations

from collections.abc import Mapping

from fallbacks.journal import Journal
from fallbacks.local_queue import LocalQueue
from fallbacks.notice import Notice
from fallbacks.self_pay import SelfPay
from fallbacks.stale_cache import StaleCache
from resilgate.fallback import Fallback

REGISTRY: Mapping[str, type[Fallback]] = {
    fallback.name: fallback for fallback in (Journal, LocalQueue, Notice, SelfPay, StaleCache)
}
