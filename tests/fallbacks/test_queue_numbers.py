"""Local queue numbers: leased blocks, handed out once each, increasing per process."""

from __future__ import annotations

import re
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fallbacks.queue_numbers import Block, NumberPool, format_number, number_scope


def test_a_number_names_prefix_department_and_number_and_never_looks_like_the_systems() -> None:
    assert format_number("L-", "NEI", 7) == "L-NEI-0007"
    assert format_number("L-", "NEI", 12345) == "L-NEI-12345"
    assert not re.match(r"^[A-Z]\d{3}$", format_number("A", "", 23))
    assert number_scope("NEI", date(2025, 3, 20)) == "local-queue:NEI:2025-03-20"


def test_a_pool_issues_its_blocks_in_order_then_runs_dry() -> None:
    pool = NumberPool(spare_blocks=1)
    assert pool.wanted() == 2 and pool.take() is None
    pool.add(Block(101, 2))
    pool.add(Block(1, 2))
    assert pool.wanted() == 0 and pool.available == 4
    assert [pool.take() for _ in range(5)] == [1, 2, 101, 102, None]
    assert pool.wanted() == 2


def test_opening_a_block_asks_for_one_more_and_a_late_lower_block_is_skipped() -> None:
    pool = NumberPool(spare_blocks=1)
    pool.add(Block(11, 10))
    assert pool.take() == 11
    assert pool.wanted() == 1  # one open, none spare
    assert not pool.add(Block(1, 10))  # a lease that completed after a later one
    assert pool.wanted() == 1 and pool.available == 9
    assert [pool.take() for _ in range(10)] == [*range(12, 21), None]
    assert "last=20" in repr(pool)


def test_an_empty_block_is_refused() -> None:
    with pytest.raises(ValueError):
        NumberPool(1).add(Block(1, 0))


# A process's life as steps: ask the store for a block (it answers later, in any order), an
# answer arrives, or a number is taken.
STEPS = st.lists(
    st.tuples(st.sampled_from(("lease", "arrive", "take")), st.integers(0, 2), st.integers(0, 5)),
    max_size=120,
)


@given(
    steps=STEPS,
    size=st.integers(1, 7),
    spare=st.integers(0, 3),
)
def test_numbers_never_repeat_across_processes_and_increase_in_each(
    steps: list[tuple[str, int, int]], size: int, spare: int
) -> None:
    counter = 0  # the store's counter of one (department, day)
    pools = [NumberPool(spare) for _ in range(3)]
    pending: list[list[Block]] = [[] for _ in pools]
    leased: list[set[int]] = [set() for _ in pools]
    issued: list[list[int]] = [[] for _ in pools]
    for step, who, pick in steps:
        if step == "lease":
            pending[who].append(Block(counter + 1, size))
            counter += size
        elif step == "arrive" and pending[who]:
            block = pending[who].pop(pick % len(pending[who]))
            leased[who].update(range(block.first, block.last + 1))
            pools[who].add(block)
        elif step == "take":
            number = pools[who].take()
            if number is not None:
                issued[who].append(number)
    every = [n for numbers in issued for n in numbers]
    assert len(every) == len(set(every))
    for numbers, mine in zip(issued, leased, strict=True):
        assert numbers == sorted(numbers)
        assert set(numbers) <= mine


@given(spare=st.integers(0, 4), size=st.integers(1, 20), used=st.integers(0, 200))
def test_a_full_reserve_covers_spare_blocks_of_numbers_without_the_store(
    spare: int, size: int, used: int
) -> None:
    counter = 0
    pool = NumberPool(spare)

    def refill() -> None:
        nonlocal counter
        while pool.wanted():
            pool.add(Block(counter + 1, size))
            counter += size

    for _ in range(used):
        refill()
        assert pool.take() is not None
    refill()
    assert pool.available >= spare * size
    took = [pool.take() for _ in range(spare * size)]
    assert None not in took
