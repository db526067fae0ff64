"""The admin API as ops use it: tokens and roles, modes across replicas, the audit trail."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ServerProcess, Spawner, wait_until_async
from tests.gateway import OPERATOR_TOKEN, VIEWER_TOKEN, primary, start_gateway
from tests.redis_server import RedisServer

ROUTES = [{"name": "all", "upstream": "echo", "match": {"path_prefix": "/"}, "fallback": "notice"}]
OPEN = {"/healthz", "/readyz", "/openapi.json"}
# Concrete values for the document's path parameters, and bodies for its operations.
PARAMS = {"target": "echo", "ticket": "T-no-such-ticket", "drill": "D-no-such-drill"}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/modes/{target}"): {"mode": "dr", "reason": "auth matrix"},
    ("post", "/journal/{ticket}/retry"): {"reason": "auth matrix"},
    ("post", "/journal/{ticket}/discard"): {"reason": "auth matrix"},
    ("post", "/drills"): {"target": "all", "mode": "fallback", "duration_s": 1, "reason": "auth"},
}
WHO = {
    "nobody": None,
    "wrong": "not-a-token-anyone-was-given",
    "viewer": VIEWER_TOKEN,
    "operator": OPERATOR_TOKEN,
}


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None,
    body: dict[str, Any] | None = None,
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with session.request(method, url, json=body, headers=bearer(token)) as response:
        if response.content_type == "application/json":
            payload = await response.json()
        else:
            payload = await response.text()
        return response.status, payload, response.headers


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (method, path template) the document describes, reads before changes."""
    found = [(m, p) for p, item in document["paths"].items() for m in item]
    return sorted(found, key=lambda op: (op[0] != "get", op[0] == "delete", op[1]))


def concrete(path: str, method: str) -> str:
    for name, value in PARAMS.items():
        path = path.replace("{" + name + "}", value)
    return path + ("?reason=auth+matrix" if method == "delete" else "")


@pytest.fixture
def gateway(spawn: Spawner) -> ServerProcess:
    echo = spawn.simulator("echo")
    return start_gateway(spawn, {"echo": primary(echo.url())}, ROUTES)


async def test_every_endpoint_checks_the_token_and_the_role(gateway: ServerProcess) -> None:
    admin = gateway.url("admin")
    async with aiohttp.ClientSession() as session:
        status, document, _ = await call(session, "GET", admin + "/openapi.json", None)
        assert status == 200
        ops = operations(document)
        assert len(ops) >= 17, ops
        table = []
        for method, path in ops:
            url = admin + concrete(path, method)
            body = BODIES.get((method, path))
            row = {}
            for who, token in WHO.items():
                status, payload, headers = await call(session, method.upper(), url, token, body)
                row[who] = status
                if path in OPEN:
                    assert status == 200, (method, path, who, payload)
                elif who in ("nobody", "wrong"):
                    assert status == 401, (method, path, who, payload)
                    assert payload["error"] == "unauthorized"
                    assert headers["WWW-Authenticate"].startswith("Bearer")
                elif who == "viewer" and method != "get":
                    assert status == 403, (method, path, payload)
                    assert "test-viewer is a viewer" in payload["detail"]
                else:
                    # Let through: the answer is the endpoint's own (404 for the made-up ticket).
                    assert status not in (401, 403) and status < 500, (method, path, who, payload)
            table.append(f"{method.upper():6} {path:28} {row}")
    print("\n".join(table))


async def test_a_changed_mode_names_its_operator_in_the_audit(gateway: ServerProcess) -> None:
    admin = gateway.url("admin")
    public = gateway.url("public")
    async with aiohttp.ClientSession() as session:
        change = {"mode": "maintenance", "reason": "UPS test", "expires_in_s": 600}
        status, mode, _ = await call(session, "PUT", admin + "/modes/all", OPERATOR_TOKEN, change)
        assert status == 200
        assert mode["mode"] == "maintenance" and mode["actor"] == "test-operator"
        assert mode["expires_at"] == pytest.approx(time.time() + 600, abs=5)
        # Applied on this worker before the answer: the route's fallback answers at once.
        async with session.get(public + "/anything") as response:
            assert response.status == 503
            assert response.headers["X-Resilgate-Degraded"] == "notice"
        status, shown, _ = await call(session, "GET", admin + "/modes/all", VIEWER_TOKEN)
        assert shown == mode
        status, listed, _ = await call(session, "GET", admin + "/modes", VIEWER_TOKEN)
        assert listed["modes"] == [mode]

        status, cleared, _ = await call(
            session, "DELETE", admin + "/modes/all?reason=UPS+test+over", OPERATOR_TOKEN
        )
        assert (status, cleared["mode"]) == (200, "auto")
        async with session.get(public + "/anything") as response:
            assert response.headers["X-Resilgate-Upstream"] == "echo/primary"
            assert "X-Resilgate-Degraded" not in response.headers

        status, audit, _ = await call(session, "GET", admin + "/audit?limit=2", VIEWER_TOKEN)
        assert [(r["action"], r["actor"], r["target"], r["reason"]) for r in audit["records"]] == [
            ("mode.clear", "test-operator", "all", "UPS test over"),
            ("mode.set", "test-operator", "all", "UPS test"),
        ]
        assert audit["records"][1]["detail"] == "mode=maintenance expires_in_s=600"


