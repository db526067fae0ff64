"""The admin API from the command line: ``resilgate status``, ``mode``, ``journal``, ``drill``.

Each verb is one call to the admin API, made with the token in ``RESILGATE_ADMIN_TOKEN`` (never
a flag: flags show in ``ps``). The answer prints as aligned tables, or as the API's JSON with
``--json``. A failed call prints one line naming the URL and the API's reason, and exits 1.
Nothing here prints a journaled payload: the API never returns one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

URL_ENV = "RESILGATE_ADMIN_URL"
TOKEN_ENV = "RESILGATE_ADMIN_TOKEN"
DEFAULT_URL = "http://127.0.0.1:9090"
TIMEOUT_S = 10.0
SHORT_DETAIL_CHARS = 100
HINTS = {401: f"is {TOKEN_ENV} a token this gateway was configured with?"}

Json = Any


class AdminError(Exception):
    """A call that did not succeed, said in one line for a person."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: following it would send the token on."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AdminClient:
    """Synchronous calls to one gateway's admin API with one bearer token."""

    def __init__(self, base_url: str, token: str, timeout_s: float = TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirects())

    def __repr__(self) -> str:
        return f"<AdminClient {self.base_url} timeout={self.timeout_s:g}s>"  # never the token

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | int | None] | None = None,
    ) -> Json:
        """The decoded JSON answer of a 2xx; AdminError for anything else."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw: bytes = response.read()
        except urllib.error.HTTPError as exc:
            try:
                raise AdminError(refusal(method, url, exc.code, exc.read())) from None
            finally:
                exc.close()
        except urllib.error.URLError as exc:
            raise AdminError(unreachable(self.base_url, exc.reason)) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:  # mid-answer
            raise AdminError(unreachable(self.base_url, exc)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError(
                f"{method} {url}: the answer is not JSON: is this the admin API?"
            ) from None


def refusal(method: str, url: str, status: int, body: bytes) -> str:
    """One line for an error answer: the URL, the status and the API's code and detail."""
    try:
        problem = json.loads(body)
        what = f"{problem['error']}: {problem['detail']}"
    except (ValueError, TypeError, KeyError):  # not the API's problem JSON: a proxy, say
        what = short(body.decode(errors="replace")) or "no detail"
    hint = HINTS.get(status)
    return f"{method} {url}: {status} {what}" + (f" ({hint})" if hint else "")


