"""A batch created inside the application's own SQLAlchemy transaction.

Real engines on the test database: SQLAlchemy's asyncpg dialect for the async API,
psycopg 3 for the sync one. The application's own table is created by each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from reconciler import sqlalchemy as reconciler_sa
from reconciler.actors.sweeper import Sweeper
from reconciler.app import Ports, Role
from reconciler.batches import CHUNK_FILES
from reconciler.client import Client
from reconciler.config import Settings
from reconciler.errors import BatchConflict, BatchNotFound, RetryableError
from tests.helpers import files, running, sql, submit, summary_of, wait_for

ORDERS = "CREATE TABLE orders (order_id text PRIMARY KEY, batch_id text NOT NULL)"
ADD_ORDER = text("INSERT INTO orders (order_id, batch_id) VALUES (:order_id, :batch_id)")


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(make_url(database_url).set(drivername="postgresql+asyncpg"))
    async with engine.begin() as conn:
        await conn.execute(text(ORDERS))
    yield engine
    await engine.dispose()


@pytest.fixture
def sync_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        conn.execute(text(ORDERS))
    yield engine
    engine.dispose()


async def _stored(settings: Settings, batch_id: str) -> tuple[int, int, int]:
    """The orders, batches and files rows there are for this batch id."""
    [row] = await sql(
        settings.database_url or "",
        "SELECT (SELECT count(*) FROM orders WHERE batch_id = $1),"
        " (SELECT count(*) FROM batches WHERE batch_id = $1),"
        " (SELECT count(*) FROM batch_files WHERE batch_id = $1)",
        batch_id,
    )
    return (row[0], row[1], row[2])


async def test_async_rollback_leaves_no_batch_and_no_job(
    settings: Settings, ports: Ports, async_engine: AsyncEngine
) -> None:
    """Rolled back with the application's row: no batch, no file, no job, nothing swept."""
    with pytest.raises(Rollback):
        async with async_engine.begin() as conn:
            await conn.execute(ADD_ORDER, {"order_id": "o-1", "batch_id": "b-rolled"})
            submitted = await reconciler_sa.submit(conn, files(3), batch_id="b-rolled")
            assert submitted.created
            raise Rollback
    assert await _stored(settings, "b-rolled") == (0, 0, 0)
    with pytest.raises(BatchNotFound, match="b-rolled"):
        await Client(settings, ports).enqueue("b-rolled")
    await ports.queue.take_recovery()  # Redis has lost nothing: the ordinary pass
    assert (await Sweeper(settings, ports.db, ports.queue).sweep_once()).repairs == {}
    assert await ports.queue.length() == 0


async def test_async_commit_then_enqueue_finalizes(
    settings: Settings, ports: Ports, async_engine: AsyncEngine
) -> None:
    """Committed with the application's row, enqueued by the client, processed to the end."""
    client = Client(settings, ports)
    async with AsyncSession(async_engine) as session, session.begin():
        await session.execute(ADD_ORDER, {"order_id": "o-2", "batch_id": "b-async"})
        submitted = await reconciler_sa.submit(
            session, files(4), batch_id="b-async", metadata={"order": "o-2"}
        )
        with pytest.raises(BatchNotFound):  # not visible before the commit
            await client.enqueue("b-async")
    assert submitted.created and submitted.total_files == 4
    assert await _stored(settings, "b-async") == (1, 1, 4)
    assert await ports.queue.length() == 0, "no job before enqueue"
    assert await client.enqueue("b-async") == 4
    assert await client.enqueue("b-async") == 0, "a second call enqueues nothing twice"
    assert await ports.queue.length() == 4
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, "b-async"), what="summary")
    assert (summary["status"], summary["files_succeeded"]) == ("completed", 4)
    assert summary["totals"]["attempt"] == 4, "each file ran once"
    assert (await client.progress("b-async"))["metadata"] == {"order": "o-2"}


async def test_enqueue_failing_after_its_claim_is_left_to_the_sweeper(
    settings: Settings, ports: Ports, async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing between the claim and the enqueue: the sweep past the grace period
    enqueues the claimed files, as after a crash between a submit's commit and its XADD."""
    async with async_engine.begin() as conn:
        await reconciler_sa.submit(conn, files(2), batch_id="b-lost")

    async def refused(*args: object) -> None:
        raise RetryableError("redis: connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(ports.queue, "enqueue", refused)
        with pytest.raises(RetryableError):
            await Client(settings, ports).enqueue("b-lost")
    sweeper = Sweeper(settings, ports.db, ports.queue)
    await ports.queue.take_recovery()  # Redis has lost nothing: the ordinary pass
    assert (await sweeper.sweep_once()).repairs == {}, "claimed: maybe still being enqueued"
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour' WHERE batch_id = $1",
        "b-lost",
    )
    assert (await sweeper.sweep_once()).repairs == {"requeued": 2}
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, "b-lost"), what="summary")
    assert (summary["status"], summary["files_succeeded"]) == ("completed", 2)


