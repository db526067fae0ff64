"""schemathesis against the admin API's own ``/openapi.json``: with an operator token, no
generated request gets a server error or an answer the document does not describe."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ServerProcess, Spawner
from tests.gateway import OPERATOR_TOKEN, primary, start_gateway

ROUTES = [
    {"name": "fhir", "upstream": "echo", "match": {"path_prefix": "/fhir/"}, "fallback": "notice"},
    {"name": "rest", "upstream": "echo", "match": {"path_prefix": "/"}},
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def admin_gateway(module_spawn: Spawner) -> ServerProcess:
    echo = module_spawn.simulator("echo")
    return start_gateway(module_spawn, {"echo": primary(echo.url())}, ROUTES, name="openapi-gw")


def test_the_admin_api_keeps_to_its_document(admin_gateway: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(admin_gateway.url("admin") + "/openapi.json")
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    tried = []
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def keeps_to_the_document(case: Any) -> None:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        keeps_to_the_document()
        tried.append(operation.label)
    print(f"{len(tried)} operations, {sum(statuses.values())} calls, statuses {statuses}")
    assert len(tried) >= 16
    assert sum(statuses.values()) >= 100
