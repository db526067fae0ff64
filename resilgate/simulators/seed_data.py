"""The synthetic people every simulator knows, derived only from the seed.

The same seed gives the same people in the HIS, registration and insurance simulators, so a
patient id, a name on the queue board and an insurance number line up across them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

SEEDED_PATIENTS = 50
FIRST_PATIENT_NUMBER = 10000
# History is anchored to a fixed day so the same seed always gives the same records.
ANCHOR_DAY = date(2025, 3, 20)

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN_CHARS = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰建国志红"


@dataclass(frozen=True)
class Person:
    """A patient of the hospital and, with ``psn_no``, an insured person."""

    patient_id: str
    mrn: str
    name: str
    gender: str  # FHIR administrative gender
    birth_date: date
    certno: str  # national id number (synthetic, checksum not valid)
    psn_no: str
    insutype: str  # 310 employee basic, 390 resident basic
    account_balance: str  # yuan, as text for Decimal
    suspended: bool = False


TEST_PERSON = Person(
    patient_id="test-0001",
    mrn="T0000001",
    name="测试患者",
    gender="female",
    birth_date=date(1980, 1, 1),
    certno="110101198001010000",
    psn_no="TEST0001",
    insutype="310",
    account_balance="1000.00",
)
SUSPENDED_TEST_PERSON = Person(
    patient_id="test-0002",
    mrn="T0000002",
    name="测试暂停",
    gender="male",
    birth_date=date(1975, 6, 1),
    certno="110101197506010000",
    psn_no="TEST0002",
    insutype="390",
    account_balance="0.00",
    suspended=True,
)


def mask_name(name: str) -> str:
    """Hide the middle of a name as display boards do: 张三 -> 张*, 张建华 -> 张*华."""
    if len(name) <= 1:
        return name
    if len(name) == 2:
        return name[0] + "*"
    return name[0] + "*" * (len(name) - 2) + name[-1]


def seed_people(seed: int) -> list[Person]:
    """The two test persons followed by ``SEEDED_PATIENTS`` seeded ones (``p-10000``...)."""
    rng = random.Random(seed)
    people = [TEST_PERSON, SUSPENDED_TEST_PERSON]
    for i in range(SEEDED_PATIENTS):
        number = FIRST_PATIENT_NUMBER + i
        given = "".join(rng.choice(GIVEN_CHARS) for _ in range(rng.choice((1, 2, 2))))
        birth = ANCHOR_DAY - timedelta(days=rng.randint(2 * 365, 90 * 365))
        gender = rng.choice(("male", "female"))
        region = rng.choice(("310104", "310105", "310112", "320102", "330106"))
        people.append(
            Person(
                patient_id=f"p-{number}",
                mrn=f"M{number:07d}",
                name=rng.choice(SURNAMES) + given,
                gender=gender,
                birth_date=birth,
                certno=f"{region}{birth:%Y%m%d}{rng.randint(0, 9999):04d}",
                psn_no=f"3100000{number:09d}",
                insutype=rng.choice(("310", "310", "390")),
                account_balance=f"{rng.randint(0, 300_000) / 100:.2f}",
            )
        )
    return people
