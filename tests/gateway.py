"""Start a real gateway process in front of real upstream processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO, ServerProcess, Spawner

# Admin API tokens of every test gateway (test-only values; the config holds their hashes).
VIEWER_TOKEN = "test-viewer-token-0123456789abcdef"
OPERATOR_TOKEN = "test-operator-token-0123456789abcdef"
ADMIN_TOKENS = [
    {
        "name": "test-viewer",
        "role": "viewer",
        "sha256": hashlib.sha256(VIEWER_TOKEN.encode()).hexdigest(),
    },
    {
        "name": "test-operator",
        "role": "operator",
        "sha256": hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest(),
    },
]
LOCAL_LISTENERS = {
    "public": {"host": "127.0.0.1", "port": 0},
    "admin": {"host": "127.0.0.1", "port": 0},
}


def write_config(
    path: Path,
    upstreams: dict[str, Any],
    routes: list[dict[str, Any]],
    **top: Any,
) -> Path:
    config = {
        "listeners": LOCAL_LISTENERS,
        "workers": 1,
        "admin": {"tokens": ADMIN_TOKENS},
        "drain_deadline_s": 10,
        # An upstream is given as its list of endpoints, or whole.
        "upstreams": {
            name: {"endpoints": up} if isinstance(up, list) else up
            for name, up in upstreams.items()
        },
        "include_routes": [],
        "routes": routes,
        **top,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(
    spawn: Spawner,
    upstreams: dict[str, Any],
    routes: list[dict[str, Any]],
    workers: int = 1,
    name: str = "gateway",
    env: dict[str, str] | None = None,
    **top: Any,
) -> ServerProcess:
    config = write_config(spawn.tmp_path / f"{name}.yaml", upstreams, routes, **top)
    return spawn.start(
        name, ["serve", "--config", str(config), "--workers", str(workers)], timeout=30, env=env
    )


def primary(url: str, name: str = "primary") -> list[dict[str, Any]]:
    return [{"name": name, "url": url, "priority": 0}]


def admin_cli(
    *args: str, admin: ServerProcess | str | None, token: str | None = OPERATOR_TOKEN
) -> subprocess.CompletedProcess[str]:
    """``resilgate ARGS`` as ops run it: against ``admin`` (a gateway, or a URL) with
    ``token``, both from the environment (None leaves them unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILGATE_ADMIN_")}
    if admin is not None:
        env["RESILGATE_ADMIN_URL"] = admin if isinstance(admin, str) else admin.url("admin")
    if token is not None:
        env["RESILGATE_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "resilgate", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )


def admin_cli_ok(*args: str, admin: ServerProcess, token: str = OPERATOR_TOKEN) -> str:
    """Its output; the command must succeed."""
    done = admin_cli(*args, admin=admin, token=token)
    assert done.returncode == 0, f"resilgate {' '.join(args)}: {done.stderr}"
    return done.stdout
