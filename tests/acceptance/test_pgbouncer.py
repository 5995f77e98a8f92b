"""`reconciler run` behind a real PgBouncer, in transaction and in session pooling mode.

Two replicas work through the pooler: batches finalize exactly once with the right
summaries, a failing file fails, and the sweeper's repairs (a batch left complete but
unfinalized, files never enqueued) run through it too. Afterwards no server connection
carries a setting the service made.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
import pytest

from reconciler import migrations
from reconciler.app import Ports, open_ports
from reconciler.config import Pooler, Settings
from tests.acceptance.processes import ServiceProcess, run_cli, with_env
from tests.chaos.harness import wait_for_event
from tests.helpers import files, record, sql, submit, summary_of, wait_for
from tests.pgbouncer import PgBouncer, pgbouncer
from tests.services import Endpoints, unique_name, with_database

BATCHES: Final = 3
FILES_PER_BATCH: Final = 12
FAILING_FILE: Final = "f00003"
SETTLE_TIMEOUT_S: Final = 40.0
# The planner settings the service makes on a connection of its own, and asyncpg's jit switch.
SESSION_SETTINGS: Final = ("plan_cache_mode", "random_page_cost", "jit")
# Seen as `... already exists`, `... does not exist`, and as `bind message supplies 4
# parameters, but prepared statement ... requires 1`: another client's statement.
KNOWN_FAILURE: Final = re.compile(
    r'postgres: (\w+): [^\n]*prepared statement \\?"__asyncpg_stmt_\d+__\\?"'
)
SHOW_SETTINGS: Final = (
    "SELECT pg_backend_pid() AS pid, current_setting('plan_cache_mode') AS plan_cache_mode,"
    " current_setting('random_page_cost') AS random_page_cost, current_setting('jit') AS jit"
)
FAST: Final = {
    "RECONCILER_HANDLER": "reconciler.handlers:simulate",
    "RECONCILER_CONCURRENCY": "4",
    "RECONCILER_SWEEP_INTERVAL_S": "0.3",
    "RECONCILER_STUCK_GRACE_S": "1",
    "RECONCILER_MAX_ATTEMPTS": "2",
    "RECONCILER_DRAIN_TIMEOUT_S": "5",
}


@pytest.fixture
def transaction_pooler(database_url: str, tmp_path: Path) -> Iterator[PgBouncer]:
    with pgbouncer(database_url, tmp_path, "transaction") as bouncer:
        yield bouncer


@pytest.fixture
def session_pooler(database_url: str, tmp_path: Path) -> Iterator[PgBouncer]:
    with pgbouncer(database_url, tmp_path, "session") as bouncer:
        yield bouncer


@pytest.fixture
async def empty_database(services: Endpoints) -> AsyncIterator[str]:
    name = unique_name("reconciler_empty")
    await sql(services.database_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(services.database_url, name)
    finally:
        await sql(services.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def replicas(
    service_env: dict[str, str], bouncer: PgBouncer, pooler: Pooler, log_dir: Path, count: int
) -> AsyncIterator[list[ServiceProcess]]:
    """`count` `reconciler run` processes whose database is the pooler, up and reading."""
    env = with_env(
        service_env, RECONCILER_DATABASE_URL=bouncer.url, RECONCILER_DATABASE_POOLER=pooler, **FAST
    )
    started = [ServiceProcess(env, log_dir / f"run-{i}.log") for i in range(count)]
    try:
        for process in started:
            await wait_for_event(process, "consumer_started")
        yield started
    finally:
        for process in started:
            process.close()


@asynccontextmanager
async def pooled_ports(
    settings: Settings, bouncer: PgBouncer, pooler: Pooler
) -> AsyncIterator[Ports]:
    """The test's own client of the service's ports, through the same pooler."""
    through = replace(settings, database_url=bouncer.url, database_pooler=pooler)
    async with open_ports(through, listen=True) as opened:
        await opened.queue.ensure_group()
        yield opened


async def server_settings(bouncer: PgBouncer) -> list[dict[str, Any]]:
    """What a plain client sees on every server connection the pool has, at once.

    As many clients as the pool has server connections each hold a transaction, so each
    is handed a different one of them."""
    clients = [
        await asyncpg.connect(bouncer.url, statement_cache_size=0) for _ in range(bouncer.pool_size)
    ]
    try:
        seen = []
        for client in clients:
            await client.execute("BEGIN")
            row = await client.fetchrow(SHOW_SETTINGS)
            seen.append(dict(row or {}))
        return seen
    finally:
        for client in clients:
            await client.close()


async def defaults(database_url: str) -> dict[str, Any]:
    """The settings a fresh connection straight to Postgres starts with."""
    rows = await sql(database_url, SHOW_SETTINGS)
    return {k: rows[0][k] for k in SESSION_SETTINGS}


async def _plant_repairs(ports: Ports, database_url: str) -> None:
    """Two batches only the sweeper can finish, written straight to Postgres."""
    # Complete but never finalized: the original bug, repaired by the sweep.
    await ports.db.fetchval("insert_batch", "stuck", "stuck", {}, "digest-stuck", 2, None)
    await ports.db.execute("insert_files", "stuck", ["a", "b"], ["/a", "/b"], [None, None], True)
    await record(ports, "stuck", ["a", "b"])
    await sql(
        database_url,
        "UPDATE batches SET last_file_completed_at = now() - interval '1 hour'"
        " WHERE batch_id = 'stuck'",
    )
    # Committed, never enqueued (a crash before the enqueue): requeued by the sweep.
    await ports.db.fetchval("insert_batch", "unqueued", "unqueued", {}, "digest-unq", 2, None)
    await ports.db.execute("insert_files", "unqueued", ["c", "d"], ["/c", "/d"], [None, None], True)
    await sql(
        database_url,
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour'"
        " WHERE batch_id = 'unqueued'",
    )


async def _whole_lifecycle(
    settings: Settings,
    ports: Ports,
    service_env: dict[str, str],
    bouncer: PgBouncer,
    pooler: Pooler,
    tmp_path: Path,
) -> None:
    async with (
        replicas(service_env, bouncer, pooler, tmp_path, count=2) as started,
        pooled_ports(settings, bouncer, pooler) as pooled,
    ):
        submitted = []
        for i in range(BATCHES):
            specs = files(FILES_PER_BATCH, {"sleep_s": 0.02})
            if i == 0:
                specs[3] = replace(specs[3], payload={"fail_attempts": 99, "error": "bad file"})
            submitted.append(await submit(pooled, specs, batch_id=f"b{i}"))
        await _plant_repairs(ports, settings.database_url or "")
        batch_ids = [s.batch_id for s in submitted] + ["stuck", "unqueued"]

        async def all_summaries() -> list[dict[str, Any]] | None:
            found = [await summary_of(pooled, batch_id) for batch_id in batch_ids]
            return [s for s in found if s is not None] if all(found) else None

        summaries = await wait_for(all_summaries, timeout_s=SETTLE_TIMEOUT_S, what="summaries")
        for process in started:
            assert process.proc.poll() is None, process.log_path.read_text()[-3000:]
            text = process.log_path.read_text()
            assert "prepared statement" not in text, text[-3000:]

    by_id = {s["batch_id"]: s for s in summaries}
    counts = {b: (s["files_succeeded"], s["files_failed"]) for b, s in by_id.items()}
    assert counts == {
        "b0": (FILES_PER_BATCH - 1, 1),
        "b1": (FILES_PER_BATCH, 0),
        "b2": (FILES_PER_BATCH, 0),
        "stuck": (2, 0),
        "unqueued": (2, 0),
    }
    assert by_id["b0"]["errors"] == [{"message": "RuntimeError: bad file", "count": 1}]
    assert by_id["stuck"]["finalized_by"] == "sweep"
    url = settings.database_url or ""
    once = await sql(
        url,
        "SELECT batch_id, count(*) FROM events WHERE type = 'batch.finalized' GROUP BY batch_id",
    )
    assert {r[0]: r[1] for r in once} == dict.fromkeys(batch_ids, 1), "finalized exactly once"
    left = await sql(
        url, "SELECT count(*) FROM batch_files WHERE status NOT IN ('succeeded', 'failed')"
    )
    assert left[0][0] == 0
    failed = await sql(url, "SELECT file_id, attempts FROM batch_files WHERE status = 'failed'")
    assert [tuple(r) for r in failed] == [(FAILING_FILE, 2)]


async def test_two_replicas_through_transaction_pooling(
    settings: Settings,
    ports: Ports,
    service_env: dict[str, str],
    transaction_pooler: PgBouncer,
    tmp_path: Path,
) -> None:
    """With RECONCILER_DATABASE_POOLER=transaction the whole lifecycle runs through it,
    and no server connection is left with a setting of the service's."""
    await _whole_lifecycle(
        settings, ports, service_env, transaction_pooler, "transaction", tmp_path
    )
    expected = await defaults(settings.database_url or "")
    seen = await server_settings(transaction_pooler)
    assert len({s["pid"] for s in seen}) == transaction_pooler.pool_size
    assert [{k: s[k] for k in SESSION_SETTINGS} for s in seen] == [expected] * len(seen)


