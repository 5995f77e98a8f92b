"""Static checks of deploy/Dockerfile and .dockerignore (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

BASE_IMAGE = "python:3.11-slim"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cc ", "clang", "libpq-dev")


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of (keyword, args), joining continuation lines."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].rstrip() + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    if buffer:
        logical.append(buffer)

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, f"unparsable FROM line: {line}"
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    return stages[0]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes a context path (last matching pattern wins)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern[1:] if negate else pattern
        bare = bare.strip("/")
        candidates = {bare, bare.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, c) for prefix in prefixes for c in candidates):
            result = not negate
    return result


def test_dockerfile_is_multi_stage_on_python_311_slim(stages: list[Stage]) -> None:
    """The image is built in at least two stages, all on python:3.11-slim."""
    assert len(stages) >= 2
    assert {stage.base for stage in stages} == {BASE_IMAGE}
    assert stages[0].name, "the builder stage is named so the final stage can copy from it"


def test_builder_installs_the_project_with_pip_install_dot(builder: Stage) -> None:
    """The builder creates a venv and installs the project with `pip install .`."""
    runs = " && ".join(builder.all("RUN"))
    assert re.search(r"python3? -m venv /opt/venv", runs)
    assert re.search(r"\bpip install \.(\s|$)", runs), runs
    copied = " ".join(builder.all("COPY"))
    for source in ("pyproject.toml", "reconciler", "schema"):
        assert source in copied


def test_runtime_stage_copies_the_venv_from_the_builder_only(
    builder: Stage, runtime: Stage
) -> None:
    """The final stage copies only the venv from the builder, nothing from the context."""
    copies = runtime.all("COPY")
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert not runtime.all("ADD")


def test_runtime_stage_has_no_build_tools_or_installs(runtime: Stage) -> None:
    """The final stage installs no compiler and runs no pip or apt install."""
    for run in runtime.all("RUN"):
        assert "pip install" not in run
        assert "apt-get install" not in run and "apt install" not in run
        for tool in BUILD_TOOLS:
            assert tool not in run, f"{tool!r} in runtime RUN: {run}"


def test_runtime_runs_as_non_root_uid_10001(runtime: Stage) -> None:
    """The final stage switches to numeric uid 10001, never root."""
    users = runtime.all("USER")
    assert users, "USER is set in the final stage"
    user = users[-1].split(":")[0]
    assert user == "10001"
    creates = " ".join(runtime.all("RUN"))
    assert "--uid 10001" in creates


def test_entrypoint_and_cmd_are_exec_form(runtime: Stage) -> None:
    """ENTRYPOINT ["reconciler"] and CMD ["run"] are JSON arrays so SIGTERM reaches Python."""
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["reconciler"]
    assert json.loads(runtime.all("CMD")[-1]) == ["run"]


def test_runtime_exposes_8080_and_is_unbuffered(runtime: Stage) -> None:
    """The final stage exposes port 8080 and sets PYTHONUNBUFFERED=1."""
    assert "8080" in " ".join(runtime.all("EXPOSE")).split()
    env: dict[str, str] = {}
    for args in runtime.all("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            if sep:
                env[key] = value
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PATH", "").startswith("/opt/venv/bin:")


def test_dockerignore_excludes_local_state() -> None:
    """.dockerignore keeps the venv, git metadata and tool caches out of the context."""
    patterns = _dockerignore_patterns()
    for path in (
        ".venv",
        ".git",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "reconciler/__pycache__",
        "tests",
        ".env",
    ):
        assert _ignored(path, patterns), path


def test_dockerignore_keeps_what_the_dockerfile_copies(builder: Stage) -> None:
    """Every build-context path the builder COPYs is not excluded by .dockerignore."""
    patterns = _dockerignore_patterns()
    sources: list[str] = []
    for args in builder.all("COPY"):
        tokens = [t for t in args.split() if not t.startswith("--")]
        sources.extend(tokens[:-1])
    assert sources
    for source in sources:
        assert not _ignored(source.rstrip("/"), patterns), source
