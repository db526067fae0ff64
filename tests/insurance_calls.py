"""Insurance envelopes (DOMAIN.md section 3.1) as the tests send them."""

from __future__ import annotations

from typing import Any

FIXMEDINS = "H31010400001"


def envelope(infno: str, msgid: str, data: Any, *, section: str = "data") -> dict[str, Any]:
    """One call of a kiosk at the test institution."""
    return {
        "infno": infno,
        "msgid": msgid,
        "inf_time": "2025-03-20 09:12:00",
        "fixmedins_code": FIXMEDINS,
        "opter": "kiosk-07",
        "opter_type": "2",
        "insuplc_admdvs": "310000",
        "input": {section: data},
    }


def settle_input(
    amount: float,
    bchno: str,
    mdtrt_id: str = "MD250320001",
    *,
    psn_no: str = "TEST0001",
    acct_used_flag: str = "1",
) -> dict[str, Any]:
    """The ``input.data`` of a trial (2206) or real (2207) settlement."""
    return {
        "psn_no": psn_no,
        "mdtrt_id": mdtrt_id,
        "chrg_bchno": bchno,
        "medfee_sumamt": amount,
        "insutype": "310",
        "med_type": "11",
        "acct_used_flag": acct_used_flag,
    }
