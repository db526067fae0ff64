"""`resilgate check`: a bad configuration names file, line and field, and exits 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resilgate.config import ConfigError, load_config
from tests.conftest import REPO

MAIN = """\
listeners:
  public: {host: 127.0.0.1, port: 8080}
upstreams:
  his:
    endpoints:
      - name: primary
        url: http://127.0.0.1:9101
        priority: 0
include_routes: [routes/*.yaml]
"""
ROUTES = """\
routes:
  - name: his-read
    upstream: his
    match:
      path_prefix: /fhir/
      methods: [GET]
  - name: his-write
    upstream: his
    match: {path_prefix: /fhir/, methods: [POST]}
"""


def write_tree(tmp_path: Path, main: str = MAIN, routes: str = ROUTES) -> Path:
    (tmp_path / "routes").mkdir(exist_ok=True)
    (tmp_path / "routes" / "his.yaml").write_text(textwrap.dedent(routes))
    main_path = tmp_path / "resilgate.yaml"
    main_path.write_text(textwrap.dedent(main))
    return main_path


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilgate", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_shipped_hospital_example_is_valid() -> None:
    result = run_check(REPO / "resilgate.yaml")
    assert result.returncode == 0, result.stderr
    config = load_config(REPO / "resilgate.yaml")
    assert set(config.upstreams) == {"his", "registration", "insurance"}
    for upstream in config.upstreams.values():
        assert {(e.name, e.priority) for e in upstream.endpoints} == {("primary", 0), ("dr", 1)}


BAD_CONFIGS = [
    pytest.param(
        MAIN.replace(
            "  public: {host: 127.0.0.1, port: 8080}\n",
            "  public: {host: 0.0.0.0, port: 8080}\n  admin: {host: 127.0.0.1, port: 8080}\n",
        ),
        ROUTES,
        "resilgate.yaml",
        1,
        "listeners",
        "the admin API must have its own port",
        id="admin-on-the-public-port",
    ),
    pytest.param(
        MAIN.replace("  his:\n", "  his:\n   bad: [\n"),
        ROUTES,
        "resilgate.yaml",
        7,
        "",
        "YAML syntax error",
        id="yaml-syntax",
    ),
    pytest.param(
        MAIN,
        ROUTES.replace(
            "    upstream: his\n    match:\n      path_prefix",
            "    upstream: his\n    colour: red\n    match:\n      path_prefix",
        ),
        "his.yaml",
        4,
        "routes[0].colour",
        "unknown key",
        id="unknown-key",
    ),
    pytest.param(
        MAIN.replace("priority: 0", "priority: first"),
        ROUTES,
        "resilgate.yaml",
        8,
        "upstreams.his.endpoints[0].priority",
        "valid integer",
        id="wrong-type",
    ),
    pytest.param(
        MAIN,
        ROUTES.replace("name: his-write\n    upstream: his", "name: his-write\n    upstream: hiss"),
        "his.yaml",
        8,
        "routes[1].upstream",
        "unknown upstream 'hiss' (known: his)",
        id="unknown-upstream",
    ),
    pytest.param(
        MAIN,
        ROUTES.replace("name: his-write", "name: his-read"),
        "his.yaml",
        7,
        "routes[1].name",
        "duplicate route name 'his-read'",
        id="duplicate-route",
    ),
    pytest.param(
        MAIN.replace("http://127.0.0.1:9101", "htp//127.0.0.1:9101"),
        ROUTES,
        "resilgate.yaml",
        7,
        "upstreams.his.endpoints[0].url",
        "URL",
        id="bad-url",
    ),
    pytest.param(
        MAIN.replace("http://127.0.0.1:9101", "ftp://127.0.0.1:9101"),
        ROUTES,
        "resilgate.yaml",
        7,
        "upstreams.his.endpoints[0].url",
        "scheme",
        id="url-scheme",
    ),
    pytest.param(
        MAIN,
        ROUTES.replace("      path_prefix: /fhir/\n      methods: [GET]", "      methods: [GET]"),
        "his.yaml",
        4,
        "routes[0].match",
        "exactly one of path or path_prefix",
        id="no-path",
    ),
    pytest.param(
        MAIN + "upstreams:\n  his: {endpoints: []}\n",
        ROUTES,
        "resilgate.yaml",
        10,
        "upstreams",
        "duplicate key",
        id="duplicate-key",
    ),
    pytest.param(
        MAIN,
        ROUTES.replace(
            "match: {path_prefix: /fhir/,", "match: {host: his.local:8080, path_prefix: /fhir/,"
        ),
        "his.yaml",
        9,
        "routes[1].match.host",
        "without port",
        id="host-with-port",
    ),
    pytest.param(
        MAIN,
        "routes: []\n",
        "resilgate.yaml",
        9,
        "include_routes",
        "no routes",
        id="no-routes",
    ),
    pytest.param(
        MAIN
        + "state:\n  backend: redis\n  redis_url: redis://redis:6379/0\n"
        + "  redis_sentinel: {hosts: ['sentinel-0:26379'], master: hospital}\n",
        ROUTES,
        "resilgate.yaml",
        10,
        "state",
        "one of redis_url and redis_sentinel",
        id="redis-url-and-sentinel",
    ),
    pytest.param(
        MAIN + "state:\n  backend: redis\n  redis_sentinel:\n    master: hospital\n"
        "    hosts: ['sentinel-0:26379', 'sentinel-1']\n",
        ROUTES,
        "resilgate.yaml",
        14,
        "state.redis_sentinel.hosts",
        "'sentinel-1' is not host:port",
        id="sentinel-without-port",
    ),
    pytest.param(
        MAIN.replace("routes/*.yaml", "rotues/*.yaml"),
        ROUTES,
        "resilgate.yaml",
        9,
        "include_routes[0]",
        "no file matches",
        id="include-matches-nothing",
    ),
]


@pytest.mark.parametrize(("main", "routes", "file", "line", "field", "reason"), BAD_CONFIGS)
def test_bad_config_names_file_line_field_and_exits_2(
    tmp_path: Path, main: str, routes: str, file: str, line: int | None, field: str, reason: str
) -> None:
    config = write_tree(tmp_path, main, routes)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problem = caught.value.problems[0]
    assert Path(problem.file).name == file
    assert problem.line == line
    assert problem.field == field
    assert reason in problem.message

    result = run_check(config)
    assert result.returncode == 2
    expected = f"{file}{f':{line}' if line else ''}: {field + ': ' if field else ''}"
    assert expected in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_bad_tokens_file_is_named_with_its_line_and_field(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("- name: ops-alice\n  role: operator\n  sha256: not-a-hash\n")
    config = write_tree(tmp_path, MAIN + "admin: {tokens_file: tokens.yaml}\n")
    result = run_check(config)
    assert result.returncode == 2
    assert f"{tokens}:3: 0.sha256: String should match pattern" in result.stderr, result.stderr


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    routes = ROUTES.replace("upstream: his", "upstream: nowhere")
    with pytest.raises(ConfigError) as caught:
        load_config(write_tree(tmp_path, MAIN, routes))
    assert [p.field for p in caught.value.problems] == ["routes[0].upstream", "routes[1].upstream"]


def test_problems_in_several_files_are_reported_together(tmp_path: Path) -> None:
    main = MAIN.replace("priority: 0", "priority: -1")
    routes = ROUTES.replace("methods: [GET]", "methods: [FETCH]")
    with pytest.raises(ConfigError) as caught:
        load_config(write_tree(tmp_path, main, routes))
    found = {(Path(p.file).name, p.line, p.field) for p in caught.value.problems}
    assert found == {
        ("his.yaml", 6, "routes[0].match.methods[0]"),
        ("resilgate.yaml", 8, "upstreams.his.endpoints[0].priority"),
    }


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    config = write_tree(tmp_path)
    (tmp_path / "routes" / "his.yaml").write_bytes("# 挂号\n".encode("gb18030") + b"routes: []\n")
    result = run_check(config)
    assert result.returncode == 2
    assert "his.yaml: not UTF-8 text" in result.stderr


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = run_check(tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert "absent.yaml: cannot read" in result.stderr


def test_valid_tree_loads_frozen_in_written_order(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path))
    assert [route.name for route in config.routes] == ["his-read", "his-write"]
    with pytest.raises(ValueError, match="frozen"):
        config.routes[0].name = "renamed"  # type: ignore[misc]


def test_a_journal_lease_shorter_than_a_replay_is_refused_at_the_route(tmp_path: Path) -> None:
    main = MAIN + "fallbacks:\n  journal: {claim_lease_s: 20}\n"
    routes = ROUTES.replace(
        "match: {path_prefix: /fhir/, methods: [POST]}",
        "match: {path_prefix: /fhir/, methods: [POST]}\n"
        "    fallback: journal\n"
        "    timeouts: {total_s: 15}",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write_tree(tmp_path, main, routes))
    [problem] = caught.value.problems
    assert (Path(problem.file).name, problem.line) == ("his.yaml", 11)
    assert problem.field == "routes[1].timeouts.total_s"
    assert "2 x 15.0s, over fallbacks.journal.claim_lease_s (20.0s)" in problem.message
    load_config(write_tree(tmp_path, main.replace("20", "30"), routes))  # 2 x 15 fits in 30
