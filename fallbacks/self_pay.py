"""``self-pay``: insurance settlement is down: the patient pays in full now, the claim is re-settled later."""

from __future__ import annotations

from resilgate.fallback import Fallback


class SelfPay(Fallback):
    name = "self-pay"
