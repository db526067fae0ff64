"""The OpenAPI 3.1 document of the admin API, built from the models the handlers validate with."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from resilgate import __version__
from resilgate.admin.models import (
    Alive,
    AuditList,
    DrillList,
    DrillRequest,
    JournalItem,
    JournalList,
    ModeChange,
    ModeList,
    ModeView,
    Problem,
    Ready,
    ReasonBody,
    Status,
)
from resilgate.drills import DrillView

REF = "#/components/schemas/{model}"
BODIES: tuple[type[BaseModel], ...] = (ModeChange, ReasonBody, DrillRequest)
ANSWERS: tuple[type[BaseModel], ...] = (
    Alive,
    Ready,
    Status,
    ModeView,
    ModeList,
    AuditList,
    JournalItem,
    JournalList,
    DrillView,
    DrillList,
    Problem,
)
NAME = r"^[A-Za-z0-9_.:-]{1,128}$"
TARGET = r"^[a-z0-9][a-z0-9_-]{0,62}(/[a-z0-9][a-z0-9_-]{0,62})?$"
WHY = {
    400: "The request is malformed (the detail says which field and why).",
    401: "No valid bearer token.",
    403: "A viewer token tried to change something.",
    404: "No such target, ticket or drill.",
    409: "Not allowed in the current state (the detail says why).",
    503: "The state store cannot be reached, or the worker is starting or draining.",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _path_param(name: str, pattern: str, about: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": about,
        "schema": {"type": "string", "pattern": pattern},
    }


def _query(name: str, schema: dict[str, Any], about: str, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": about,
        "schema": schema,
    }


LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most this many.")
TARGET_PARAM = _path_param(
    "target", TARGET, "An upstream, a route, or an endpoint as `upstream/endpoint`."
)
TICKET = _path_param("ticket", NAME, "The ticket the gateway gave when it accepted the write.")


def _op(
    summary: str,
    answer: type[BaseModel] | None,
    *,
    ok: int = 200,
    errors: tuple[int, ...] = (),
    params: tuple[dict[str, Any], ...] = (),
    body: type[BaseModel] | None = None,
    public: bool = False,
    changes: bool = False,
    text: bool = False,
) -> dict[str, Any]:
    if text:
        success: dict[str, Any] = {"text/plain": {"schema": {"type": "string"}}}
    else:
        assert answer is not None
        success = _content(answer)
    responses: dict[str, Any] = {str(ok): {"description": summary, "content": success}}
    codes = set(errors) | ({400} if body is not None or params else set())
    if not public:
        codes |= {401}
    if changes:
        codes |= {403}
    for code in sorted(codes):
        responses[str(code)] = {"description": WHY[code], "content": _content(Problem)}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        operation["parameters"] = list(params)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _content(body)}
    if public:
        operation["security"] = []
    return operation


def _paths() -> dict[str, Any]:
    store = (503,)
    return {
        "/healthz": {"get": _op("The process is alive.", Alive, public=True)},
        "/readyz": {
            "get": _op("Ready to route (503 while starting or draining).", Ready, public=True)
            | {
                "responses": {
                    "200": {"description": "Ready.", "content": _content(Ready)},
                    "503": {"description": "Not ready.", "content": _content(Ready)},
                }
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/metrics": {"get": _op("Prometheus metrics of all workers.", None, text=True)},
        "/status": {"get": _op("Upstreams, routes, store, journal, incident level.", Status)},
        "/modes": {"get": _op("Forced modes in force.", ModeList, errors=store)},
        "/modes/{target}": {
            "get": _op(
                "The mode of a target.", ModeView, errors=(404, *store), params=(TARGET_PARAM,)
            ),
            "put": _op(
                "Force a mode (or `auto`), with a reason and an optional expiry.",
                ModeView,
                errors=(404, *store),
                params=(TARGET_PARAM,),
                body=ModeChange,
                changes=True,
            ),
            "delete": _op(
                "Back to `auto`.",
                ModeView,
                errors=(404, *store),
                params=(
                    TARGET_PARAM,
                    _query(
                        "reason",
                        {"type": "string", "minLength": 1, "maxLength": 500, "pattern": r"\S"},
                        "Why (kept in the audit log).",
                        required=True,
                    ),
                ),
                changes=True,
            ),
        },
        "/audit": {
            "get": _op(
                "Who changed what, when and why; newest first.",
                AuditList,
                errors=store,
                params=(LIMIT,),
            )
        },
        "/journal": {
            "get": _op(
                "Journaled writes, self-pay claims and local registrations; queue depths.",
                JournalList,
                errors=store,
                params=(
                    _query(
                        "state",
                        {"type": "string", "enum": ["open", "dead", "all"]},
                        "`open`: not replayed yet; `dead`: conflicts and failures for a person.",
                    ),
                    _query("queue", {"type": "string"}, "Only this queue (an upstream's name)."),
                    LIMIT,
                ),
            )
        },
        "/journal/{ticket}": {
            "get": _op(
                "One entry (never its body).", JournalItem, errors=(404, *store), params=(TICKET,)
            )
        },
        "/journal/{ticket}/retry": {
            "post": _op(
                "Replay a dead letter again (next in its queue).",
                JournalItem,
                errors=(404, 409, *store),
                params=(TICKET,),
                body=ReasonBody,
                changes=True,
            )
        },
        "/journal/{ticket}/discard": {
            "post": _op(
                "Never replay this entry (ops settled it by hand).",
                JournalItem,
                errors=(404, 409, *store),
                params=(TICKET,),
                body=ReasonBody,
                changes=True,
            )
        },
        "/drills": {
            "post": _op(
                "Start a drill: force a degraded mode on a target for a bounded time.",
                DrillView,
                ok=201,
                errors=(404, 409, *store),
                body=DrillRequest,
                changes=True,
            ),
            "get": _op("Drills, newest first.", DrillList, errors=store),
        },
        "/drills/{drill}": {
            "get": _op(
                "A drill and its report.",
                DrillView,
                errors=(404, *store),
                params=(_path_param("drill", NAME, "The drill's id."),),
            )
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once per process: it depends on code only)."""
    pairs = [(m, "validation") for m in BODIES] + [(m, "serialization") for m in ANSWERS]
    _, schemas = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "resilgate admin API",
            "version": __version__,
            "description": "Status, modes, audit, journal, drills and metrics of a resilgate "
            "gateway. Bearer tokens: `viewer` reads, `operator` also changes.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
