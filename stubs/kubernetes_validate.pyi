# Minimal stub of kubernetes-validate 1.37: only what tests/deploy uses.
from collections import deque
from typing import Any

class ValidationError(Exception):
    message: str
    path: deque[str | int]
    version: str

class SchemaNotFoundError(Exception):
    message: str

def validate(data: dict[str, Any], desired_version: str, strict: bool = False) -> str: ...
