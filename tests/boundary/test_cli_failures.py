"""What the command line says when a dependency fails: `run` against an unreachable
Postgres, and `submit` whose Redis refuses it after the batch was committed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import anyio
import pytest

from reconciler.config import Settings
from tests.acceptance.processes import run_cli, with_env
from tests.boundary.support import STEADY, Replicas, age_pending, settled
from tests.chaos.harness import free_port, private_redis
from tests.helpers import sql

pytestmark = pytest.mark.timeout(60)
RETRY_HINT: Final = re.compile(r"--batch-id[= ]+([\w.:-]+)")


async def test_run_against_unreachable_postgres_says_one_line(env: dict[str, str]) -> None:
    """Postgres unreachable: `reconciler run` exits 1 with one stderr line naming it."""
    down = with_env(env, RECONCILER_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    done = await anyio.to_thread.run_sync(lambda: run_cli(down, "run", timeout_s=40))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{done.stderr[-3000:]}"
    assert re.search("postgres|database", lines[0], re.IGNORECASE), lines[0]


def _inputs(folder: Path) -> Path:
    folder.mkdir()
    for name in ("a.csv", "b.csv"):
        (folder / name).write_text("id,amount\n1,2\n")
    return folder


async def _batch_ids(database_url: str) -> list[str]:
    return [r[0] for r in await sql(database_url, "SELECT batch_id FROM batches")]


async def test_submit_failing_after_commit_names_the_batch_to_retry(
    settings: Settings, env: dict[str, str], replicas: Replicas, tmp_path: Path
) -> None:
    """Wrong Redis password: exit 1 naming the batch to retry; the retry is idempotent."""
    database_url = settings.database_url or ""
    inputs = _inputs(tmp_path / "inputs")
    with private_redis(tmp_path, password="right") as server:
        wrong = with_env(env, RECONCILER_REDIS_URL=server.url.replace(":right@", ":wrong@"))
        right = with_env(env, RECONCILER_REDIS_URL=server.url, RECONCILER_HANDLER=STEADY)
        failed = await anyio.to_thread.run_sync(lambda: run_cli(wrong, "submit", str(inputs)))
        hint = RETRY_HINT.search(failed.stdout + failed.stderr)
        assert failed.returncode == 1, failed.stderr[-2000:]
        assert hint, f"no batch id to retry with:\n{failed.stdout}{failed.stderr[-2000:]}"
        assert await _batch_ids(database_url) == [hint[1]]
        again = await anyio.to_thread.run_sync(
            lambda: run_cli(right, "submit", str(inputs), "--batch-id", hint[1])
        )
        assert again.returncode == 0 and "already existed" in again.stdout, again
        assert await _batch_ids(database_url) == [hint[1]]
        await age_pending(database_url)
        await replicas.up("all", right)
        assert await settled(database_url, hint[1]) == "completed"
