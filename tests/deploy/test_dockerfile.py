"""The Dockerfile: two stages, only the package's sources copied, a non-root final stage without
build tools, and `resilgate serve` reading the file where the chart mounts it."""

from __future__ import annotations

import fnmatch
import json
import shlex
import tomllib
from dataclasses import dataclass
from typing import Any

import helm_python
import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy.chart import REPO, container, render

BUILD_TOOLS = ("apt-get", "apt ", "apk ", "gcc", "g++", "make ", "build-essential", "pip ")


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: list[dict[str, Any]]

    def values(self, instruction: str) -> list[str]:
        return [str(i["value"]) for i in self.instructions if i["instruction"] == instruction]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    found: list[Stage] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            image, _, name = str(instruction["value"]).partition(" AS ")
            found.append(Stage(image.strip(), name.strip() or None, []))
        elif instruction["instruction"] != "COMMENT":
            assert found, "an instruction before the first FROM"
            found[-1].instructions.append(instruction)
    return found


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


def _copy_sources(value: str) -> tuple[list[str], list[str]]:
    """Flags and source paths of a COPY (the last word is the destination)."""
    words = shlex.split(value)
    flags = [word for word in words if word.startswith("--")]
    paths = [word for word in words if not word.startswith("--")]
    return flags, paths[:-1]


def test_two_stages_on_the_same_slim_python(stages: list[Stage]) -> None:
    assert [stage.image for stage in stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert stages[0].name == "build"
    assert stages[1].name is None


def test_every_copied_file_exists_and_reaches_the_build(stages: list[Stage]) -> None:
    ignore = _dockerignore()
    copied: list[str] = []
    for stage in stages:
        for value in stage.values("COPY") + stage.values("ADD"):
            flags, sources = _copy_sources(value)
            if any(flag.startswith("--from=") for flag in flags):
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repo"
                assert not _ignored(source, ignore), f"COPY {source}: excluded by .dockerignore"
                copied.append(source.rstrip("/"))
    # what `pip install .` needs, and nothing else
    assert sorted(copied) == ["README.md", "fallbacks", "pyproject.toml", "resilgate"]


def test_dockerignore_keeps_local_state_out(stages: list[Stage]) -> None:
    ignore = _dockerignore()
    for path in (".venv", ".git", "var", "benchmarks/results", "tests", "resilgate.egg-info"):
        assert _ignored(path, ignore), path


def test_final_stage_is_the_venv_only_run_as_non_root(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.values("COPY") == ["--from=build /opt/venv /opt/venv"]
    (user,) = final.values("USER")
    assert user not in {"root", "0"} and not user.startswith("0:")
    assert user == "10001"
    for run in final.values("RUN"):
        for tool in BUILD_TOOLS:
            assert tool not in f"{run} ", f"final stage runs {tool.strip()}: {run}"
    env = " ".join(final.values("ENV"))
    for setting in ("PATH=/opt/venv/bin:$PATH", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert setting in env.split(), setting


def test_entrypoint_is_the_resilgate_command(stages: list[Stage]) -> None:
    final = stages[-1]
    (entrypoint,) = final.values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["resilgate"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["resilgate"] == "resilgate.cli:main"
    (cmd,) = final.values("CMD")
    assert json.loads(cmd) == ["serve", "--config", "/etc/resilgate/resilgate.yaml"]


def test_image_and_chart_agree_on_ports_and_command(
    stages: list[Stage], chart: helm_python.Chart
) -> None:
    final = stages[-1]
    rendered = render(chart, {})
    main = container(rendered)
    (cmd,) = final.values("CMD")
    assert main["args"] == json.loads(cmd)
    assert "command" not in main  # the image's ENTRYPOINT runs
    (expose,) = final.values("EXPOSE")
    assert sorted(int(port) for port in expose.split()) == sorted(
        p["containerPort"] for p in main["ports"]
    )
    user = int(final.values("USER")[0])
    assert (
        rendered.one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        == user
    )
