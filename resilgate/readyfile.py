"""The ready file: how a server started with port 0 tells its starter where it listens."""

import os
from pathlib import Path

import orjson


def write_ready_file(path: Path, listeners: dict[str, int]) -> None:
    """Atomically write ``{"pid": ..., "listeners": {name: port}}`` to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps({"pid": os.getpid(), "listeners": listeners}))
    os.replace(tmp, path)
