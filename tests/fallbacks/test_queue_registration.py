"""A local registration: checked like the registration system checks it, kept in the journal,
shown on the board, and its back-entry outcome classified."""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson
import pytest

from fallbacks.queue_board import board, call_answer, decode_called, next_waiting, queue_of
from fallbacks.queue_registration import (
    Invalid,
    LocalRegistration,
    check_registration,
    fingerprint,
    keyed_tickets,
    mask,
    replay_outcome,
    slot_day,
)
from resilgate.sealing import parse_keyring

BODY = {
    "patientId": "p-10086",
    "dept": "NEI",
    "doctorId": "d-01",
    "slotId": "NEI-walk-in",
    "payType": "insured",
    "channel": "window",
}


def reg(ticket: str, number: int, at: float, dept: str = "NEI", day: str = "2025-03-20") -> Any:
    fields = {**BODY, "dept": dept}
    return LocalRegistration(
        ticket, dept, day, number, f"L-{dept}-{number:04d}", fields, "p*****6", "fp", at
    )


def test_the_board_masks_names_as_display_boards_do() -> None:
    assert [mask(t) for t in ("张建华", "张三", "欧阳小明", "p-10086", "x")] == [
        "张*华", "张*", "欧**明", "p*****6", "*",
    ]  # fmt: skip


def test_a_registration_is_checked_like_the_system_checks_it() -> None:
    fields, shown = check_registration(orjson.dumps(BODY))
    assert fields == BODY and shown == "p*****6"
    _, shown = check_registration(orjson.dumps({**BODY, "patientName": "张建华"}))
    assert shown == "张*华"
    refused = {
        b"not json": "bad_request",
        b"[1]": "bad_request",
        orjson.dumps({**BODY, "slotId": ""}): "missing_fields",
        orjson.dumps({**BODY, "doctorId": 7}): "invalid_fields",
        orjson.dumps({**BODY, "payType": "cash"}): "invalid_pay_type",
        orjson.dumps({**BODY, "dept": "../x"}): "unknown_dept",
    }
    for raw, code in refused.items():
        with pytest.raises(Invalid) as caught:
            check_registration(raw)
        assert caught.value.code == code
        assert caught.value.answer()["code"] == code


def test_a_schedule_slot_names_its_day() -> None:
    assert slot_day("NEI-20250320-d-01-AM", "NEI") == date(2025, 3, 20)
    assert slot_day("NEI-walk-in", "NEI") is None
    assert slot_day("WAI-20250320-d-05-AM", "NEI") is None
    assert slot_day("NEI-20251340-d-01-AM", "NEI") is None


def test_a_retry_with_the_same_key_gets_the_same_ticket_and_fingerprint() -> None:
    plain = keyed_tickets("reg", "k1", None)
    assert plain == keyed_tickets("reg", "k1", None) != keyed_tickets("reg", "k2", None)
    assert keyed_tickets("reg", "k1", None) != keyed_tickets("other", "k1", None)
    old_key, new_key = f"k1:{'A' * 43}=", f"k2:{'B' * 43}="
    old = parse_keyring(old_key, "test")
    (keyed,) = keyed_tickets("reg", "k1", old)
    assert keyed.startswith("R-K-") and len(keyed) == len(plain[0]) and (keyed,) != plain
    assert keyed_tickets("reg", "k2", old) != (keyed,)
    # Rotated: new registrations go under the new key's ticket, retries are found under both.
    rotated = keyed_tickets("reg", "k1", parse_keyring(f"{new_key},{old_key}", "test"))
    assert len(rotated) == 2 and rotated[1] == keyed != rotated[0]
    assert fingerprint(BODY) == fingerprint(dict(reversed(BODY.items())))
    assert fingerprint(BODY) != fingerprint({**BODY, "payType": "self-pay"})


def test_the_journal_payload_reads_back_and_other_payloads_are_not_ours() -> None:
    entry = reg("R-1", 7, 0.0)
    back = LocalRegistration.from_payload(entry.payload(), 12.5)
    assert back == reg("R-1", 7, 12.5)
    assert b"accepted_at" not in entry.payload()
    assert LocalRegistration.from_payload(b'{"resourceType":"MedicationRequest"}', 0) is None
    assert LocalRegistration.from_payload(b"\xff", 0) is None
    assert LocalRegistration.from_payload(b'{"kind":"local-queue.registration"}', 0) is None


def test_the_answer_has_the_systems_shape_with_no_regno_yet() -> None:
    answer = reg("R-1", 7, 0.0).answer("/_resilgate/tickets/R-1")
    assert answer["queueNo"] == "L-NEI-0007" and answer["regNo"] is None
    assert answer["externalTicket"] == answer["ticket"] == "R-1"
    assert answer["statusUrl"] == "/_resilgate/tickets/R-1"
    back_entry = orjson.loads(reg("R-1", 7, 0.0).replay_body("CALLED"))
    assert back_entry == {**BODY, "queueNo": "L-NEI-0007", "date": "2025-03-20",
                          "queueStatus": "CALLED"}  # fmt: skip


def test_the_board_lists_arrival_order_and_call_next_takes_the_first_not_called() -> None:
    entries = [
        reg("R-c", 101, 3.0),
        reg("R-a", 1, 1.0),
        reg("R-b", 2, 2.0),
        reg("R-x", 3, 0.5, dept="WAI"),
        reg("R-y", 4, 0.5, day="2025-03-21"),
    ]
    queue = queue_of(entries, "NEI", "2025-03-20")
    assert [e.ticket for e in queue] == ["R-a", "R-b", "R-c"]
    called = {"R-a"}
    assert [e["status"] for e in board(queue, called)] == ["CALLED", "WAITING", "WAITING"]
    entry, waiting = next_waiting(queue, called)
    assert entry is not None and (entry.ticket, waiting) == ("R-b", 1)
    assert call_answer(entry, waiting) == {
        "called": {"queueNo": "L-NEI-0002", "maskedName": "p*****6", "status": "CALLED"},
        "waiting": 1,
    }
    assert next_waiting(queue, {"R-a", "R-b", "R-c"}) == (None, 0)
    assert call_answer(None, 0) == {"called": None, "waiting": 0}
    assert decode_called(None) == [] and decode_called(b'["R-a", 3]') == ["R-a"]
    assert decode_called(b"{}") == []


@pytest.mark.parametrize(
    ("status", "answer", "state"),
    [
        (201, {"regNo": "NEI2025032000001", "visitNo": "V1", "queueNo": "L-NEI-0007"}, "applied"),
        (200, {"regNo": "NEI2025032000001", "visitNo": "V1", "queueNo": "L-NEI-0007"}, "duplicate"),
        (409, {"code": "immutable_fields", "message": "cannot change dept"}, "conflict"),
        (412, None, "conflict"),
        (422, {"code": "unknown_patient", "message": "no patient p-10086"}, "failed"),
        (429, None, "accepted"),
        (401, {"code": "unauthorized"}, "accepted"),  # the gateway's credentials, not the entry
        (407, None, "accepted"),
        (503, {"code": "down"}, "accepted"),
    ],
)
def test_a_back_entry_answer_decides_the_entry_state(status: int, answer: Any, state: str) -> None:
    got, detail = replay_outcome(reg("R-1", 7, 0.0), status, answer)
    assert got == state
    assert detail["localQueueNo"] == "L-NEI-0007"
    if status in (200, 201):
        assert (detail["regNo"], detail["visitNo"]) == ("NEI2025032000001", "V1")
    else:
        assert detail["status"] == status
        assert "p-10086" not in orjson.dumps(detail).decode()  # no message naming the patient
