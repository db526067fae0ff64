"""The medical-insurance platform simulator, over real HTTP."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from tests.insurance_calls import FIXMEDINS, envelope, settle_input


def today_cn() -> str:
    """The simulator's day (Asia/Shanghai), read when a test runs, not when it is collected."""
    return datetime.now(timezone(timedelta(hours=8))).date().isoformat()


class Caller:
    """Sends envelopes with fresh, well-formed msgids to one simulator."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self._seq: Iterator[int] = itertools.count(1)

    def msgid(self) -> str:
        return f"{FIXMEDINS}20250320091200{next(self._seq):04d}"

    async def __call__(
        self,
        infno: str,
        data: Any = None,
        *,
        msgid: str | None = None,
        section: str = "data",
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> dict[str, Any]:
        call = envelope(infno, msgid or self.msgid(), data or {}, section=section)
        async with self.http.post(
            f"{self.url}/fsi/api/callService", json=call, timeout=client_timeout
        ) as response:
            assert response.status == 200  # business errors too
            answer: dict[str, Any] = await response.json()
            return answer

    async def writes(self) -> dict[str, list[dict[str, Any]]]:
        async with self.http.get(f"{self.url}/_sim/writes") as response:
            log: dict[str, list[dict[str, Any]]] = await response.json()
            return log


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["infcode"] == "0", answer["err_msg"]
    output: dict[str, Any] = answer["output"]
    return output


def parts_add_up(setlinfo: dict[str, Any]) -> bool:
    parts = (setlinfo[k] for k in ("fund_pay_sumamt", "acct_pay", "psn_cash_pay"))
    return sum(Decimal(str(p)) for p in parts) == Decimal(str(setlinfo["medfee_sumamt"]))


async def test_sign_in_and_person_info(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        signed = ok(await call("9001", {"opter_no": "kiosk-07"}, section="signIn"))
        assert signed["signinoutb"]["sign_no"]
        person = ok(await call("1101", {"mdtrt_cert_type": "02", "mdtrt_cert_no": "TEST0001"}))
        assert person["baseinfo"]["psn_name"] == "测试患者"
        assert person["insuinfo"][0]["psn_insu_stas"] == "1"
        assert person["insuinfo"][0]["balc"] == 1000.0
        suspended = ok(await call("1101", {"psn_no": "TEST0002"}))
        assert suspended["insuinfo"][0]["psn_insu_stas"] == "2"
        assert suspended["insuinfo"][0]["paus_insu_date"]
        by_certno = ok(await call("1101", {"mdtrt_cert_no": person["baseinfo"]["certno"]}))
        assert by_certno["baseinfo"]["psn_no"] == "TEST0001"


async def test_outpatient_visit_from_registration_to_daily_totals(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        registered = ok(
            await call("2201", {"psn_no": "TEST0001", "insutype": "310", "ipt_otp_no": "O-1"})
        )
        mdtrt_id = registered["data"]["mdtrt_id"]
        ok(
            await call(
                "2203",
                {"mdtrt_id": mdtrt_id, "psn_no": "TEST0001", "med_type": "11", "dise_codg": "I10"},
                section="mdtrtinfo",
            )
        )
        lines = [
            {
                "feedetl_sn": f"F{n}",
                "mdtrt_id": mdtrt_id,
                "psn_no": "TEST0001",
                "chrg_bchno": "CB1",
                "det_item_fee_sumamt": amount,
                "cnt": 1,
                "pric": amount,
            }
            for n, amount in enumerate((200.00, 36.50))
        ]
        fees = ok(await call("2204", lines, section="feedetail"))
        assert len(fees["result"]) == 2

        trial = ok(await call("2206", settle_input(236.50, "CB1", mdtrt_id)))
        assert trial["setlinfo"]["setl_id"] is None
        assert parts_add_up(trial["setlinfo"])
        wrong_total = await call("2206", settle_input(236.00, "CB1", mdtrt_id))
        assert wrong_total["infcode"] == "-1"

        settle_msgid = call.msgid()
        settled = ok(await call("2207", settle_input(236.50, "CB1", mdtrt_id), msgid=settle_msgid))
        setlinfo = settled["setlinfo"]
        assert setlinfo["medins_setl_id"] == settle_msgid
        assert parts_add_up(setlinfo)
        assert {k: setlinfo[k] for k in ("fund_pay_sumamt", "acct_pay")} == {
            k: trial["setlinfo"][k] for k in ("fund_pay_sumamt", "acct_pay")
        }
        by_id = ok(await call("5203", {"setl_id": setlinfo["setl_id"]}))
        by_msgid = ok(await call("5203", {"medins_setl_id": settle_msgid}))
        assert by_id == by_msgid
        assert by_id["setlinfo"]["setl_state"] == "settled"

        today = today_cn()
        totals = {
            "stmt_begndate": today,
            "stmt_enddate": today,
            "medfee_sumamt": 236.50,
            "fund_pay_sumamt": setlinfo["fund_pay_sumamt"],
            "acct_pay": setlinfo["acct_pay"],
            "fixmedins_setl_cnt": 1,
        }
        assert ok(await call("3201", totals))["stmtinfo"]["stmt_rslt"] == "0"

        ok(await call("2208", {"setl_id": setlinfo["setl_id"], "mdtrt_id": mdtrt_id}))
        after_undo = ok(await call("5203", {"setl_id": setlinfo["setl_id"]}))
        assert after_undo["setlinfo"]["vali_flag"] == "0"
        unbalanced = ok(await call("3201", totals))["stmtinfo"]
        assert (unbalanced["stmt_rslt"], unbalanced["fixmedins_setl_cnt"]) == ("1", 0)
        log = await call.writes()
    assert [w["kind"] for w in log["writes"]] == ["2201", "2203", "2204", "2207", "2208"]
    assert log["writes"][3]["key"] == settle_msgid


async def test_duplicate_msgid_returns_the_first_answer_without_paying_twice(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        msgid = call.msgid()
        first = await call("2207", settle_input(100, "CB-dup"), msgid=msgid)
        second = await call("2207", settle_input(100, "CB-dup"), msgid=msgid)
        assert ok(first) and second == first
        again = await call("2207", settle_input(100, "CB-dup"))
        assert again["infcode"] == "-1"
        assert first["output"]["setlinfo"]["setl_id"] in again["err_msg"]
        person = ok(await call("1101", {"psn_no": "TEST0001"}))
        log = await call.writes()
    assert person["insuinfo"][0]["balc"] == 1000.0 - first["output"]["setlinfo"]["acct_pay"]
    assert [w["key"] for w in log["writes"]] == [msgid]
    assert [d["key"] for d in log["duplicates"]] == [msgid]


@pytest.mark.parametrize(
    ("infno", "data", "msgid", "reason"),
    [
        ("1101", {"psn_no": "NOBODY"}, None, "unknown person NOBODY"),
        ("9999", {}, None, "unsupported infno 9999"),
        ("2207", {"psn_no": "TEST0001", "mdtrt_id": "MD250320001"}, None, "chrg_bchno"),
        ("2207", settle_input(10, "CB"), "H31010400001-too-short", "invalid msgid"),
        ("2207", settle_input(10, "CB", "MD000000000"), None, "unknown mdtrt_id MD000000000"),
        ("2206", {**settle_input(10, "CB"), "psn_no": "TEST0002"}, None, "suspended"),
        (
            "2601",
            {"omsgid": "H31010400001202503209999990001", "oinfno": "2207"},
            None,
            "原交易不存在",
        ),
    ],
)
async def test_business_errors_are_http_200_with_infcode(
    spawn: Any, infno: str, data: dict[str, Any], msgid: str | None, reason: str
) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        answer = await call(infno, data, msgid=msgid)
        assert answer["infcode"] == "-1"
        assert reason in answer["err_msg"]
        assert (await call.writes())["writes"] == []


async def test_a_body_that_is_not_json_is_an_http_400(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sim.url()}/fsi/api/callService", data=b"<xml/>") as response,
    ):
        assert response.status == 400
        assert (await response.json())["infcode"] == "-1"


async def test_reversal_by_original_msgid_undoes_the_settlement_once(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        msgid = call.msgid()
        setl_id = ok(await call("2207", settle_input(50, "CB-r"), msgid=msgid))["setlinfo"][
            "setl_id"
        ]
        reversal = {"psn_no": "TEST0001", "omsgid": msgid, "oinfno": "2207"}
        assert ok(await call("2601", reversal))["data"]["setl_id"] == setl_id
        assert (await call("2601", reversal))["infcode"] == "-1"
        assert (await call("2601", {**reversal, "oinfno": "2208"}))["infcode"] == "-1"
        queried = ok(await call("5203", {"setl_id": setl_id}))["setlinfo"]
        assert (queried["setl_state"], queried["vali_flag"]) == ("reversed", "0")
        person = ok(await call("1101", {"psn_no": "TEST0001"}))
        assert person["insuinfo"][0]["balc"] == 1000.0
        resettled = await call("2207", settle_input(50, "CB-r"))
        assert ok(resettled)["setlinfo"]["setl_id"] != setl_id
        log = await call.writes()
    assert [w["kind"] for w in log["writes"]] == ["2207", "2601", "2207"]


async def test_fee_batches_undo_then_reupload_and_visit_undo(spawn: Any) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        mdtrt_id = ok(
            await call("2201", {"psn_no": "TEST0001", "insutype": "310", "ipt_otp_no": "O-2"})
        )["data"]["mdtrt_id"]
        line = {
            "feedetl_sn": "F1",
            "mdtrt_id": mdtrt_id,
            "chrg_bchno": "CB2",
            "det_item_fee_sumamt": 12.3,
        }
        ok(await call("2204", [line], section="feedetail"))
        assert (await call("2204", [line], section="feedetail"))["infcode"] == "-1"
        ok(await call("2205", {"mdtrt_id": mdtrt_id, "chrg_bchno": "CB2"}))
        ok(await call("2204", [{**line, "det_item_fee_sumamt": 15}], section="feedetail"))
        assert ok(await call("2206", settle_input(15, "CB2", mdtrt_id)))["setlinfo"]
        ok(await call("2202", {"psn_no": "TEST0001", "mdtrt_id": mdtrt_id}))
        after = await call("2206", settle_input(15, "CB2", mdtrt_id))
        assert after["infcode"] == "-1"
        assert "undone" in after["err_msg"]


async def test_commit_then_hang_commits_a_settlement_the_caller_never_hears_of(
    spawn: Any,
) -> None:
    sim = spawn.simulator("insurance")
    async with aiohttp.ClientSession() as http:
        call = Caller(http, sim.url())
        async with http.put(
            f"{sim.url()}/_sim/fault", json={"mode": "commit_then_hang"}
        ) as response:
            assert response.status == 200
        assert ok(await call("2206", settle_input(80, "CB-h")))["setlinfo"]  # not a commit
        msgid = call.msgid()
        with pytest.raises(TimeoutError):
            await call(
                "2207",
                settle_input(80, "CB-h"),
                msgid=msgid,
                client_timeout=aiohttp.ClientTimeout(total=0.5),
            )
        found = ok(await call("5203", {"medins_setl_id": msgid}))["setlinfo"]
        assert (found["setl_state"], found["medfee_sumamt"]) == ("settled", 80.0)
        assert [w["key"] for w in (await call.writes())["writes"]] == [msgid]

        async with http.delete(f"{sim.url()}/_sim/fault"):
            pass
        replayed = ok(await call("2207", settle_input(80, "CB-h"), msgid=msgid))
        assert replayed["setlinfo"]["setl_id"] == found["setl_id"]
        log = await call.writes()
    assert len(log["writes"]) == 1
    assert [d["key"] for d in log["duplicates"]] == [msgid]