async def test_two_replicas_through_session_pooling(
    settings: Settings,
    ports: Ports,
    service_env: dict[str, str],
    session_pooler: PgBouncer,
    tmp_path: Path,
) -> None:
    """In session mode the service works as on a connection of its own."""
    await _whole_lifecycle(settings, ports, service_env, session_pooler, "session", tmp_path)


async def test_the_leak_check_sees_a_leaked_setting(
    settings: Settings, transaction_pooler: PgBouncer
) -> None:
    """A session-level SET through transaction pooling stays for the next client: the
    check above would see the service's settings had it left any."""
    client = await asyncpg.connect(transaction_pooler.url, statement_cache_size=0)
    try:
        await client.execute("SET random_page_cost = 1.7")
    finally:
        await client.close()
    seen = await server_settings(transaction_pooler)
    assert "1.7" in [s["random_page_cost"] for s in seen]


async def test_without_the_setting_transaction_pooling_breaks_prepared_statements(
    ports: Ports, service_env: dict[str, str], transaction_pooler: PgBouncer, tmp_path: Path
) -> None:
    """RECONCILER_DATABASE_POOLER=none through transaction pooling fails the known way:
    the statement cache's names meet on shared server connections."""
    env = with_env(service_env, RECONCILER_DATABASE_URL=transaction_pooler.url, **FAST)
    started = [ServiceProcess(env, tmp_path / f"none-{i}.log") for i in range(2)]
    try:
        for i in range(BATCHES):
            await submit(ports, files(FILES_PER_BATCH), batch_id=f"b{i}")

        async def failed() -> re.Match[str] | None:
            logs = [p.log_path.read_text() for p in started]
            return next((m for m in map(KNOWN_FAILURE.search, logs) if m), None)

        found = await wait_for(failed, timeout_s=SETTLE_TIMEOUT_S, what="the known failure")
    finally:
        for process in started:
            process.close()
    assert found[1] in {
        "DuplicatePreparedStatementError",
        "InvalidSQLStatementNameError",
        "ProtocolViolationError",
    }, found[0]


async def test_migrate_through_transaction_pooling(
    empty_database: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Three `reconciler migrate` at once through transaction pooling: its lock is
    transaction-level, so all succeed and the schema is applied once."""
    results: list[int] = []
    with pgbouncer(empty_database, tmp_path, "transaction") as bouncer:
        env = with_env(
            service_env,
            RECONCILER_DATABASE_URL=bouncer.url,
            RECONCILER_DATABASE_POOLER="transaction",
        )

        async def migrate() -> None:
            done = await anyio.to_thread.run_sync(lambda: run_cli(env, "migrate"))
            assert "prepared statement" not in done.stderr, done.stderr
            results.append(done.returncode)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(migrate)
    assert results == [0, 0, 0]
    rows = await sql(empty_database, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in migrations.available()]
