"""``resilgate journal``: the write journal of the configured state store, as ops read it.

``list`` prints one line per entry (ticket, queue, route, state, accepted time, short detail);
``--state dead`` shows the dead letters (conflicts and failures left for a person). ``show``
prints one entry's detail: the upstream's answer. Neither ever prints a payload (patient data).
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import datetime

import orjson

from resilgate.config import Config
from resilgate.failure_body import short_text
from resilgate.mode_cli import Action, with_store
from resilgate.state.records import JournalEntry, parsed_detail
from resilgate.state.store import StateStore

STATES: dict[str, frozenset[str] | None] = {
    "dead": frozenset({"conflict", "failed"}),
    "open": frozenset({"accepted", "replaying"}),
    "all": None,
}
SHORT_DETAIL_CHARS = 100


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")


def short_detail(entry: JournalEntry) -> str:
    """The gist of an entry's detail on one line: status, record or reason."""
    detail = parsed_detail(entry.detail)
    if not isinstance(detail, dict):
        text = str(detail or "")
    else:
        parts = [
            str(detail[key]) for key in ("status", "resource", "outcome", "error") if key in detail
        ]
        text = " ".join(parts)
    return short_text(text, SHORT_DETAIL_CHARS)


async def _list(store: StateStore, state: str, queue: str | None, limit: int) -> int:
    for entry in await store.journal_list(STATES[state], limit=limit, queue=queue):
        fields = (entry.ticket, entry.queue, entry.route, entry.state, _when(entry.created_at))
        print("\t".join((*fields, short_detail(entry))))
    return 0


async def _show(store: StateStore, ticket: str) -> int:
    entry = await store.journal_get(ticket)
    if entry is None:
        print(f"error: no ticket {ticket}", file=sys.stderr)
        return 1
    detail = parsed_detail(entry.detail)
    print(f"ticket\t{entry.ticket}")
    print(f"state\t{entry.state}")
    print(f"queue\t{entry.queue}")
    print(f"route\t{entry.route}")
    print(f"accepted\t{_when(entry.created_at)}")
    if isinstance(detail, str) or not detail:
        text = detail or "-"
    else:
        text = orjson.dumps(detail, option=orjson.OPT_INDENT_2).decode()
    print(f"detail\t{text}")
    return 0


def list_entries(state: str, queue: str | None, limit: int) -> Action:
    return lambda store: _list(store, state, queue, limit)


def show_entry(ticket: str) -> Action:
    return lambda store: _show(store, ticket)


def run_journal(config: Config, action: Action) -> int:
    try:
        return asyncio.run(with_store(config, action))
    except BrokenPipeError:  # ``| head``: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
