"""The directory where every worker's metrics meet (prometheus-client's multiprocess mode).

prometheus-client chooses between in-process and file-backed values when it is first imported,
from ``PROMETHEUS_MULTIPROC_DIR``; so this module must not import it, and :func:`prepare` runs
before anything that does.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "resilgate-metrics-"  # then the creating process's pid


def prepare(run_dir: Path | None = None, environ: MutableMapping[str, str] = os.environ) -> Path:
    """The metrics directory of this gateway, ready and empty of earlier runs' values.

    With ``PROMETHEUS_MULTIPROC_DIR`` unset, a private directory is made (inside ``run_dir``,
    else the system's temporary directory), named in the variable, and removed when this
    process exits. When set, the directory is created if missing and its ``*.db`` files are
    deleted: left over from an earlier run, they would add to this run's counters. The
    directory belongs to one gateway; two gateways sharing it would wipe each other's values.
    """
    configured = environ.get(ENV)
    if not configured:
        parent = Path(run_dir or tempfile.gettempdir())
        _remove_orphans(parent)
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
        environ[ENV] = str(path)
        atexit.register(_remove, path, os.getpid())
        return path
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return path


def _remove_orphans(parent: Path) -> None:
    """Private directories of gateways that died without cleaning up (SIGKILL, OOM)."""
    for path in parent.glob(f"{PREFIX}*-*"):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path, owner: int) -> None:
    # A child forked without exec inherits atexit handlers; only the creator cleans up.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
