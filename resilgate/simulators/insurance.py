"""The national medical-insurance (医保) platform: one envelope at ``POST /fsi/api/callService``.

``infno`` picks the transaction: 9001 sign-in, 1101 person info, 2201/2202 outpatient visit and
undo, 2203 visit info, 2204/2205 fee lines and undo, 2206 trial settlement (commits nothing),
2207/2208 settlement and undo, 2601 reversal by ``omsgid``/``oinfno`` (of a 2207 or 2208), 5203
settlement query (by ``setl_id``, or ``medins_setl_id``/``msgid`` = the 2207's msgid) and 3201
daily totals. Business errors are HTTP 200 with ``infcode`` "-1" and ``err_msg``; only a body
that is not a JSON object is an HTTP 400.

``msgid`` must be 30 characters: fixmedins code (12) + yyyyMMddHHmmss + 4-digit sequence. A
repeated ``msgid`` gets the stored answer of the first one, success or business error, and
nothing is applied again. Writes are logged with ``kind`` = the infno and ``key`` = the msgid.

Probe data: ``TEST0001`` (patient ``test-0001``) is insured and has an open visit
``MD250320001``; ``TEST0002`` is suspended: 1101 answers ``psn_insu_stas`` "2" with a
``paus_insu_date``, and 2201/2206/2207 for that person are business errors.
The ``platform_error`` fault answers an envelope with ``infcode`` "-1", ``err_msg``
``PLATFORM_ERROR_MSG`` and ``inf_refmsgid`` the request's msgid (if it has one); nothing is
applied and the msgid is not remembered, so a later retry with it is served afresh.
Fund share is 70 % for insutype 310 and 55 % for 390; the personal account pays what it can of
the rest when ``acct_used_flag`` is "1"; cash pays the remainder, so the parts always add up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from resilgate.simulators import SimulatorOptions
from resilgate.simulators.common import BadRequest, json_response, now_cn, read_json_object
from resilgate.simulators.faults import CONTROL, WriteLog, install_faults, unanswered
from resilgate.simulators.seed_data import ANCHOR_DAY, TEST_PERSON, Person, seed_people

CENT = Decimal("0.01")
FUND_SHARE = {"310": Decimal("0.70"), "390": Decimal("0.55")}
MSGID = re.compile(r"^[A-Za-z0-9]{12}\d{14}\d{4}$")
REVERSIBLE = ("2207", "2208")
TEST_VISIT = "MD250320001"
PLATFORM_ERROR_MSG = "系统异常，请稍后重试 platform error: simulated"
WRITE_INFNOS = ("2201", "2202", "2203", "2204", "2205", "2207", "2208", "2601")


class BusinessError(Exception):
    """A refusal the platform reports as ``infcode`` -1 with this message."""


@dataclass
class FeeBatch:
    chrg_bchno: str
    lines: list[dict[str, Any]]
    total: Decimal
    settled_by: str | None = None


@dataclass
class Visit:
    mdtrt_id: str
    psn_no: str
    insutype: str
    ipt_otp_no: str
    undone: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    batches: dict[str, FeeBatch] = field(default_factory=dict)


@dataclass
class Settlement:
    setl_id: str
    msgid: str
    visit: Visit
    chrg_bchno: str
    med_type: str
    medfee: Decimal
    fund: Decimal
    acct: Decimal
    cash: Decimal
    setl_time: datetime
    state: str = "settled"  # settled | cancelled (2208) | reversed (2601)


@dataclass
class _Answered:
    """What a msgid got the first time: replayed verbatim for a duplicate msgid."""

    infno: str
    answer: dict[str, Any]
    wrote: bool
    setl_id: str | None


def split_payment(
    total: Decimal, insutype: str, balance: Decimal, use_account: bool
) -> tuple[Decimal, Decimal, Decimal]:
    """(fund, personal account, cash) shares of ``total``; they always sum to ``total``."""
    fund = (total * FUND_SHARE.get(insutype, Decimal("0.50"))).quantize(CENT, ROUND_HALF_UP)
    rest = total - fund
    acct = min(rest, max(balance, Decimal(0))) if use_account else Decimal(0)
    return fund, acct, rest - acct


def _text(data: Mapping[str, Any], name: str, where: str = "input.data") -> str:
    value = data.get(name)
    if value is None or value == "":
        raise BusinessError(f"缺少必填字段 missing field {where}.{name}")
    if not isinstance(value, str | int):
        raise BusinessError(f"字段格式错误 {where}.{name} must be text")
    return str(value)


def _amount(data: Mapping[str, Any], name: str, where: str = "input.data") -> Decimal:
    value = data.get(name)
    if value is None or value == "":
        raise BusinessError(f"缺少必填字段 missing field {where}.{name}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BusinessError(f"字段格式错误 {where}.{name} must be an amount")
    try:
        amount = Decimal(str(value)).quantize(CENT, ROUND_HALF_UP)
    except InvalidOperation:
        raise BusinessError(f"字段格式错误 {where}.{name} must be an amount") from None
    if amount < 0:
        raise BusinessError(f"字段格式错误 {where}.{name} must not be negative")
    return amount


def _section(envelope: Mapping[str, Any], name: str) -> dict[str, Any]:
    inp = envelope.get("input")
    section = inp.get(name) if isinstance(inp, Mapping) else None
    if not isinstance(section, dict):
        raise BusinessError(f"缺少必填字段 missing field input.{name}")
    return section


def _money(value: Decimal) -> float:
    return float(value)


class InsurancePlatform:
    """Persons, visits, fee batches and settlements, driven by envelopes."""

    def __init__(self, seed: int, writes: WriteLog) -> None:
        self._writes = writes
        self.persons = {p.psn_no: p for p in seed_people(seed)}
        self._by_certno = {p.certno: p for p in self.persons.values()}
        self.balances = {p.psn_no: Decimal(p.account_balance) for p in self.persons.values()}
        self.visits: dict[str, Visit] = {
            TEST_VISIT: Visit(TEST_VISIT, TEST_PERSON.psn_no, TEST_PERSON.insutype, "OTP-TEST-1")
        }
        self.settlements: dict[str, Settlement] = {}
        self._answered: dict[str, _Answered] = {}
        self._seq = 0

    def __repr__(self) -> str:
        live = sum(1 for s in self.settlements.values() if s.state == "settled")
        return (
            f"<InsurancePlatform {len(self.visits)} visits, {live}/{len(self.settlements)} "
            f"settlements live, {len(self._answered)} msgids>"
        )

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def handle(self, envelope: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Answer one envelope; (answer, True if a 2207 settlement was committed by it)."""
        msgid = envelope.get("msgid")
        infno = envelope.get("infno")
        if not isinstance(msgid, str) or not MSGID.match(msgid):
            return self._envelope(
                BusinessError("报文ID格式错误 invalid msgid: 30 chars expected")
            ), False
        fixmedins = envelope.get("fixmedins_code")
        if isinstance(fixmedins, str) and fixmedins and not msgid.startswith(fixmedins):
            return self._envelope(
                BusinessError("报文ID与机构编码不符 msgid must start with fixmedins_code")
            ), False
        earlier = self._answered.get(msgid)
        if earlier is not None:
            if earlier.wrote:
                self._writes.duplicate(earlier.infno, msgid, infno=earlier.infno)
            return earlier.answer, False
        setl_id: str | None = None
        try:
            if not isinstance(infno, str):
                raise BusinessError("缺少交易编号 missing infno")
            output, setl_id = self._dispatch(infno, msgid, envelope)
            answer = self._envelope(output)
            wrote = infno in WRITE_INFNOS
        except BusinessError as exc:
            answer, wrote = self._envelope(exc), False
        kind = infno if isinstance(infno, str) else ""
        self._answered[msgid] = _Answered(kind, answer, wrote, setl_id)
        if wrote:
            details = {"infno": kind, **({"setl_id": setl_id} if setl_id else {})}
            self._writes.applied(kind, msgid, **details)
        return answer, wrote and kind == "2207"

    def _envelope(self, result: dict[str, Any] | BusinessError) -> dict[str, Any]:
        now = now_cn()
        stamp = now.strftime("%Y-%m-%d %H:%M:%S")
        failed = isinstance(result, BusinessError)
        return {
            "infcode": "-1" if failed else "0",
            "inf_refmsgid": f"310000{now:%Y%m%d%H%M%S}{self._next():010d}",
            "refmsg_time": stamp,
            "respond_time": stamp,
            "err_msg": str(result) if failed else None,
            "warn_msg": None,
            "output": {} if isinstance(result, BusinessError) else result,
        }

    def _dispatch(
        self, infno: str, msgid: str, envelope: Mapping[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        match infno:
            case "9001":
                return self._sign_in(envelope), None
            case "1101":
                return self._person_info(_section(envelope, "data")), None
            case "2201":
                return self._register(_section(envelope, "data")), None
            case "2202":
                return self._unregister(_section(envelope, "data")), None
            case "2203":
                return self._visit_info(_section(envelope, "mdtrtinfo")), None
            case "2204":
                return self._upload_fees(envelope), None
            case "2205":
                return self._undo_fees(_section(envelope, "data")), None
            case "2206":
                return self._settle(_section(envelope, "data"), msgid, commit=False), None
            case "2207":
                output = self._settle(_section(envelope, "data"), msgid, commit=True)
                return output, output["setlinfo"]["setl_id"]
            case "2208":
                return self._undo_settlement(_section(envelope, "data"), msgid)
            case "2601":
                return self._reverse(_section(envelope, "data"))
            case "5203":
                return self._query_settlement(_section(envelope, "data")), None
            case "3201":
                return self._daily_totals(_section(envelope, "data")), None
        raise BusinessError(f"不支持的交易 unsupported infno {infno}")

    def _person(self, psn_no: str) -> Person:
        person = self.persons.get(psn_no)
        if person is None:
            raise BusinessError(f"未查询到参保人 unknown psn_no {psn_no}")
        return person

    def _insured(self, psn_no: str) -> Person:
        person = self._person(psn_no)
        if person.suspended:
            raise BusinessError(f"参保人待遇暂停 insurance of {psn_no} is suspended")
        return person

    def _visit(self, data: Mapping[str, Any], where: str = "input.data") -> Visit:
        mdtrt_id = _text(data, "mdtrt_id", where)
        visit = self.visits.get(mdtrt_id)
        if visit is None:
            raise BusinessError(f"就诊信息不存在 unknown mdtrt_id {mdtrt_id}")
        if data.get("psn_no") and data["psn_no"] != visit.psn_no:
            raise BusinessError(f"就诊 {mdtrt_id} 不属于 {data['psn_no']}")
        if visit.undone:
            raise BusinessError(f"就诊已撤销 visit {mdtrt_id} was undone")
        return visit

    def _sign_in(self, envelope: Mapping[str, Any]) -> dict[str, Any]:
        sign_in = _section(envelope, "signIn")
        _text(sign_in, "opter_no", "input.signIn")
        now = now_cn()
        return {
            "signinoutb": {
                "sign_time": now.strftime("%Y-%m-%d %H:%M:%S"),
                "sign_no": f"SN{now:%Y%m%d}{self._next():08d}",
            }
        }

    def _person_info(self, data: Mapping[str, Any]) -> dict[str, Any]:
        key = data.get("psn_no") or data.get("mdtrt_cert_no") or data.get("certno")
        if not key:
            raise BusinessError("缺少必填字段 missing field input.data.psn_no or mdtrt_cert_no")
        person = self.persons.get(str(key)) or self._by_certno.get(str(key))
        if person is None:
            raise BusinessError(f"未查询到参保人 unknown person {key}")
        age = ANCHOR_DAY.year - person.birth_date.year
        return {
            "baseinfo": {
                "psn_no": person.psn_no,
                "psn_cert_type": "01",
                "certno": person.certno,
                "psn_name": person.name,
                "gend": "1" if person.gender == "male" else "2",
                "naty": "01",
                "brdy": person.birth_date.isoformat(),
                "age": age,
            },
            "insuinfo": [
                {
                    "balc": _money(self.balances[person.psn_no]),
                    "insutype": person.insutype,
                    "psn_type": "11" if person.insutype == "310" else "1",
                    "psn_insu_stas": "2" if person.suspended else "1",
                    "psn_insu_date": "2010-01-01",
                    "paus_insu_date": "2025-01-01" if person.suspended else None,
                    "insuplc_admdvs": "310000",
                }
            ],
            "idetinfo": [],
        }

    def _register(self, data: Mapping[str, Any]) -> dict[str, Any]:
        person = self._insured(_text(data, "psn_no"))
        insutype = _text(data, "insutype")
        if insutype != person.insutype:
            raise BusinessError(f"险种不匹配 {person.psn_no} is insured under {person.insutype}")
        ipt_otp_no = _text(data, "ipt_otp_no")
        mdtrt_id = f"MD{now_cn():%y%m%d}{self._next():05d}"
        self.visits[mdtrt_id] = Visit(mdtrt_id, person.psn_no, insutype, ipt_otp_no)
        return {"data": {"mdtrt_id": mdtrt_id, "psn_no": person.psn_no, "ipt_otp_no": ipt_otp_no}}

    def _unregister(self, data: Mapping[str, Any]) -> dict[str, Any]:
        visit = self._visit(data)
        if any(s.visit is visit and s.state == "settled" for s in self.settlements.values()):
            raise BusinessError(f"已结算，请先撤销结算 visit {visit.mdtrt_id} is settled")
        visit.undone = True
        return {}

    def _visit_info(self, info: dict[str, Any]) -> dict[str, Any]:
        visit = self._visit(info, "input.mdtrtinfo")
        _text(info, "med_type", "input.mdtrtinfo")
        visit.info = dict(info)
        return {}

    def _upload_fees(self, envelope: Mapping[str, Any]) -> dict[str, Any]:
        inp = envelope.get("input")
        lines = inp.get("feedetail") if isinstance(inp, Mapping) else None
        if not isinstance(lines, list) or not lines:
            raise BusinessError("缺少必填字段 missing field input.feedetail")
        if not all(isinstance(line, dict) for line in lines):
            raise BusinessError("字段格式错误 input.feedetail must hold objects")
        where = "input.feedetail[]"
        visit = self._visit(lines[0], where)
        bchno = _text(lines[0], "chrg_bchno", where)
        total = Decimal(0)
        result = []
        for line in lines:
            if line.get("mdtrt_id") != visit.mdtrt_id or line.get("chrg_bchno") != bchno:
                raise BusinessError("一个批次只能属于一个就诊 one batch, one mdtrt_id")
            amount = _amount(line, "det_item_fee_sumamt", where)
            total += amount
            result.append(
                {
                    "feedetl_sn": _text(line, "feedetl_sn", where),
                    "det_item_fee_sumamt": _money(amount),
                    "cnt": line.get("cnt"),
                    "pric": line.get("pric"),
                    "fulamt_ownpay_amt": 0.0,
                    "overlmt_amt": 0.0,
                    "preselfpay_amt": 0.0,
                    "inscp_scp_amt": _money(amount),
                    "chrgitm_lv": "01",
                }
            )
        if bchno in visit.batches:
            raise BusinessError(f"收费批次已上传 batch {bchno} exists; undo it with 2205 first")
        visit.batches[bchno] = FeeBatch(bchno, [dict(line) for line in lines], total)
        return {"result": result}

    def _undo_fees(self, data: Mapping[str, Any]) -> dict[str, Any]:
        visit = self._visit(data)
        bchno = _text(data, "chrg_bchno")
        batch = visit.batches.get(bchno)
        if batch is None:
            raise BusinessError(f"收费批次不存在 unknown chrg_bchno {bchno}")
        if batch.settled_by:
            raise BusinessError(f"已结算 batch {bchno} is settled as {batch.settled_by}")
        del visit.batches[bchno]
        return {}

    def _settle(self, data: Mapping[str, Any], msgid: str, commit: bool) -> dict[str, Any]:
        person = self._insured(_text(data, "psn_no"))
        visit = self._visit(data)
        bchno = _text(data, "chrg_bchno")
        total = _amount(data, "medfee_sumamt")
        batch = visit.batches.get(bchno)
        if batch is not None and batch.total != total:
            raise BusinessError(
                f"费用总额不一致 medfee_sumamt {total} != uploaded batch total {batch.total}"
            )
        if commit:
            done = self._live_settlement(visit, bchno)
            if done is not None:
                raise BusinessError(f"重复结算 batch {bchno} is already settled as {done.setl_id}")
        balance = self.balances[person.psn_no]
        use_account = str(data.get("acct_used_flag", "0")) == "1"
        fund, acct, cash = split_payment(total, visit.insutype, balance, use_account)
        med_type = str(data.get("med_type") or "11")
        now = now_cn()
        setlinfo: dict[str, Any] = {
            "setl_id": None,
            "mdtrt_id": visit.mdtrt_id,
            "psn_no": person.psn_no,
            "psn_name": person.name,
            "insutype": visit.insutype,
            "med_type": med_type,
            "medfee_sumamt": _money(total),
            "inscp_scp_amt": _money(total),
            "fund_pay_sumamt": _money(fund),
            "hifp_pay": _money(fund),
            "acct_pay": _money(acct),
            "psn_cash_pay": _money(cash),
            "psn_part_amt": _money(acct + cash),
            "balc": _money(balance - acct),
            "medins_setl_id": None,
            "setl_time": now.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if commit:
            settlement = Settlement(
                f"S{now:%y%m%d}{self._next():06d}",
                msgid,
                visit,
                bchno,
                med_type,
                total,
                fund,
                acct,
                cash,
                now,
            )
            self.settlements[settlement.setl_id] = settlement
            self.balances[person.psn_no] = balance - acct
            if batch is not None:
                batch.settled_by = settlement.setl_id
            setlinfo["setl_id"] = settlement.setl_id
            setlinfo["medins_setl_id"] = msgid
        detail = [{"fund_pay_type": "310100", "fund_payamt": _money(fund)}]
        return {"setlinfo": setlinfo, "setldetail": detail}

    def _live_settlement(self, visit: Visit, bchno: str) -> Settlement | None:
        return next(
            (
                s
                for s in self.settlements.values()
                if s.visit is visit and s.chrg_bchno == bchno and s.state == "settled"
            ),
            None,
        )

    def _settlement_json(self, s: Settlement) -> dict[str, Any]:
        person = self.persons[s.visit.psn_no]
        return {
            "setl_id": s.setl_id,
            "mdtrt_id": s.visit.mdtrt_id,
            "psn_no": person.psn_no,
            "psn_name": person.name,
            "insutype": s.visit.insutype,
            "med_type": s.med_type,
            "medfee_sumamt": _money(s.medfee),
            "fund_pay_sumamt": _money(s.fund),
            "acct_pay": _money(s.acct),
            "psn_cash_pay": _money(s.cash),
            "medins_setl_id": s.msgid,
            "setl_time": s.setl_time.strftime("%Y-%m-%d %H:%M:%S"),
            "vali_flag": "1" if s.state == "settled" else "0",
            "setl_state": s.state,
        }

    def _set_state(self, settlement: Settlement, state: str) -> None:
        """Move a settlement between live and undone, keeping the account balance right."""
        psn_no = settlement.visit.psn_no
        if state == "settled":
            self.balances[psn_no] -= settlement.acct
        elif settlement.state == "settled":
            self.balances[psn_no] += settlement.acct
        settlement.state = state
        batch = settlement.visit.batches.get(settlement.chrg_bchno)
        if batch is not None:
            batch.settled_by = settlement.setl_id if state == "settled" else None

    def _undo_settlement(
        self, data: Mapping[str, Any], msgid: str
    ) -> tuple[dict[str, Any], str | None]:
        setl_id = _text(data, "setl_id")
        settlement = self.settlements.get(setl_id)
        if settlement is None:
            raise BusinessError(f"结算信息不存在 unknown setl_id {setl_id}")
        if data.get("mdtrt_id") and data["mdtrt_id"] != settlement.visit.mdtrt_id:
            raise BusinessError(f"结算 {setl_id} 不属于就诊 {data['mdtrt_id']}")
        if settlement.state != "settled":
            raise BusinessError(
                f"结算已{settlement.state} settlement {setl_id} is {settlement.state}"
            )
        self._set_state(settlement, "cancelled")
        now = now_cn()
        return {
            "setlinfo": {
                "setl_id": f"S{now:%y%m%d}{self._next():06d}",
                "orig_setl_id": setl_id,
                "mdtrt_id": settlement.visit.mdtrt_id,
                "psn_no": settlement.visit.psn_no,
                "medfee_sumamt": _money(-settlement.medfee),
                "fund_pay_sumamt": _money(-settlement.fund),
                "acct_pay": _money(-settlement.acct),
                "psn_cash_pay": _money(-settlement.cash),
                "medins_setl_id": msgid,
                "setl_time": now.strftime("%Y-%m-%d %H:%M:%S"),
            }
        }, setl_id

    def _reverse(self, data: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        omsgid = _text(data, "omsgid")
        oinfno = _text(data, "oinfno")
        if oinfno not in REVERSIBLE:
            raise BusinessError(f"交易不可冲正 infno {oinfno} cannot be reversed here")
        original = self._answered.get(omsgid)
        if original is None:
            raise BusinessError(f"原交易不存在 no message {omsgid} was received")
        if original.infno != oinfno:
            raise BusinessError(f"原交易编号不符 {omsgid} was a {original.infno}")
        if original.answer["infcode"] != "0" or original.setl_id is None:
            raise BusinessError(f"原交易未成功 {omsgid} failed; nothing to reverse")
        settlement = self.settlements[original.setl_id]
        if oinfno == "2207":
            if settlement.state != "settled":
                raise BusinessError(
                    f"结算已{settlement.state} {settlement.setl_id} is {settlement.state}"
                )
            self._set_state(settlement, "reversed")
        else:
            if settlement.state != "cancelled":
                raise BusinessError(f"撤销已冲正 {settlement.setl_id} is {settlement.state}")
            if self._live_settlement(settlement.visit, settlement.chrg_bchno) is not None:
                raise BusinessError(f"批次已重新结算 {settlement.chrg_bchno} was settled again")
            self._set_state(settlement, "settled")
        output = {"data": {"omsgid": omsgid, "oinfno": oinfno, "setl_id": settlement.setl_id}}
        return output, settlement.setl_id

    def _query_settlement(self, data: Mapping[str, Any]) -> dict[str, Any]:
        setl_id = data.get("setl_id")
        by_msgid = data.get("medins_setl_id") or data.get("msgid")
        if setl_id:
            settlement = self.settlements.get(str(setl_id))
        elif by_msgid:
            settlement = next((s for s in self.settlements.values() if s.msgid == by_msgid), None)
        else:
            raise BusinessError("缺少必填字段 missing field input.data.setl_id or medins_setl_id")
        if settlement is None:
            raise BusinessError(f"结算信息不存在 no settlement for {setl_id or by_msgid}")
        if data.get("psn_no") and data["psn_no"] != settlement.visit.psn_no:
            raise BusinessError(f"结算 {settlement.setl_id} 不属于 {data['psn_no']}")
        detail = [{"fund_pay_type": "310100", "fund_payamt": _money(settlement.fund)}]
        return {"setlinfo": self._settlement_json(settlement), "setldetail": detail}

    def _daily_totals(self, data: Mapping[str, Any]) -> dict[str, Any]:
        today = now_cn().date()
        try:
            begin = date.fromisoformat(str(data.get("stmt_begndate") or today))
            end = date.fromisoformat(str(data.get("stmt_enddate") or begin))
        except ValueError:
            raise BusinessError(
                "字段格式错误 stmt_begndate/stmt_enddate must be YYYY-MM-DD"
            ) from None
        claimed = {
            "medfee_sumamt": _amount(data, "medfee_sumamt"),
            "fund_pay_sumamt": _amount(data, "fund_pay_sumamt"),
            "acct_pay": _amount(data, "acct_pay"),
            "fixmedins_setl_cnt": Decimal(_text(data, "fixmedins_setl_cnt")),
        }
        live = [
            s
            for s in self.settlements.values()
            if s.state == "settled"
            and begin <= s.setl_time.date() <= end
            and data.get("insutype") in (None, "", s.visit.insutype)
        ]
        platform = {
            "medfee_sumamt": sum((s.medfee for s in live), Decimal(0)),
            "fund_pay_sumamt": sum((s.fund for s in live), Decimal(0)),
            "acct_pay": sum((s.acct for s in live), Decimal(0)),
            "fixmedins_setl_cnt": Decimal(len(live)),
        }
        differ = [name for name in platform if platform[name] != claimed[name]]
        return {
            "stmtinfo": {
                "setl_optins": data.get("setl_optins") or "310000",
                "stmt_rslt": "1" if differ else "0",
                "stmt_rslt_dscr": f"不平 differs: {', '.join(differ)}" if differ else "平",
                "medfee_sumamt": _money(platform["medfee_sumamt"]),
                "fund_pay_sumamt": _money(platform["fund_pay_sumamt"]),
                "acct_pay": _money(platform["acct_pay"]),
                "fixmedins_setl_cnt": len(live),
            }
        }


PLATFORM = web.AppKey("insurance_platform", InsurancePlatform)


async def call_service(request: web.Request) -> web.Response:
    try:
        envelope = await read_json_object(request)
    except BadRequest as exc:
        return json_response({"infcode": "-1", "err_msg": str(exc), "output": {}}, status=400)
    answer, committed = request.app[PLATFORM].handle(envelope)
    control = request.app[CONTROL]
    # commit_then_hang: the settlement above is committed; the caller never hears of it.
    hanging = committed and control.hang_applies(request.path)
    if hanging and not await control.hang(request, "commit_then_hang"):
        return unanswered()
    return json_response(answer)


async def platform_error(request: web.Request) -> web.Response:
    """The platform's own failure: HTTP 200 with an error envelope, nothing applied."""
    try:
        msgid = (await read_json_object(request)).get("msgid")
    except BadRequest:
        msgid = None
    return json_response(
        {
            "infcode": "-1",
            "err_msg": PLATFORM_ERROR_MSG,
            "inf_refmsgid": msgid if isinstance(msgid, str) else None,
            "output": {},
        }
    )


def build_app(options: SimulatorOptions) -> web.Application:
    app = web.Application()
    control = install_faults(app, options, platform_error=platform_error)
    app[PLATFORM] = InsurancePlatform(options.seed, control.writes)
    app.router.add_post("/fsi/api/callService", call_service)
    return app
