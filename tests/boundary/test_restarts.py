"""Processes stopped and started again: rolling SIGTERM restarts, a SIGKILL inside a
retry, and the consumer names stopped processes leave in the group."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Final

import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import with_env
from tests.boundary.support import (
    Replicas,
    calls,
    consumer_of,
    consumers,
    files_of,
    journal_grows,
    redis_client,
    settled,
    stop,
    work,
)
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(90)
ROLLING_FILES: Final = 12
RESTARTS: Final = 3
GROUP_CLEAN_S: Final = 15.0


async def test_rolling_sigterm_restarts_fail_no_file(
    settings: Settings, ports: Ports, replicas: Replicas, journal: Path
) -> None:
    """SIGTERM as each run starts a file, three times: every file succeeds, each ran once."""
    await submit(ports, files(ROLLING_FILES, work(journal, 0.3)), batch_id="rolling")
    replicas.env = with_env(replicas.env, RECONCILER_CONCURRENCY="1")
    for _ in range(RESTARTS):
        seen = len(calls(journal))
        process = replicas.start()
        await journal_grows(journal, seen)
        assert await stop(process, signal.SIGTERM) == 0
    await replicas.up()
    await settled(settings.database_url or "", "rolling")
    statuses = Counter(
        f["status"] for f in (await files_of(settings.database_url or "", "rolling")).values()
    )
    runs = Counter(c.file_id for c in calls(journal))
    assert statuses == {"succeeded": ROLLING_FILES}, f"file statuses: {statuses}"
    assert len(runs) == ROLLING_FILES, f"the handler saw {len(runs)} of {ROLLING_FILES} files"
    assert set(runs.values()) == {1}, f"handler runs per file: {runs}"


async def _age_leases(settings: Settings) -> None:
    """As if the visibility timeout had passed: Postgres leases and Redis idle times."""
    await sql(settings.database_url or "", "UPDATE batch_files SET lease_expires_at = now()"
              " WHERE status = 'processing'")  # fmt: skip
    stream, group = f"{settings.namespace}:jobs", f"{settings.namespace}:workers"
    async with redis_client(settings.redis_url or "") as client:
        for entry in await client.xpending_range(stream, group, "-", "+", 100):
            await client.xclaim(stream, group, str(entry["consumer"]), 0, [entry["message_id"]],
                                idle=3_600_000, justid=True)  # fmt: skip


async def _attempt_recorded(settings: Settings, attempt: int) -> None:
    """Waits until Postgres counts the running attempt: the crash lands well inside it."""

    async def counted() -> bool:
        rows = await sql(settings.database_url or "", "SELECT max(attempts) FROM batch_files")
        return int(rows[0][0]) >= attempt

    await wait_for(counted, timeout_s=10, what=f"attempt {attempt} counted while it runs")


async def test_sigkill_inside_a_retry_keeps_attempts_increasing(
    settings: Settings, ports: Ports, replicas: Replicas, journal: Path
) -> None:
    """SIGKILL during attempt 2 (attempt 1 failed): the next run makes attempt 3, not 2."""
    replicas.env = with_env(
        replicas.env, RECONCILER_HANDLER="tests.boundary.handlers:fail_then_stall"
    )
    await submit(ports, files(1, {"journal": str(journal)}), batch_id="retried")
    process = replicas.start()
    await journal_grows(journal, 1)  # attempt 1 failed, attempt 2 is running
    await _attempt_recorded(settings, 2)
    await stop(process, signal.SIGKILL)
    await _age_leases(settings)
    await replicas.up()
    await settled(settings.database_url or "", "retried")
    attempts = [c.attempt for c in calls(journal)]
    (row,) = (await files_of(settings.database_url or "", "retried")).values()
    assert row["status"] == "succeeded", row
    assert attempts == sorted(set(attempts)), f"attempts seen by the handler: {attempts}"
    assert attempts[:3] == [1, 2, 3], f"attempts seen by the handler: {attempts}"
    assert len(attempts) <= 3 + 1, f"runs: {attempts}"


async def _worked(
    replicas: Replicas, ports: Ports, settings: Settings, name: str, role: str = "worker"
) -> str:
    """Starts a run, has it process one file (so it joins the group); its consumer."""
    process = await replicas.up(role)
    await submit(ports, files(1, {"fail_rate": 0.0}), batch_id=name)
    await settled(settings.database_url or "", name)
    return consumer_of(process)


async def test_stopped_consumers_leave_the_group(
    settings: Settings, ports: Ports, replicas: Replicas
) -> None:
    """After a SIGKILLed and a SIGTERMed run, only the live consumer stays in the group."""
    dead = [await _worked(replicas, ports, settings, "killed")]
    await stop(replicas.processes[-1], signal.SIGKILL)
    dead.append(await _worked(replicas, ports, settings, "stopped"))
    assert await stop(replicas.processes[-1], signal.SIGTERM) == 0
    live = await _worked(replicas, ports, settings, "live", "all")

    async def only_live() -> bool:
        return await consumers(settings.redis_url or "", settings.namespace) == [live]

    try:
        await wait_for(only_live, timeout_s=GROUP_CLEAN_S, what="only the live consumer")
    except AssertionError:
        left = await consumers(settings.redis_url or "", settings.namespace)
        raise AssertionError(
            f"consumers in the group: {left}; live: {live}, dead: {dead}"
        ) from None
