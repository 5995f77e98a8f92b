"""docs/deploy.md covers the contract settings; scripts/ensure-tools behaves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY_DOC = REPO / "docs" / "deploy.md"
ENSURE_TOOLS = REPO / "scripts" / "ensure-tools"
BASH = shutil.which("bash") or "/bin/bash"

CONTRACT_ENV = (
    "RECONCILER_DATABASE_URL",
    "RECONCILER_REDIS_URL",
    "RECONCILER_NAMESPACE",
    "RECONCILER_HTTP_HOST",
    "RECONCILER_HTTP_PORT",
    "RECONCILER_HANDLER",
    "RECONCILER_CONCURRENCY",
    "RECONCILER_SWEEP_INTERVAL_S",
    "RECONCILER_STUCK_GRACE_S",
    "RECONCILER_VISIBILITY_TIMEOUT_S",
    "RECONCILER_MAX_ATTEMPTS",
    "RECONCILER_API_TOKEN",
    "RECONCILER_LOG_FORMAT",
    "RECONCILER_DATABASE_POOLER",
    "RECONCILER_RETENTION_DAYS",
)


def _run_ensure_tools(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(ENSURE_TOOLS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_deploy_doc_has_a_row_for_every_contract_setting() -> None:
    """docs/deploy.md's configuration table has one row per RECONCILER_* variable."""
    rows = [
        line for line in DEPLOY_DOC.read_text(encoding="utf-8").splitlines() if line.startswith("|")
    ]
    for name in CONTRACT_ENV:
        assert any(row.startswith(f"| `{name}` |") for row in rows), name


def test_deploy_doc_covers_scaling_pgbouncer_redis_and_sizing() -> None:
    """docs/deploy.md has the scaling, PgBouncer, Redis and sizing sections with key facts."""
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (.+)$", text, re.M))
    assert {
        "Scaling out",
        "Postgres behind PgBouncer",
        "Redis persistence",
        "Sizing",
        "Configuration",
    } <= headings
    for fact in (
        "pg_try_advisory_xact_lock",
        "statement_cache_size=0",
        "1.21",
        "AOF",
        "docs/PERFORMANCE.md",
        "`worker`",
        "`sweeper`",
        "`api`",
    ):
        assert fact in text, fact


def test_ensure_tools_is_valid_bash() -> None:
    """scripts/ensure-tools parses as bash and is executable."""
    assert os.access(ENSURE_TOOLS, os.X_OK)
    result = subprocess.run([BASH, "-n", str(ENSURE_TOOLS)], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


def test_ensure_tools_is_a_no_op_when_promtool_is_present() -> None:
    """With promtool on PATH, ensure-tools reports it and exits 0 without installing."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (run scripts/ensure-tools)")
    result = _run_ensure_tools(dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "promtool present" in result.stderr
    assert "installing" not in result.stderr
    if shutil.which("chromium") is not None:
        assert "chromium present" in result.stderr


def test_ensure_tools_is_a_no_op_when_pgbouncer_is_present() -> None:
    """With pgbouncer installed, ensure-tools reports it and installs nothing."""
    if shutil.which("pgbouncer", path=os.defpath + ":/usr/sbin") is None:
        pytest.skip("pgbouncer is not installed (run scripts/ensure-tools)")
    result = _run_ensure_tools(dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "pgbouncer present" in result.stderr
    assert "installing" not in result.stderr


def test_ensure_tools_exits_zero_with_a_message_when_it_cannot_install(tmp_path: Path) -> None:
    """Without promtool and without apt-get, ensure-tools says so and still exits 0."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    result = _run_ensure_tools(env)
    assert result.returncode == 0, result.stderr
    assert "promtool" in result.stderr
    assert "skipped" in result.stderr
    assert "chromium missing" in result.stderr