def unreachable(base_url: str, reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused: is the gateway running, and is this its admin listener?"
    elif isinstance(reason, TimeoutError):
        why = "no answer in time"
    else:
        why = str(reason) or type(reason).__name__
    return f"cannot reach the admin API at {base_url}: {why} (--admin-url or {URL_ENV})"


# -- the verbs --------------------------------------------------------------------------------

Call = Callable[[AdminClient, argparse.Namespace], Json]
Render = Callable[[Json, float], str]


@dataclass(frozen=True, slots=True)
class Verb:
    """One admin API call and how its answer reads."""

    call: Call
    render: Render


def _target(name: str) -> str:
    # An endpoint target is upstream/endpoint: the route takes the slash as is.
    return quote(name, safe="/")


def _ticket(args: argparse.Namespace) -> str:
    return quote(args.ticket, safe="")


def _mode_set(client: AdminClient, args: argparse.Namespace) -> Json:
    body: dict[str, Any] = {"mode": args.mode, "reason": args.reason}
    if args.expires_in is not None:
        body["expires_in_s"] = args.expires_in
    return client.call("PUT", f"/modes/{_target(args.target)}", body)


def _mode_clear(client: AdminClient, args: argparse.Namespace) -> Json:
    return client.call("DELETE", f"/modes/{_target(args.target)}", query={"reason": args.reason})


def _journal_list(client: AdminClient, args: argparse.Namespace) -> Json:
    query = {"state": args.state, "queue": args.queue, "limit": args.limit}
    return client.call("GET", "/journal", query=query)


def _drill_start(client: AdminClient, args: argparse.Namespace) -> Json:
    body = {
        "target": args.target,
        "mode": args.mode,
        "duration_s": args.duration,
        "reason": args.reason,
    }
    return client.call("POST", "/drills", body)


def _read(path: str) -> Call:
    return lambda client, args: client.call("GET", path)


def render_status(status: Json, now: float) -> str:
    """Incident level first, then the store, upstreams, what is not normal, queues, drills."""
    sections = [
        "\n".join(
            (
                _incident_line(status["incident"], now),
                _store_line(status["store"]),
                f"{'SEEN BY':10}worker {status['replica']} (each worker judges for itself)",
            )
        ),
        _upstreams_section(status["upstreams"], now),
        _routes_section(status["routes"]),
        _journal_section(status["journal"], status["self_pay"]),
        _warnings_section(status["warnings"]),
        _drills_line(status["drills"]),
    ]
    return "\n\n".join(section for section in sections if section)


def render_mode(mode: Json, now: float) -> str:
    if mode["mode"] == "auto":
        return f"{mode['target']}: auto (not forced: breakers and probes decide)"
    return (
        f"{mode['target']}: {mode['mode']}, forced by {mode['actor']} "
        f"{_until(mode['expires_at'], now)}: {mode['reason']}"
    )


def render_modes(answer: Json, now: float) -> str:
    modes = answer["modes"]
    if not modes:
        return "no forced modes: every upstream, route and endpoint is auto"
    return table(
        ("TARGET", "MODE", "BY", "SINCE", "UNTIL", "REASON"),
        [
            (
                m["target"],
                m["mode"],
                m["actor"] or "-",
                when(m["set_at"], now),
                _until(m["expires_at"], now),
                m["reason"] or "",
            )
            for m in modes
        ],
    )


def render_journal(answer: Json, now: float) -> str:
    entries = answer["entries"]
    if entries:
        listing = table(
            ("TICKET", "QUEUE", "ROUTE", "STATE", "ACCEPTED", "DETAIL"),
            [
                (
                    e["ticket"],
                    e["queue"],
                    e["route"],
                    _state(e["state"]),
                    when(e["accepted_at"], now),
                    short_detail(e["detail"]),
                )
                for e in entries
            ],
        )
    else:
        listing = "no journal entries match"
    return f"{listing}\n\n{_queues_table(answer['queues'])}"


def render_entry(entry: Json, now: float) -> str:
    detail = entry["detail"]
    if isinstance(detail, (dict, list)):
        text = json.dumps(detail, indent=2, ensure_ascii=False)
    else:
        text = str(detail) if detail else "-"
    return fields(
        [
            ("ticket", entry["ticket"]),
            ("state", _state(entry["state"])),
            ("queue", entry["queue"]),
            ("route", entry["route"]),
            (
                "accepted",
                f"{when(entry['accepted_at'], now)} ({age(now - entry['accepted_at'])} ago)",
            ),
            ("detail", text),
        ]
    )


def render_retried(entry: Json, now: float) -> str:
    return f"{entry['ticket']}: {entry['state']} again, the replay takes it up\n\n" + render_entry(
        entry, now
    )


def render_discarded(entry: Json, now: float) -> str:
    return f"{entry['ticket']}: {entry['state']}, it will not be replayed\n\n" + render_entry(
        entry, now
    )


def render_drill(drill: Json, now: float) -> str:
    report = drill["report"]
    state = drill["state"]
    if state == "running":
        state += f", {age(drill['ends_at'] - now)} left"
    elif drill["finished_at"] is not None:
        state += f" at {when(drill['finished_at'], now)}"
    switch = f"to degraded {_secs(report['switch_to_degraded_s'])}"
    switch += f", back {_secs(report['switch_back_s'])}"
    return fields(
        [
            ("drill", f"{drill['id']} ({state})"),
            ("target", f"{drill['target']} forced to {drill['mode']}"),
            ("by", f"{drill['actor']}: {drill['reason']}"),
            ("started", when(drill["started_at"], now)),
            ("ends", when(drill["ends_at"], now)),
            ("requests", str(report["requests"])),
            ("live", _counted(report["served_live"], report["served_by"])),
            (
                "fallback",
                _counted(sum(report["fallback_serves"].values()), report["fallback_serves"]),
            ),
            ("5xx to clients", str(report["client_errors"])),
            ("statuses", _tally(report["statuses"]) or "-"),
            ("switch", switch),
            ("workers", str(report["workers"])),
        ]
    )


def render_drills(answer: Json, now: float) -> str:
    drills = answer["drills"]
    if not drills:
        return "no drills yet"
    return table(
        ("ID", "TARGET", "MODE", "STATE", "STARTED", "ENDS", "BY", "REQUESTS", "FALLBACK", "5XX"),
        [
            (
                d["id"],
                d["target"],
                d["mode"],
                d["state"],
                when(d["started_at"], now),
                when(d["ends_at"], now),
                d["actor"],
                str(d["report"]["requests"]),
                str(sum(d["report"]["fallback_serves"].values())),
                str(d["report"]["client_errors"]),
            )
            for d in drills
        ],
    )


STATUS = Verb(_read("/status"), render_status)
MODE_SET = Verb(_mode_set, render_mode)
MODE_CLEAR = Verb(_mode_clear, render_mode)
MODE_LIST = Verb(_read("/modes"), render_modes)
JOURNAL_LIST = Verb(_journal_list, render_journal)
JOURNAL_SHOW = Verb(lambda c, a: c.call("GET", f"/journal/{_ticket(a)}"), render_entry)
JOURNAL_RETRY = Verb(
    lambda c, a: c.call("POST", f"/journal/{_ticket(a)}/retry", {"reason": a.reason}),
    render_retried,
)
JOURNAL_DISCARD = Verb(
    lambda c, a: c.call("POST", f"/journal/{_ticket(a)}/discard", {"reason": a.reason}),
    render_discarded,
)
DRILL_START = Verb(_drill_start, render_drill)
DRILL_SHOW = Verb(lambda c, a: c.call("GET", f"/drills/{quote(a.id, safe='')}"), render_drill)
DRILL_LIST = Verb(_read("/drills"), render_drills)


def run(verb: Verb, args: argparse.Namespace) -> int:
    """Call, print the table (or the JSON), and the exit status: 0 done, 1 not done."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(
            f"error: {TOKEN_ENV} is not set: export the admin token "
            "(`resilgate token new` makes one; the config keeps its hash)",
            file=sys.stderr,
        )
        return 1
    url = args.admin_url or os.environ.get(URL_ENV) or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        print(f"error: admin URL {url!r} is not http:// or https://", file=sys.stderr)
        return 1
    try:
        answer = verb.call(AdminClient(url, token), args)
        text = (
            json.dumps(answer, indent=2, ensure_ascii=False)
            if args.json
            else verb.render(answer, time.time())
        )
        print(text)
        sys.stdout.flush()
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, AttributeError) as exc:  # a gateway of another version
        print(
            f"error: {url} answered in a shape this CLI does not know "
            f"({type(exc).__name__}: {exc}); --json prints it as is",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:  # ``| head``: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# -- status sections --------------------------------------------------------------------------


def _incident_line(incident: Json, now: float) -> str:
    share = f"{_pct(incident['share'])} of {incident['requests']:g} recent weighted requests"
    if not incident["level"]:
        return f"{'INCIDENT':10}none ({share} failed or degraded)"
    since = incident["since"]
    started = f" since {when(since, now)} ({age(now - since)})" if since is not None else ""
    return f"{'INCIDENT':10}LEVEL {incident['level']}{started}: {share} failed or degraded"


def _store_line(store: Json) -> str:
    if store["healthy"] is None:
        health = "not read yet"
    elif store["healthy"]:
        health = "healthy"
    else:
        health = f"UNREACHABLE: {store['error'] or 'no detail'}"
    return f"{'STORE':10}{store['backend']}: {health}"


def _upstreams_section(upstreams: Sequence[Json], now: float) -> str:
    rows = []
    forced = []
    for upstream in upstreams:
        mode = upstream["mode"]
        if mode["mode"] != "auto":
            forced.append(f"  {upstream['name']}: " + render_mode(mode, now).split(": ", 1)[1])
        for n, endpoint in enumerate(upstream["endpoints"]):
            down = endpoint["down"]
            if endpoint["fenced"] and "fence" not in down:
                down = f"fenced; {down}" if down else "fenced"
            rows.append(
                (
                    upstream["name"] if n == 0 else "",
                    mode["mode"] if n == 0 else "",
                    endpoint["label"],
                    _loud(endpoint["breaker"], "closed"),
                    _loud(endpoint["probes"], "up", "unknown"),
                    _pct(endpoint["share"]),
                    _fleet(endpoint["fleet"]),
                    down or "-",
                )
            )
    if not rows:
        return ""
    headers = ("UPSTREAM", "MODE", "ENDPOINT", "BREAKER", "PROBES", "SHARE", "FLEET", "DOWN")
    text = table(headers, rows)
    return text + ("\n\nFORCED\n" + "\n".join(forced) if forced else "")


def _routes_section(routes: Sequence[Json]) -> str:
    odd = [r for r in routes if r["mode"] != "auto" or r["degraded"]]
    if not odd:
        return f"{'ROUTES':10}all auto, none degraded ({_plural(len(routes), 'route')})"
    text = table(
        ("ROUTE", "UPSTREAM", "CRITICALITY", "MODE", "DEGRADED", "FALLBACK", "FORCED BY"),
        [
            (
                r["name"],
                r["upstream"],
                r["criticality"],
                r["mode"],
                "YES" if r["degraded"] else "no",
                r["fallback"] or "none",
                r["forced_by"] or "-",
            )
            for r in odd
        ],
    )
    normal = len(routes) - len(odd)
    return text + (f"\n({_plural(normal, 'more route')} auto, not degraded)" if normal else "")


def _journal_section(queues: Sequence[Json] | None, self_pay: Json | None) -> str:
    if queues is None:
        journal = f"{'JOURNAL':10}unknown: the state store cannot be read"
    else:
        journal = ("JOURNAL\n" if queues else "") + _queues_table(queues)
    if self_pay is None:
        claims = "unknown"
    elif not self_pay["pending"]:
        claims = "none pending"
    else:
        oldest = self_pay["oldest_age_s"]
        claims = f"{self_pay['pending']} claims pending" + (
            f", oldest {age(oldest)}" if oldest is not None else ""
        )
    return f"{journal}\n{'SELF-PAY':10}{claims}"


def _queues_table(queues: Sequence[Json]) -> str:
    if not queues:
        return f"{'JOURNAL':10}empty"
    return table(
        ("QUEUE", "OPEN", "OLDEST", "DEAD"),
        [
            (
                q["queue"],
                str(q["open"]),
                age(q["oldest_age_s"]) if q["oldest_age_s"] is not None else "-",
                _loud(str(q["dead"]), "0"),
            )
            for q in queues
        ],
    )


def _warnings_section(warnings: Sequence[Json]) -> str:
    if not warnings:
        return f"{'WARNINGS':10}none"
    return "WARNINGS\n" + "\n".join(f"  {_warning(w)}" for w in warnings)


def _warning(warning: Json) -> str:
    if not isinstance(warning, dict):
        return str(warning)
    subject_key = next(
        (k for k in ("endpoint", "upstream", "route", "target") if k in warning), None
    )
    text_key = next((k for k in ("detail", "message", "reason") if k in warning), None)
    rest = ", ".join(
        f"{k} {_value(v)}" for k, v in warning.items() if k not in (subject_key, text_key)
    )
    parts = [
        f"{warning[subject_key]}:" if subject_key else "",
        str(warning[text_key]) if text_key else "",
        f"({rest})" if rest else "",
    ]
    return " ".join(p for p in parts if p)


def _drills_line(drills: Sequence[str]) -> str:
    return f"{'DRILLS':10}" + (f"running: {', '.join(drills)}" if drills else "none running")


# -- formatting -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is never padded."""
    lines = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines, values aligned; a value's further lines are indented to match."""
    width = max(len(name) for name, _ in pairs) + 2
    return "\n".join(
        name.ljust(width) + value.replace("\n", "\n" + " " * width) for name, value in pairs
    )


def when(at: float | None, now: float) -> str:
    """Local time of day, with the date when it is not today."""
    if at is None:
        return "-"
    moment = datetime.fromtimestamp(at).astimezone()
    if moment.date() == datetime.fromtimestamp(now).astimezone().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def age(seconds: float) -> str:
    """A duration the way people say it: 42s, 12m05s, 3h02m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short(text: str, limit: int = SHORT_DETAIL_CHARS) -> str:
    text = " ".join(text[: limit * 2].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_detail(detail: Json) -> str:
    """The gist of a journal entry's detail on one line: status, record or reason."""
    if not isinstance(detail, dict):
        return short(str(detail or "-"))
    keys = ("status", "resource", "outcome", "error")
    return short(" ".join(str(detail[k]) for k in keys if k in detail) or "-")


def _until(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "until cleared"
    return f"until {when(expires_at, now)} (in {age(expires_at - now)})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%"


def _tally(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


def _counted(total: int, counts: Mapping[str, int]) -> str:
    return f"{total} ({_tally(counts)})" if counts else str(total)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _loud(value: str, *normal: str) -> str:
    """Upper case when not normal, so trouble stands out in a column."""
    return value if value in normal else value.upper()


def _state(state: str) -> str:
    return _loud(state, "accepted", "replaying", "applied", "duplicate", "discarded")


def _fleet(states: Mapping[str, str]) -> str:
    counts = Counter(states.values())
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "-"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