def _sync_transaction(engine: Engine, batch_id: str, *, commit: bool) -> None:
    """The application's row and a batch in one Session transaction, then commit or not."""
    try:
        with Session(engine) as session, session.begin():
            session.execute(ADD_ORDER, {"order_id": f"o-{batch_id}", "batch_id": batch_id})
            assert reconciler_sa.submit_sync(session, files(3), batch_id=batch_id).created
            if not commit:
                raise Rollback
    except Rollback:
        pass


async def test_sync_session_rollback_and_commit(
    settings: Settings, ports: Ports, sync_engine: Engine
) -> None:
    """A sync Session: rolled back leaves nothing; committed, the sweeper's next pass
    enqueues the batch nobody enqueued, and it is processed to finalization."""
    await anyio.to_thread.run_sync(lambda: _sync_transaction(sync_engine, "b-no", commit=False))
    assert await _stored(settings, "b-no") == (0, 0, 0)
    await anyio.to_thread.run_sync(lambda: _sync_transaction(sync_engine, "b-yes", commit=True))
    assert await _stored(settings, "b-yes") == (1, 1, 3)
    assert await ports.queue.length() == 0
    sweeper = Sweeper(settings, ports.db, ports.queue)
    await ports.queue.take_recovery()  # Redis has lost nothing: the ordinary pass
    # The visibility timeout (60 s) has not passed: files never enqueued need no grace.
    assert (await sweeper.sweep_once()).repairs == {"requeued": 3}
    assert (await sweeper.sweep_once()).repairs == {}, "claimed and on the stream"
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, "b-yes"), what="summary")
    assert (summary["status"], summary["files_succeeded"]) == ("completed", 3)
    assert await Client(settings, ports).enqueue("b-yes") == 0
    assert await _stored(settings, "b-no") == (0, 0, 0)


async def test_same_batch_id_twice_is_a_no_op_and_other_files_conflict(
    settings: Settings, ports: Ports, async_engine: AsyncEngine
) -> None:
    """As with Client.submit: the same files again create nothing, other files raise,
    and the caller's transaction can still commit its own rows."""
    await submit(ports, files(2), batch_id="b-twice")
    async with async_engine.begin() as conn:
        again = await reconciler_sa.submit(conn, list(reversed(files(2))), batch_id="b-twice")
        with pytest.raises(BatchConflict, match="different files"):
            await reconciler_sa.submit(conn, files(3), batch_id="b-twice")
        await conn.execute(ADD_ORDER, {"order_id": "o-3", "batch_id": "b-twice"})
    assert not again.created
    assert await _stored(settings, "b-twice") == (1, 1, 2)
    assert await Client(settings, ports).enqueue("b-twice") == 0, "its jobs are on the stream"
    assert await ports.queue.length() == 2


async def test_sync_empty_batch_is_finalized_by_enqueue(
    settings: Settings, ports: Ports, sync_engine: Engine
) -> None:
    """A batch of no files, committed by a sync Connection, finalizes at Client.enqueue."""

    def write() -> None:
        with sync_engine.begin() as conn:
            assert reconciler_sa.submit_sync(conn, [], batch_id="b-empty").created

    await anyio.to_thread.run_sync(write)
    assert await summary_of(ports, "b-empty") is None
    assert await Client(settings, ports).enqueue("b-empty") == 0
    summary = await summary_of(ports, "b-empty")
    assert summary is not None
    assert (summary["status"], summary["finalized_by"]) == ("completed", "event")


async def test_batches_past_one_chunk_are_written_whole_on_both_paths(
    settings: Settings, ports: Ports, sync_engine: Engine
) -> None:
    """More files than one statement takes: the batch and its first chunk in one
    statement, the other chunks after it in the same transaction; a repeat writes
    nothing. Through Client.submit (jobs enqueued) and a sync Connection (none yet)."""
    count = CHUNK_FILES * 2 + 7
    first = await submit(ports, files(count), batch_id="b-big")
    again = await submit(ports, list(reversed(files(count))), batch_id="b-big")
    assert (first.created, again.created) == (True, False)

    def write() -> tuple[bool, bool]:
        with sync_engine.begin() as conn:
            made = reconciler_sa.submit_sync(conn, files(count), batch_id="b-big-sa")
            repeat = reconciler_sa.submit_sync(conn, files(count), batch_id="b-big-sa")
        return made.created, repeat.created

    assert await anyio.to_thread.run_sync(write) == (True, False)
    rows = await sql(
        settings.database_url or "",
        "SELECT b.batch_id, b.total_files, count(f.file_id), count(f.enqueued_at)"
        " FROM batches b JOIN batch_files f USING (batch_id) GROUP BY 1, 2 ORDER BY 1",
    )
    assert [tuple(r) for r in rows] == [
        ("b-big", count, count, count),
        ("b-big-sa", count, count, 0),
    ]
    assert await ports.queue.length() == count, "one job per file of the submitted batch"
