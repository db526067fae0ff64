"""``journal``: HIS writes are down: journaled, acknowledged with a ticket, replayed exactly once."""

from __future__ import annotations

from resilgate.fallback import Fallback


class Journal(Fallback):
    name = "journal"