@pytest.mark.parametrize(
    ("target", "body", "status", "error"),
    [
        ("nowhere", {"mode": "dr", "reason": "x"}, 404, "unknown_target"),
        ("echo/primary", {"mode": "dr", "reason": "x"}, 400, "bad_mode"),
        ("echo", {"mode": "dr"}, 400, "bad_request"),
        ("echo", {"mode": "dr", "reason": "   "}, 400, "bad_request"),
        ("echo", {"mode": "sideways", "reason": "x"}, 400, "bad_request"),
        ("echo", {"mode": "dr", "reason": "x", "expires_in_s": 0}, 400, "bad_request"),
    ],
)
async def test_a_bad_mode_change_is_refused_with_a_reason(
    gateway: ServerProcess, target: str, body: dict[str, Any], status: int, error: str
) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.url('admin')}/modes/{target}"
        got, payload, _ = await call(session, "PUT", url, OPERATOR_TOKEN, body)
        assert (got, payload["error"]) == (status, error), payload
        assert payload["detail"]
        _, audit, _ = await call(session, "GET", gateway.url("admin") + "/audit", VIEWER_TOKEN)
        assert audit["records"] == []


async def test_a_mode_forced_at_one_replica_applies_at_the_other_and_expires(
    spawn: Spawner, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        echo = spawn.simulator("echo")
        replicas = [
            start_gateway(
                spawn,
                {"echo": primary(echo.url())},
                ROUTES,
                name=f"gw-{n}",
                state={
                    "backend": "redis",
                    "redis_url": redis.url,
                    "spool_path": str(tmp_path / f"spool-{n}.db"),
                },
            )
            for n in range(2)
        ]
        one, other = replicas
        async with aiohttp.ClientSession() as session:
            change = {"mode": "fallback", "reason": "insurer drill", "expires_in_s": 3}
            url = one.url("admin") + "/modes/all"
            status, forced, _ = await call(session, "PUT", url, OPERATOR_TOKEN, change)
            assert status == 200
            set_at = forced["set_at"]

            async def degraded_at_other() -> bool:
                async with session.get(other.url("public") + "/x") as response:
                    return response.headers.get("X-Resilgate-Degraded") == "notice"

            await wait_until_async(degraded_at_other, 5, "the other replica to apply")
            applied_s = time.time() - set_at
            status, seen, _ = await call(
                session, "GET", other.url("admin") + "/modes/all", VIEWER_TOKEN
            )
            assert seen == forced

            async def live_at_other() -> bool:
                async with session.get(other.url("public") + "/x") as response:
                    return response.headers.get("X-Resilgate-Upstream") == "echo/primary"

            await wait_until_async(live_at_other, 10, "the mode to expire")
            late_s = time.time() - forced["expires_at"]

            async def expiry_audited() -> bool:
                _, audit, _ = await call(
                    session, "GET", other.url("admin") + "/audit", VIEWER_TOKEN
                )
                return [r["action"] for r in audit["records"]] == ["mode.expired", "mode.set"]

            await wait_until_async(expiry_audited, 10, "the expiry in the audit log")
            _, audit, _ = await call(session, "GET", one.url("admin") + "/audit", VIEWER_TOKEN)
    finally:
        redis.stop()
    print(
        f"applied at the other replica {applied_s * 1000:.0f} ms after it was set; "
        f"live again {late_s * 1000:.0f} ms after its expiry"
    )
    assert applied_s < 1.0
    assert -0.05 < late_s < 1.0
    expired, set_ = audit["records"]
    assert (set_["actor"], set_["target"], set_["reason"]) == (
        "test-operator",
        "all",
        "insurer drill",
    )
    assert (expired["actor"], expired["target"]) == ("resilgate", "all")
