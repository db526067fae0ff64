"""Registration (挂号) and outpatient queues, China-shaped REST under ``/reg/v1``.

Registrations need ``patientId`` (a seeded patient or ``test-0001``), ``dept``, ``doctorId``,
``slotId``, ``payType`` (``insured`` | ``self-pay``) and ``channel``. A ``slotId`` taken from
``/schedules`` fixes the day and counts against the session's capacity; any other ``slotId``
means today. ``regNo`` is dept + yyyymmdd + a 5-digit sequence, queue numbers (``A023``) restart
per department per day. Check-in puts a registration on the queue board as ``WAITING``;
``call-next`` calls the earliest checked-in ``WAITING`` entry; ``skip`` marks ``ABSENT``,
``recall`` calls a ``CALLED``/``ABSENT`` entry again, ``arrive`` and ``complete`` finish it.

``Idempotency-Key`` on ``POST /registrations`` and ``call-next``: the same key returns the
stored answer (header ``Idempotent-Replayed: true``) without applying anything; the same key
with a different request is 422. ``PUT /registrations/external/{localTicket}`` upserts a
gateway-issued number (optional ``queueNo`` and ``date`` in the body keep the local number and
day; an optional ``queueStatus`` puts it on the queue board as it stood locally, e.g. ``WAITING``
or ``CALLED``, unless it is on the board already): 201 the first time, 200 afterwards, never a
second registration. Department ``TEST``
(doctor ``d-test``) and patient ``test-0001`` exist for probes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from resilgate.simulators import SimulatorOptions
from resilgate.simulators.common import BadRequest, json_response, now_cn, read_json_object
from resilgate.simulators.faults import WriteLog, install_faults
from resilgate.simulators.seed_data import SURNAMES, Person, mask_name, seed_people

REQUIRED_FIELDS = ("patientId", "dept", "doctorId", "slotId", "payType", "channel")
PAY_TYPES = ("insured", "self-pay")
MUTABLE_FIELDS = ("doctorId", "slotId", "payType", "channel")
QUEUE_STATUSES = ("WAITING", "CALLED", "ARRIVED", "ABSENT", "COMPLETED")


@dataclass(frozen=True)
class Department:
    code: str
    name: str
    queue_prefix: str


@dataclass(frozen=True)
class Doctor:
    doctor_id: str
    name: str
    title: str
    dept: str


DEPARTMENTS = (
    Department("NEI", "内科", "A"),
    Department("WAI", "外科", "B"),
    Department("ERK", "儿科", "C"),
    Department("FUK", "妇产科", "D"),
    Department("YAN", "眼科", "E"),
    Department("KOU", "口腔科", "F"),
    Department("PIF", "皮肤科", "G"),
    Department("TEST", "测试科", "T"),
)
TITLES = ("主任医师", "副主任医师", "主治医师", "住院医师")
SESSIONS = (("AM", "08:00", "12:00"), ("PM", "13:30", "17:00"))


class RegError(Exception):
    """A request the desk refuses; ``status`` and ``code`` go into the answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Registration:
    reg_no: str
    visit_no: str
    queue_no: str
    person: Person
    dept: str
    day: date
    fields: dict[str, str]
    external_ticket: str | None = None
    cancelled: bool = False
    queue_status: str | None = None  # None until check-in
    checkin_seq: int = 0
    recalls: int = 0

    @property
    def status(self) -> str:
        if self.cancelled:
            return "CANCELLED"
        return "CHECKED_IN" if self.queue_status else "BOOKED"

    def to_json(self) -> dict[str, Any]:
        return {
            "regNo": self.reg_no,
            "queueNo": self.queue_no,
            "visitNo": self.visit_no,
            "patientId": self.person.patient_id,
            "maskedName": mask_name(self.person.name),
            "dept": self.dept,
            "date": self.day.isoformat(),
            **{name: self.fields[name] for name in MUTABLE_FIELDS},
            "status": self.status,
            "queueStatus": self.queue_status,
            "externalTicket": self.external_ticket,
        }

    def board_entry(self) -> dict[str, Any]:
        return {
            "queueNo": self.queue_no,
            "maskedName": mask_name(self.person.name),
            "status": self.queue_status,
        }


@dataclass
class _Stored:
    """An idempotency key's request fingerprint and the answer it got."""

    fingerprint: bytes
    status: int
    body: dict[str, Any]
    wrote: bool
    kind: str


