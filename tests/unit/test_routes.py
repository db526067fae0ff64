"""Route matching: first match in written order, on host, path, method and a body field."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from resilgate.config import Route
from resilgate.routes import RouteTable, host_without_port


def route(name: str, upstream: str = "his", **match: Any) -> Route:
    return Route.model_validate({"name": name, "upstream": upstream, "match": match})


TABLE = RouteTable(
    [
        route(
            "settle",
            "insurance",
            path="/fsi/api/callService",
            methods=["POST"],
            body={"field": "infno", "values": ["2207", "2208"]},
        ),
        route("insurance", "insurance", path="/fsi/api/callService"),
        route("his-read", path_prefix="/fhir/", methods=["GET", "HEAD"]),
        route("his-write", path_prefix="/fhir/", methods=["POST"], host="his.local"),
        route("exact", path="/fhir"),
    ]
)


def test_first_written_match_wins() -> None:
    assert TABLE.match("GET", "any", "/fhir/Patient/1").name == "his-read"  # type: ignore[union-attr]
    assert TABLE.match("GET", "any", "/fhir").name == "exact"  # type: ignore[union-attr]


def test_method_host_and_exact_path() -> None:
    assert TABLE.match("POST", "his.local", "/fhir/MedicationRequest").name == "his-write"  # type: ignore[union-attr]
    assert TABLE.match("POST", "other", "/fhir/MedicationRequest") is None
    assert TABLE.match("GET", "any", "/fsi/api/callService/x") is None
    assert TABLE.match("DELETE", "any", "/fhir/Patient/1") is None


def test_body_field_selects_route() -> None:
    body_route = TABLE.body_route("POST", "h", "/fsi/api/callService")
    assert body_route is not None and body_route.name == "settle"
    assert TABLE.body_route("GET", "h", "/fhir/Patient/1") is None
    settle = TABLE.match("POST", "h", "/fsi/api/callService", {"infno": "2207"})
    trial = TABLE.match("POST", "h", "/fsi/api/callService", {"infno": "2206"})
    numeric = TABLE.match("POST", "h", "/fsi/api/callService", {"infno": 2208})
    assert (settle and settle.name, trial and trial.name) == ("settle", "insurance")
    assert numeric is not None and numeric.name == "settle"
    boolean = TABLE.match("POST", "h", "/fsi/api/callService", {"infno": True})
    assert boolean is not None and boolean.name == "insurance"


def test_body_not_needed_when_a_plain_route_matches_first() -> None:
    table = RouteTable(
        [
            route("plain", path="/x"),
            route("by-body", path="/x", body={"field": "a", "values": ["1"]}),
        ]
    )
    assert table.body_route("POST", "h", "/x") is None


def test_host_without_port() -> None:
    assert host_without_port("His.Local:8080") == "his.local"
    assert host_without_port("[::1]:8080") == "[::1]"
    assert host_without_port("his.local") == "his.local"


paths = st.text(alphabet="/abcdefz", min_size=1, max_size=12).map(lambda p: "/" + p)


@given(prefixes=st.lists(paths, min_size=1, max_size=6), path=paths)
def test_match_is_the_first_route_whose_prefix_matches(prefixes: list[str], path: str) -> None:
    table = RouteTable([route(f"r{i}", path_prefix=p) for i, p in enumerate(prefixes)])
    expected = next((f"r{i}" for i, p in enumerate(prefixes) if path.startswith(p)), None)
    found = table.match("GET", "h", path)
    assert (found.name if found else None) == expected
