"""Local queue numbers, like a hospital system's downtime number ranges.

Each process leases blocks of consecutive numbers per (department, day) from the state store
ahead of time (``StateStore.take_block`` never hands out a number twice), so it can keep
issuing while the store is unreachable. No I/O here: the fallback feeds leased blocks in.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import date

NUMBER_DIGITS = 4


def number_scope(dept: str, day: date) -> str:
    """The store counter of one department's local numbers on one day."""
    return f"local-queue:{dept}:{day.isoformat()}"


def format_number(prefix: str, dept: str, number: int) -> str:
    """``L-NEI-0007``: never the registration system's ``A023`` (letter and three digits)."""
    return f"{prefix}{dept}-{number:0{NUMBER_DIGITS}d}"


@dataclass(frozen=True, slots=True, order=True)
class Block:
    """``size`` consecutive numbers from ``first``, leased from the store."""

    first: int
    size: int

    @property
    def last(self) -> int:
        return self.first + self.size - 1


class NumberPool:
    """The numbers one process holds for one (department, day): the block it issues from
    and spare blocks leased ahead.

    ``take`` hands out each number at most once, strictly increasing; a block that arrives
    below the open one (leases that completed out of order) is dropped, so gaps are possible
    and repeats are not.
    """

    def __init__(self, spare_blocks: int) -> None:
        self.spare_blocks = spare_blocks
        self.last_issued = 0
        self._next = 1  # the open block's next number ...
        self._end = 0  # ... and its last: none open while _next > _end
        self.open_size = 0  # numbers the open block had when opened
        self._reserve: list[Block] = []  # leased, not opened yet, by first number

    def __repr__(self) -> str:
        return (
            f"<NumberPool last={self.last_issued} open_left={self.open_left} "
            f"reserve={len(self._reserve)} blocks/{self.available} numbers>"
        )

    @property
    def open_left(self) -> int:
        return max(0, self._end - self._next + 1)

    @property
    def reserve_blocks(self) -> int:
        return len(self._reserve)

    @property
    def available(self) -> int:
        """Numbers that can still be issued without the store."""
        return self.open_left + sum(b.size for b in self._reserve)

    def add(self, block: Block) -> bool:
        """Keep a block leased from the store for later; False (dropped) if it lies below
        the block already opened."""
        if block.size < 1:
            raise ValueError(f"a block holds at least one number, not {block.size}")
        if block.first <= self._end:
            return False
        bisect.insort(self._reserve, block)
        return True

    def take(self) -> int | None:
        """The next number, or None when every leased number is used up."""
        if self._next > self._end and not self._open_next():
            return None
        number = self._next
        self._next += 1
        self.last_issued = number
        return number

    def wanted(self) -> int:
        """Blocks to lease now so that, beyond the open block, ``spare_blocks`` wait."""
        have = len(self._reserve) + (1 if self.open_left else 0)
        return max(0, self.spare_blocks + 1 - have)

    def _open_next(self) -> bool:
        if not self._reserve:
            return False
        block = self._reserve.pop(0)  # above every number issued: see ``add``
        self._next, self._end, self.open_size = block.first, block.last, block.size
        return True