@dataclass
class _Counters:
    reg: dict[tuple[str, date], int] = field(default_factory=dict)
    queue: dict[tuple[str, date], int] = field(default_factory=dict)
    visits: int = 0
    checkins: int = 0

    def next(self, table: dict[tuple[str, date], int], dept: str, day: date) -> int:
        table[dept, day] = table.get((dept, day), 0) + 1
        return table[dept, day]


def _parse_day(text: str | None, default: date) -> date:
    if text is None or text == "":
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"date must be YYYY-MM-DD, got {text!r}") from None


def _fingerprint(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


class RegistrationDesk:
    """Departments, schedules, registrations and queue boards of the simulated hospital."""

    def __init__(self, seed: int, writes: WriteLog) -> None:
        self._seed = seed
        self._writes = writes
        self.people = {p.patient_id: p for p in seed_people(seed)}
        self.departments = {d.code: d for d in DEPARTMENTS}
        rng = random.Random(seed)
        self.doctors: dict[str, list[Doctor]] = {}
        number = 1
        for dept in DEPARTMENTS:
            if dept.code == "TEST":
                self.doctors["TEST"] = [Doctor("d-test", "测试医生", "主治医师", "TEST")]
                continue
            staff = []
            for _ in range(rng.randint(2, 4)):
                name = rng.choice(SURNAMES) + rng.choice("文武德明建立国志远")
                staff.append(Doctor(f"d-{number:02d}", name, rng.choice(TITLES), dept.code))
                number += 1
            self.doctors[dept.code] = staff
        self._registrations: dict[str, Registration] = {}
        self._external: dict[str, str] = {}  # local ticket -> regNo
        self._keys: dict[tuple[str, str], _Stored] = {}
        self._counters = _Counters()

    def __repr__(self) -> str:
        return f"<RegistrationDesk {len(self._registrations)} registrations>"

    def department(self, code: str) -> Department:
        dept = self.departments.get(code)
        if dept is None:
            raise RegError(404, "unknown_dept", f"no department {code}")
        return dept

    def schedules(self, code: str, day: date) -> list[dict[str, Any]]:
        """The doctors' sessions (号源) of one department on one day, same for the same seed."""
        self.department(code)
        rng = random.Random(f"{self._seed}:{code}:{day.isoformat()}")
        slots = []
        for doctor in self.doctors[code]:
            for period, start, end in SESSIONS:
                if code != "TEST" and rng.random() < 0.35:
                    continue
                slot_id = f"{code}-{day:%Y%m%d}-{doctor.doctor_id}-{period}"
                capacity = 50 if code == "TEST" else rng.choice((20, 30, 40))
                booked = sum(
                    1
                    for r in self._registrations.values()
                    if r.fields["slotId"] == slot_id and not r.cancelled
                )
                slots.append(
                    {
                        "slotId": slot_id,
                        "dept": code,
                        "date": day.isoformat(),
                        "doctorId": doctor.doctor_id,
                        "doctorName": doctor.name,
                        "title": doctor.title,
                        "period": period,
                        "startTime": start,
                        "endTime": end,
                        "capacity": capacity,
                        "available": capacity - booked,
                        "fee": 50.0 if doctor.title == "主任医师" else 25.0,
                    }
                )
        return slots

    def _slot(self, slot_id: str) -> dict[str, Any] | None:
        parts = slot_id.split("-")
        if len(parts) < 3 or parts[0] not in self.departments:
            return None
        try:
            day = date(int(parts[1][:4]), int(parts[1][4:6]), int(parts[1][6:8]))
        except ValueError:
            return None
        return next((s for s in self.schedules(parts[0], day) if s["slotId"] == slot_id), None)

    def _check_body(self, body: Mapping[str, Any]) -> tuple[Person, dict[str, str]]:
        missing = [name for name in REQUIRED_FIELDS if not body.get(name)]
        if missing:
            raise RegError(400, "missing_fields", f"missing field(s): {', '.join(missing)}")
        wrong = [name for name in REQUIRED_FIELDS if not isinstance(body[name], str)]
        if wrong:
            raise RegError(400, "invalid_fields", f"must be strings: {', '.join(wrong)}")
        if body["payType"] not in PAY_TYPES:
            raise RegError(400, "invalid_pay_type", f"payType must be one of {PAY_TYPES}")
        person = self.people.get(body["patientId"])
        if person is None:
            raise RegError(422, "unknown_patient", f"no patient {body['patientId']}")
        self.department(body["dept"])
        return person, {name: body[name] for name in REQUIRED_FIELDS}

    def _new_registration(
        self,
        person: Person,
        fields: dict[str, str],
        day: date | None,
        queue_no: str | None,
        external: str | None,
    ) -> Registration:
        dept = self.departments[fields["dept"]]
        slot = self._slot(fields["slotId"])
        if slot is not None:
            if slot["dept"] != dept.code or slot["doctorId"] != fields["doctorId"]:
                raise RegError(422, "slot_mismatch", "slotId belongs to another dept or doctor")
            if slot["available"] <= 0:
                raise RegError(409, "slot_full", f"slot {fields['slotId']} is fully booked")
            day = day or date.fromisoformat(slot["date"])
        day = day or now_cn().date()
        counters = self._counters
        reg_seq = counters.next(counters.reg, dept.code, day)
        if queue_no is None:
            queue_no = f"{dept.queue_prefix}{counters.next(counters.queue, dept.code, day):03d}"
        elif any(
            r.dept == dept.code and r.day == day and r.queue_no == queue_no
            for r in self._registrations.values()
        ):
            raise RegError(409, "queue_no_taken", f"queue number {queue_no} is already used")
        counters.visits += 1
        registration = Registration(
            reg_no=f"{dept.code}{day:%Y%m%d}{reg_seq:05d}",
            visit_no=f"V{day:%Y%m%d}{counters.visits:06d}",
            queue_no=queue_no,
            person=person,
            dept=dept.code,
            day=day,
            fields=fields,
            external_ticket=external,
        )
        self._registrations[registration.reg_no] = registration
        return registration

    def _replay(self, scope: str, key: str | None, fingerprint: bytes) -> _Stored | None:
        if key is None:
            return None
        stored = self._keys.get((scope, key))
        if stored is None:
            return None
        if stored.fingerprint != fingerprint:
            raise RegError(422, "idempotency_key_reused", f"key {key} was used for another request")
        if stored.wrote:
            self._writes.duplicate(stored.kind, key)
        return stored

    def register(
        self, body: Mapping[str, Any], key: str | None
    ) -> tuple[int, dict[str, Any], bool]:
        """Create a registration; (status, answer, replayed)."""
        fingerprint = _fingerprint(body)
        stored = self._replay("register", key, fingerprint)
        if stored is not None:
            return stored.status, stored.body, True
        person, fields = self._check_body(body)
        registration = self._new_registration(person, fields, None, None, None)
        answer = registration.to_json()
        self._writes.applied(
            "registration.create", key or registration.reg_no, regNo=registration.reg_no
        )
        if key is not None:
            self._keys["register", key] = _Stored(
                fingerprint, 201, answer, True, "registration.create"
            )
        return 201, answer, False

    def registration(self, reg_no: str) -> Registration:
        registration = self._registrations.get(reg_no)
        if registration is None:
            raise RegError(404, "unknown_registration", f"no registration {reg_no}")
        return registration

    def cancel(self, reg_no: str) -> dict[str, Any]:
        registration = self.registration(reg_no)
        if registration.cancelled:
            self._writes.duplicate("registration.cancel", reg_no)
        elif registration.queue_status in ("CALLED", "ARRIVED", "COMPLETED"):
            raise RegError(409, "already_seen", f"{reg_no} has been called; cannot cancel")
        else:
            registration.cancelled = True
            self._writes.applied("registration.cancel", reg_no)
        return registration.to_json()

    def check_in(self, reg_no: str) -> dict[str, Any]:
        registration = self.registration(reg_no)
        if registration.cancelled:
            raise RegError(409, "cancelled", f"{reg_no} is cancelled")
        if registration.queue_status is not None:
            self._writes.duplicate("registration.check-in", reg_no)
        else:
            self._enqueue(registration, "WAITING")
            self._writes.applied("registration.check-in", reg_no, queueNo=registration.queue_no)
        return registration.to_json()

    def _enqueue(self, registration: Registration, status: str) -> None:
        self._counters.checkins += 1
        registration.queue_status = status
        registration.checkin_seq = self._counters.checkins

    def _queue(self, dept: str, day: date) -> list[Registration]:
        self.department(dept)
        entries = [
            r
            for r in self._registrations.values()
            if r.dept == dept and r.day == day and r.queue_status and not r.cancelled
        ]
        return sorted(entries, key=lambda r: r.checkin_seq)

    def board(self, dept: str, day: date) -> list[dict[str, Any]]:
        return [r.board_entry() for r in self._queue(dept, day)]

    def call_next(self, dept: str, day: date, key: str | None) -> tuple[dict[str, Any], bool]:
        """Call the earliest waiting patient; (answer, replayed)."""
        fingerprint = _fingerprint([dept, day.isoformat()])
        stored = self._replay("call-next", key, fingerprint)
        if stored is not None:
            return stored.body, True
        queue = self._queue(dept, day)
        waiting = [r for r in queue if r.queue_status == "WAITING"]
        called = None
        if waiting:
            entry = waiting[0]
            entry.queue_status = "CALLED"
            called = entry.board_entry()
            self._writes.applied(
                "queue.call", key or f"{dept}/{day}/{entry.queue_no}", queueNo=entry.queue_no
            )
        answer = {"called": called, "waiting": max(len(waiting) - 1, 0)}
        if key is not None:
            self._keys["call-next", key] = _Stored(
                fingerprint, 200, answer, called is not None, "queue.call"
            )
        return answer, False

    def _entry(self, dept: str, day: date, queue_no: str) -> Registration:
        for entry in self._queue(dept, day):
            if entry.queue_no == queue_no:
                return entry
        raise RegError(404, "unknown_entry", f"no {queue_no} on the {dept} queue of {day}")

    def move(self, dept: str, day: date, queue_no: str, action: str) -> dict[str, Any]:
        """Apply ``recall``, ``skip``, ``arrive`` or ``complete`` to one queue entry."""
        entry = self._entry(dept, day, queue_no)
        allowed, target = {
            "recall": (("CALLED", "ABSENT"), "CALLED"),
            "skip": (("WAITING", "CALLED"), "ABSENT"),
            "arrive": (("CALLED",), "ARRIVED"),
            "complete": (("CALLED", "ARRIVED"), "COMPLETED"),
        }[action]
        key = f"{dept}/{day}/{queue_no}"
        if entry.queue_status == target and action != "recall":
            self._writes.duplicate(f"queue.{action}", key)
            return entry.board_entry()
        if entry.queue_status not in allowed:
            raise RegError(
                409, "bad_transition", f"cannot {action} an entry that is {entry.queue_status}"
            )
        entry.queue_status = target
        if action == "recall":
            entry.recalls += 1
        self._writes.applied(f"queue.{action}", key, status=target)
        return {**entry.board_entry(), "recalls": entry.recalls}

    def upsert_external(self, ticket: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Back-enter a gateway-issued registration once; 201 created, 200 existed."""
        person, fields = self._check_body(body)
        queue_no = body.get("queueNo")
        if queue_no is not None and (not isinstance(queue_no, str) or not queue_no):
            raise RegError(400, "invalid_fields", "queueNo must be a non-empty string")
        day_text = body.get("date")
        if day_text is not None and not isinstance(day_text, str):
            raise RegError(400, "invalid_fields", "date must be YYYY-MM-DD")
        day = _parse_day(day_text, now_cn().date()) if day_text else None
        queue_status = body.get("queueStatus")
        if queue_status is not None and queue_status not in QUEUE_STATUSES:
            raise RegError(400, "invalid_fields", f"queueStatus must be one of {QUEUE_STATUSES}")
        reg_no = self._external.get(ticket)
        if reg_no is None:
            registration = self._new_registration(person, fields, day, queue_no, ticket)
            if queue_status is not None:
                self._enqueue(registration, queue_status)
            self._external[ticket] = registration.reg_no
            self._writes.applied("registration.external", ticket, regNo=registration.reg_no)
            return 201, registration.to_json()
        registration = self._registrations[reg_no]
        fixed = {
            "patientId": (registration.person.patient_id, person.patient_id),
            "dept": (registration.dept, fields["dept"]),
            "date": (registration.day, day or registration.day),
            "queueNo": (registration.queue_no, queue_no or registration.queue_no),
        }
        changed = [name for name, (old, new) in fixed.items() if old != new]
        if changed:
            raise RegError(409, "immutable_fields", f"cannot change {', '.join(changed)}")
        updates = {n: fields[n] for n in MUTABLE_FIELDS if registration.fields[n] != fields[n]}
        # The board's own status is newer than a back-entered one: only an entry not on the
        # board yet is put there.
        if (
            queue_status is not None
            and registration.queue_status is None
            and not registration.cancelled
        ):
            self._enqueue(registration, queue_status)
            updates["queueStatus"] = queue_status
        if updates:
            registration.fields.update({n: v for n, v in updates.items() if n in MUTABLE_FIELDS})
            self._writes.applied(
                "registration.external", ticket, regNo=reg_no, updated=sorted(updates)
            )
        else:
            self._writes.duplicate("registration.external", ticket, regNo=reg_no)
        return 200, registration.to_json()

    def external(self, ticket: str) -> Registration:
        reg_no = self._external.get(ticket)
        if reg_no is None:
            raise RegError(404, "unknown_ticket", f"no registration for external ticket {ticket}")
        return self._registrations[reg_no]


DESK = web.AppKey("registration_desk", RegistrationDesk)


def _error(exc: RegError | BadRequest) -> web.Response:
    if isinstance(exc, RegError):
        return json_response({"code": exc.code, "message": str(exc)}, status=exc.status)
    return json_response({"code": "bad_request", "message": str(exc)}, status=400)


def _day(request: web.Request) -> date:
    return _parse_day(request.query.get("date"), now_cn().date())


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (RegError, BadRequest) as exc:
        return _error(exc)


async def departments(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    return json_response(
        [
            {
                "code": d.code,
                "name": d.name,
                "queuePrefix": d.queue_prefix,
                "doctors": [
                    {"doctorId": doc.doctor_id, "name": doc.name, "title": doc.title}
                    for doc in desk.doctors[d.code]
                ],
            }
            for d in DEPARTMENTS
        ]
    )


async def schedules(request: web.Request) -> web.Response:
    dept = request.query.get("dept")
    if not dept:
        raise BadRequest("dept is required")
    return json_response(request.app[DESK].schedules(dept, _day(request)))


async def register(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    status, answer, replayed = request.app[DESK].register(
        body, request.headers.get("Idempotency-Key")
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return json_response(answer, status=status, headers=headers)


async def get_registration(request: web.Request) -> web.Response:
    return json_response(request.app[DESK].registration(request.match_info["regNo"]).to_json())


async def cancel(request: web.Request) -> web.Response:
    return json_response(request.app[DESK].cancel(request.match_info["regNo"]))


async def check_in(request: web.Request) -> web.Response:
    return json_response(request.app[DESK].check_in(request.match_info["regNo"]))


async def board(request: web.Request) -> web.Response:
    return json_response(request.app[DESK].board(request.match_info["dept"], _day(request)))


async def call_next(request: web.Request) -> web.Response:
    answer, replayed = request.app[DESK].call_next(
        request.match_info["dept"], _day(request), request.headers.get("Idempotency-Key")
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return json_response(answer, headers=headers)


async def move_entry(request: web.Request) -> web.Response:
    info = request.match_info
    answer = request.app[DESK].move(info["dept"], _day(request), info["queueNo"], info["action"])
    return json_response(answer)


async def upsert_external(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    status, answer = request.app[DESK].upsert_external(request.match_info["ticket"], body)
    return json_response(answer, status=status)


async def get_external(request: web.Request) -> web.Response:
    return json_response(request.app[DESK].external(request.match_info["ticket"]).to_json())


def build_app(options: SimulatorOptions) -> web.Application:
    app = web.Application()
    control = install_faults(app, options)
    app.middlewares.append(_errors)
    app[DESK] = RegistrationDesk(options.seed, control.writes)
    base = "/reg/v1"
    app.router.add_get(f"{base}/departments", departments)
    app.router.add_get(f"{base}/schedules", schedules)
    app.router.add_post(f"{base}/registrations", register)
    app.router.add_put(f"{base}/registrations/external/{{ticket}}", upsert_external)
    app.router.add_get(f"{base}/registrations/external/{{ticket}}", get_external)
    app.router.add_get(f"{base}/registrations/{{regNo}}", get_registration)
    app.router.add_post(f"{base}/registrations/{{regNo}}/cancel", cancel)
    app.router.add_post(f"{base}/registrations/{{regNo}}/check-in", check_in)
    app.router.add_get(f"{base}/queues/{{dept}}", board)
    app.router.add_post(f"{base}/queues/{{dept}}/call-next", call_next)
    app.router.add_post(
        f"{base}/queues/{{dept}}/entries/{{queueNo}}/{{action:recall|skip|arrive|complete}}",
        move_entry,
    )
    return app
