# Minimal stub of dockerfile-parse 2.0: only what tests/deploy uses.
from typing import IO, Any

class DockerfileParser:
    def __init__(
        self,
        path: str | None = None,
        cache_content: bool = False,
        env_replace: bool = True,
        parent_env: dict[str, str] | None = None,
        fileobj: IO[bytes] | None = None,
        build_args: dict[str, str] | None = None,
    ) -> None: ...
    @property
    def structure(self) -> list[dict[str, Any]]: ...
    @property
    def parent_images(self) -> list[str]: ...
    @property
    def is_multistage(self) -> bool: ...
