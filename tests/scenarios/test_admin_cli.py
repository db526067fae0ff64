"""The ops CLI against a real gateway's admin API: tables, --json, errors a person can act on."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from resilgate.admin.auth import token_hash
from resilgate.config import AdminToken
from tests.conftest import ServerProcess, Spawner, wait_until
from tests.gateway import (
    ADMIN_TOKENS,
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    admin_cli,
    primary,
    start_gateway,
)

# No fallback: a route ops put in maintenance answers 503 upstream_in_maintenance.
ROUTES = [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}, "criticality": "core"}]
ENTRY_HEADING = "Add to admin.tokens"


@dataclass
class Minted:
    token: str
    entry: list[dict[str, Any]]  # the YAML the CLI printed, parsed


def cli(
    *args: str, admin: ServerProcess | str | None = None, token: str | None = VIEWER_TOKEN
) -> subprocess.CompletedProcess[str]:
    """``resilgate ...`` as ops run it: the admin URL and token come from the environment."""
    return admin_cli(*args, admin=admin, token=token)


def ok(*args: str, admin: ServerProcess, token: str = VIEWER_TOKEN) -> str:
    done = cli(*args, admin=admin, token=token)
    assert done.returncode == 0, f"resilgate {' '.join(args)}: {done.stderr}"
    assert done.stderr == ""
    return done.stdout


def refused(*args: str, admin: ServerProcess | str, token: str | None = VIEWER_TOKEN) -> str:
    """The one line a failed call prints; it must exit 1 and print nothing on stdout."""
    done = cli(*args, admin=admin, token=token)
    assert (done.returncode, done.stdout) == (1, ""), done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def public_get(gateway: ServerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(gateway.url("public") + "/echo/ward/7", timeout=5) as response:
            return response.status, {}
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def mint(name: str, role: str) -> Minted:
    done = cli("token", "new", "--name", name, "--role", role)
    assert done.returncode == 0, done.stderr
    first, rest = done.stdout.split("\n", 1)
    assert first.startswith("token: ")
    block = rest[rest.index(ENTRY_HEADING) :].split("\n", 1)[1]
    return Minted(first.removeprefix("token: "), yaml.safe_load(textwrap.dedent(block)))


@pytest.fixture(scope="module")
def minted() -> Minted:
    return mint("night-viewer", "viewer")


@pytest.fixture(scope="module")
def gateway(module_spawn: Spawner, minted: Minted) -> ServerProcess:
    """Shared by the tests that change nothing; it also trusts the token the CLI minted, pasted
    into a tokens file as an operator would."""
    echo = module_spawn.simulator("echo")
    tokens_file = module_spawn.tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump(minted.entry))
    admin = {"tokens": ADMIN_TOKENS, "tokens_file": str(tokens_file)}
    return start_gateway(module_spawn, {"echo": primary(echo.url())}, ROUTES, admin=admin)


def test_token_new_prints_an_entry_the_gateway_accepts(
    gateway: ServerProcess, minted: Minted
) -> None:
    (entry,) = minted.entry
    assert AdminToken.model_validate(entry) == AdminToken(
        name="night-viewer", role="viewer", sha256=token_hash(minted.token)
    )
    assert len(minted.token) >= 43  # 256 random bits
    assert ok("status", "--json", admin=gateway, token=minted.token).startswith("{")
    line = refused("mode", "set", "all", "dr", "--reason", "x", admin=gateway, token=minted.token)
    assert "403 forbidden: night-viewer is a viewer" in line

    scripted = json.loads(
        cli("token", "new", "--name", "ops-bob", "--role", "operator", "--json").stdout
    )
    assert scripted["sha256"] == token_hash(scripted["token"]) and scripted["role"] == "operator"
    assert mint("ops-bob", "operator").token != scripted["token"]
    bad = cli("token", "new", "--name", "ops alice", "--role", "viewer")
    assert bad.returncode == 2 and bad.stderr.startswith("error: name: String should match")


def test_status_table_puts_the_incident_level_first(gateway: ServerProcess) -> None:
    wait_until(
        lambda: (
            json.loads(ok("status", "--json", admin=gateway))["upstreams"][0]["endpoints"][0][
                "probes"
            ]
            == "up"
        ),
        10,
        "the probes to see echo up",
    )
    text = ok("status", admin=gateway)
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("INCIDENT  none")
    assert lines[1] == "STORE     sqlite: healthy"
    header = next(n for n, line in enumerate(lines) if line.startswith("UPSTREAM"))
    assert header > 1
    assert lines[header + 1].split()[:6] == ["echo", "auto", "echo/primary", "closed", "up", "100%"]
    # Columns line up: every cell of the row starts under its header.
    for column in ("ENDPOINT", "BREAKER", "PROBES", "SHARE"):
        at = lines[header].index(column)
        assert lines[header + 1][at - 1] == " " and lines[header + 1][at] != " "
    assert "ROUTES    all auto, none degraded (1 route)" in lines
    assert "JOURNAL   empty" in lines and "SELF-PAY  none pending" in lines
    assert "DRILLS    none running" in lines

    status = json.loads(ok("status", "--json", admin=gateway))
    assert status["incident"]["level"] == 0
    assert [e["label"] for u in status["upstreams"] for e in u["endpoints"]] == ["echo/primary"]
    assert [(r["name"], r["mode"], r["degraded"]) for r in status["routes"]] == [
        ("all", "auto", False)
    ]


def test_a_viewer_changing_a_mode_is_told_why_and_nothing_changes(gateway: ServerProcess) -> None:
    line = refused("mode", "set", "all", "maintenance", "--reason", "UPS test", admin=gateway)
    url = gateway.url("admin")
    assert line == (
        f"error: PUT {url}/modes/all: 403 forbidden: test-viewer is a viewer: changes need an "
        "operator"
    )
    assert json.loads(ok("mode", "list", "--json", admin=gateway)) == {"modes": []}
    assert public_get(gateway)[0] == 200


def test_a_missing_or_wrong_token_or_address_says_what_to_fix(gateway: ServerProcess) -> None:
    line = refused("status", admin=gateway, token=None)
    assert "RESILGATE_ADMIN_TOKEN is not set" in line
    line = refused("status", admin=gateway, token="not-a-token-anyone-was-given")
    assert f"GET {gateway.url('admin')}/status: 401 unauthorized" in line
    assert "RESILGATE_ADMIN_TOKEN" in line
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        line = refused("status", admin=url)
    assert line.startswith(f"error: cannot reach the admin API at {url}: connection refused")


def test_journal_on_an_empty_journal(gateway: ServerProcess) -> None:
    text = ok("journal", "list", admin=gateway)
    assert text.splitlines() == ["no journal entries match", "", "JOURNAL   empty"]
    answer = json.loads(ok("journal", "list", "--state", "dead", "--json", admin=gateway))
    assert answer == {"entries": [], "queues": []}
    line = refused("journal", "show", "T-nope", admin=gateway)
    assert line.endswith("/journal/T-nope: 404 no_such_ticket: no ticket T-nope")
    line = refused(
        "journal", "retry", "T-nope", "--reason", "x", admin=gateway, token=OPERATOR_TOKEN
    )
    assert "404 no_such_ticket" in line


def test_mode_set_list_clear_changes_what_the_public_listener_answers(spawn: Spawner) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES)
    assert public_get(gateway)[0] == 200

    force = shlex.split("mode set all maintenance --reason 'UPS test' --expires-in 10m")
    said = ok(*force, admin=gateway, token=OPERATOR_TOKEN)
    assert said.startswith("all: maintenance, forced by test-operator until ")
    assert said.rstrip().endswith(": UPS test") and "(in 9m" in said
    # Applied on the worker that answered before it answered (this gateway has one).
    status, body = public_get(gateway)
    assert (status, body["error"]) == (503, "upstream_in_maintenance")

    listed = ok("mode", "list", admin=gateway).splitlines()
    assert listed[0].split() == ["TARGET", "MODE", "BY", "SINCE", "UNTIL", "REASON"]
    assert listed[1].split()[:3] == ["all", "maintenance", "test-operator"]
    assert listed[1].endswith("UPS test")
    status_text = ok("status", admin=gateway)
    route = next(line for line in status_text.splitlines() if line.startswith("all "))
    assert route.split() == ["all", "echo", "core", "maintenance", "YES", "none", "test-operator"]

    said = ok(
        "mode", "clear", "all", "--reason", "UPS test over", admin=gateway, token=OPERATOR_TOKEN
    )
    assert said.startswith("all: auto")
    assert public_get(gateway)[0] == 200
    assert ok("mode", "list", admin=gateway).startswith("no forced modes")

    line = refused(
        "mode", "set", "nowhere", "dr", "--reason", "x", admin=gateway, token=OPERATOR_TOKEN
    )
    assert "404 unknown_target: no upstream, route or endpoint 'nowhere'" in line


def test_a_drill_started_from_the_cli_reports_what_clients_saw(spawn: Spawner) -> None:
    echo = spawn.simulator("echo")
    gateway = start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES)
    start = shlex.split("drill start all maintenance --duration 1m --reason 'night drill' --json")
    started = json.loads(ok(*start, admin=gateway, token=OPERATOR_TOKEN))
    drill = started["id"]
    assert (started["state"], started["actor"]) == ("running", "test-operator")
    statuses = [public_get(gateway)[0] for _ in range(3)]
    assert statuses == [503, 503, 503]

    def counted() -> str | None:
        shown = ok("drill", "show", drill, admin=gateway)
        return shown if "requests        3\n" in shown else None

    shown = wait_until(counted, 10, "the drill to count the 3 requests")
    print(shown)
    assert shown.startswith(f"drill           {drill} (running, ")
    assert "5xx to clients  3\n" in shown and "5xx 3" in shown
    assert "by              test-operator: night drill\n" in shown
    rows = ok("drill", "list", admin=gateway).splitlines()
    assert rows[1].split()[:4] == [drill, "all", "maintenance", "running"]
    assert refused("drill", "show", "D-000000000000", admin=gateway).endswith(
        "404 no_such_drill: no drill D-000000000000"
    )
