"""``local-queue``: registration is down: the gateway issues queue numbers itself."""

from __future__ import annotations

from resilgate.fallback import Fallback


class LocalQueue(Fallback):
    name = "local-queue"
