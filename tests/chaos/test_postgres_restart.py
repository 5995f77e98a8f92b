"""Scenario 3: Postgres restarted mid-run (a private embedded server behind a fixed-port
proxy), and a backend terminated with pg_terminate_backend in the middle of a
finalization: pools recover, no transaction is half-applied, nothing finalized twice."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
import pytest

from reconciler import migrations
from reconciler.app import Ports, open_ports
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.errors import RetryableError
from tests.acceptance.processes import with_env
from tests.chaos.faulty_proxy import FaultyProxy, faulty_proxy
from tests.chaos.harness import (
    SIZE,
    Audit,
    Fleet,
    PrivatePostgres,
    assert_nothing_lost_or_duplicated,
    audit,
    audit_fields,
    finalized_twice,
    first_finished_after,
    report,
    seconds_since,
    settled_audit,
    started,
    wait_for_event,
)
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
REPLICAS: Final = 2
DOWN_S: Final = 4.0  # past the 2 s visibility timeout, like test_redis_restart.DOWN_S
RESUBMITS: Final = 100
PAYLOAD: Final = {"min_s": 0.02, "max_s": 0.05, "fail_rate": 0.05}
BLOCKED_FINALIZE: Final = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> $1
  AND wait_event = 'transactionid' AND query LIKE '%reconciler_finalize(%'
"""  # the finalize statement: its summary INSERT waits on the held summary row


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[tuple[PrivatePostgres, FaultyProxy]]:
    """A migrated embedded Postgres, and the fixed-port proxy the service talks to."""
    server = PrivatePostgres(tmp_path / "pg")
    await anyio.to_thread.run_sync(server.start)
    try:
        async with faulty_proxy(server.url) as proxy:
            db = await Database.connect(proxy.url, max_size=2)
            try:
                await migrations.migrate(db)
            finally:
                await db.close()
            yield server, proxy
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def _restart(server: PrivatePostgres, proxy: FaultyProxy) -> float:
    """Stops Postgres (fast shutdown), DOWN_S without it, then starts it on a new port."""
    proxy.cut()
    await anyio.to_thread.run_sync(server.stop)
    await anyio.sleep(DOWN_S)
    await anyio.to_thread.run_sync(server.start)
    proxy.retarget(server.url)
    return time.time()


async def _submit(ports: Ports, prefix: str, count: int) -> None:
    """Resubmits (same id) while Postgres is away, as a client would."""
    for n in range(count):
        for _ in range(RESUBMITS):
            try:
                await submit(ports, files(SIZE.files, PAYLOAD), batch_id=f"{prefix}-{n:04d}")
                break
            except RetryableError:
                await anyio.sleep(0.1)


async def _some_done(url: str) -> bool:
    rows = await sql(url, "SELECT count(*) FROM batch_files WHERE status = 'succeeded'")
    return int(rows[0][0]) > 0


async def test_postgres_restarted_mid_run_loses_nothing(
    settings: Settings,
    fleet: Fleet,
    private_postgres: tuple[PrivatePostgres, FaultyProxy],
) -> None:
    """Postgres stopped mid-run and started again 4 s later: the pools reconnect and every
    batch finalizes once with every file counted once."""
    server, proxy = private_postgres
    through = replace(settings, database_url=proxy.url)
    fleet.env = with_env(fleet.env, RECONCILER_DATABASE_URL=proxy.url)
    half = SIZE.batches // 2
    async with open_ports(through, listen=True) as ports:
        await ports.queue.ensure_group()
        for index in range(REPLICAS):
            await started(fleet.start(index))
        await _submit(ports, "before", half)
        await wait_for(lambda: _some_done(proxy.url), what="some files done")
        back_at = await _restart(server, proxy)
        await _submit(ports, "after", SIZE.batches - half)
    found = await settled_audit(
        proxy.url, settings.redis_url or "", settings.namespace, SIZE.settle_timeout_s
    )
    await _report(proxy.url, found, fleet, back_at)
    assert_nothing_lost_or_duplicated(found)
    assert finalized_twice(fleet.events()) == []


async def _report(url: str, found: Audit, fleet: Fleet, back_at: float) -> None:
    report(
        "postgres_restarted", faults=f"Postgres stopped mid-run, {DOWN_S:g} s down, restarted",
        resumed_s=await first_finished_after(url, back_at),
        recovery_s=seconds_since(back_at, found.last_completed_at),
        finalized_twice=len(finalized_twice(fleet.events())),
        actor_crashes=len(fleet.events("actor_crashed")), **audit_fields(found),
    )  # fmt: skip


async def _hold_summary_row(conn: asyncpg.Connection, batch_id: str) -> None:
    """An uncommitted run_summaries row for the batch: the finalizer's INSERT waits on it
    after its UPDATE of the batch. Foreign-key triggers are off in this session, so the
    batch row itself stays unlocked."""
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("BEGIN")
    await conn.execute(
        "INSERT INTO run_summaries (batch_id, run_id, status, finalized_by, total_files,"
        " files_succeeded, files_failed, created_at, completed_at, processing_seconds,"
        " errors, totals, metadata) VALUES ($1, $1, 'completed', 'event', 0, 0, 0, now(),"
        " now(), '{}', '[]', '{}', '{}')",
        batch_id,
    )


async def _blocked_finalizer(url: str, blocker_pid: int, not_pid: int = 0) -> int | None:
    rows = await sql(url, BLOCKED_FINALIZE, blocker_pid)
    pids = [int(r[0]) for r in rows if int(r[0]) != not_pid]
    return pids[0] if pids else None


async def _status(url: str, batch_id: str) -> Any:
    return (await sql(url, "SELECT status FROM batches WHERE batch_id = $1", batch_id))[0][0]


async def test_backend_terminated_mid_finalization_half_applies_nothing(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """pg_terminate_backend on the finalizing backend after its UPDATE, before its INSERT:
    the batch is still unfinalized, the finalizer retries, and it finalizes exactly once."""
    url = settings.database_url or ""
    quick = {"min_s": 0.001, "max_s": 0.005, "fail_rate": 0.0}
    await submit(ports, files(5, quick), batch_id="terminated")
    blocker = await asyncpg.connect(url)
    try:
        await _hold_summary_row(blocker, "terminated")
        process = fleet.start(0)
        await started(process)
        first = await wait_for(lambda: _blocked_finalizer(url, blocker.get_server_pid()))
        killed = await sql(url, "SELECT pg_terminate_backend($1)", first)
        assert killed[0][0] is True
        assert await _status(url, "terminated") == "processing", "nothing half-applied"
        await wait_for(lambda: _blocked_finalizer(url, blocker.get_server_pid(), first))
        await blocker.execute("ROLLBACK")
    finally:
        await blocker.close()
    await wait_for_event(process, "batch_finalized")
    found = await audit(url, settings.redis_url or "", settings.namespace)
    await wait_for(lambda: _drained(settings), what="group drained")
    report(
        "backend_terminated", faults="pg_terminate_backend on the finalizing backend",
        finalization_failed=len(fleet.events("finalization_failed")),
        finalized_twice=len(finalized_twice(fleet.events())), **audit_fields(found),
    )  # fmt: skip
    assert (found.batches, found.finalized, found.summaries) == (1, 1, 1)
    assert found.mismatches == [] and found.summarized == 5
    assert finalized_twice(fleet.events()) == []
    assert fleet.events("finalization_failed"), "the terminated attempt was seen and retried"


async def _drained(settings: Settings) -> bool:
    found = await audit(settings.database_url or "", settings.redis_url or "", settings.namespace)
    return found.pending_in_group == 0 and found.stream_length == 0
