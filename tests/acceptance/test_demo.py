"""`reconciler demo` end to end: embedded servers, partial failure, the killed worker."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anyio

from tests.acceptance.processes import run_cli, with_env
from tests.services import Endpoints

DEMO_TIMEOUT_S = 120.0


def _processes_using(path: Path) -> list[int]:
    """Live pids working inside the path: the embedded servers run in their data dirs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and cwd.is_relative_to(path.resolve()):
            found.append(int(entry.name))
    return found


def _demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    return with_env(env, COLUMNS="200", **extra)


async def test_demo_on_embedded_servers_shows_every_trigger_story(tmp_path: Path) -> None:
    """With no URLs the demo starts embedded servers, finalizes all, and leaves none running."""
    data = tmp_path / "demo-data"
    assert _processes_using(Path.cwd()), "the check sees this very process"
    args = ("demo", "--data-dir", str(data), "--port", "0", "--kill-worker")
    done = await anyio.to_thread.run_sync(
        lambda: run_cli(_demo_env(), *args, timeout_s=DEMO_TIMEOUT_S)
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting embedded servers" in out
    assert len(re.findall(r"completed_with_errors\s+│ event\s+│ 6\s+│ 3", out)) == 2
    assert re.search(r"killed-w\S*\s+│ completed_with_errors\s+│ deadline\s+│ 0\s+│ 6", out)
    assert "worker killed with" in out
    assert re.search(r"GET /api/batches/\S+/summary -> 200", out)
    assert re.search(r"web console: http://127\.0\.0\.1:\d+/ui/", out)
    assert "size_bytes" in out and "IsADirectoryError: not a file" in out
    assert _processes_using(data) == [], "embedded servers stopped on exit"


async def test_demo_uses_configured_services_when_given(
    services: Endpoints, database_url: str, namespace: str, tmp_path: Path
) -> None:
    """With URLs set the demo never starts embedded servers."""
    env = _demo_env(
        RECONCILER_DATABASE_URL=database_url,
        RECONCILER_REDIS_URL=services.redis_url,
        RECONCILER_NAMESPACE=namespace,
    )
    args = ("demo", "--data-dir", str(tmp_path), "--port", "0", "--batches", "1")
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, *args, timeout_s=DEMO_TIMEOUT_S))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting embedded servers" not in done.stdout
    assert re.search(r"web console: http://127\.0\.0\.1:\d+/ui/", done.stdout)
    assert re.search(r"completed_with_errors\s+│ event\s+│ 6\s+│ 3", done.stdout)
    assert not (tmp_path / "postgres").exists()
