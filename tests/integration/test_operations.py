"""Operator actions against the real Postgres and Redis: cancel, retry-failed, audit."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from reconciler import operations, reasons
from reconciler.app import Ports, Role
from reconciler.config import Settings
from reconciler.errors import ActionRefused, BatchConflict, BatchNotFound, InvalidBatch
from reconciler.finalization import finalize
from tests.helpers import files, record, running, sql, start_as, submit, wait_for


async def _count(settings: Settings, table: str, batch_id: str) -> int:
    query = f"SELECT count(*) FROM {table} WHERE batch_id = $1"  # table names are literals
    return int((await sql(settings.database_url or "", query, batch_id))[0][0])


async def test_cancel_fails_pending_and_in_flight_files_once(
    ports: Ports, settings: Settings
) -> None:
    """A cancel finalizes as `operator`; an in-flight file's late outcome changes nothing."""
    batch = await submit(ports, files(3))
    await record(ports, batch.batch_id, ["f00000"])
    await start_as(ports, settings, "w1", batch.batch_id, "f00001")
    result = await operations.cancel(ports.db, batch.batch_id, "runaway", "cli:alice")
    assert (result.status, result.trigger) == ("completed_with_errors", "operator")
    assert await record(ports, batch.batch_id, ["f00001"]) == []  # the late success
    rows = await sql(
        settings.database_url or "",
        "SELECT file_id, status, error FROM batch_files WHERE batch_id = $1 ORDER BY file_id",
        batch.batch_id,
    )
    assert [(r[1], r[2]) for r in rows] == [
        ("succeeded", None),
        ("failed", reasons.CANCELLED),
        ("failed", reasons.CANCELLED),
    ]
    assert await _count(settings, "run_summaries", batch.batch_id) == 1
    assert await _count(settings, "events", batch.batch_id) == 1
    [entry] = await operations.audit(ports.db, batch.batch_id)
    assert (entry["action"], entry["reason"], entry["actor"]) == ("cancel", "runaway", "cli:alice")


async def test_cancel_of_a_finalized_batch_is_refused_without_audit(ports: Ports) -> None:
    """A finalized batch cannot be cancelled; the refusal leaves no audit row."""
    batch = await submit(ports, files(1))
    await record(ports, batch.batch_id, ["f00000"])
    await finalize(ports.db, batch.batch_id, "event")
    with pytest.raises(ActionRefused, match="already finalized"):
        await operations.cancel(ports.db, batch.batch_id, "late", "cli:alice")
    with pytest.raises(BatchNotFound):
        await operations.cancel(ports.db, "no-such-batch", "late", "cli:alice")
    with pytest.raises(InvalidBatch, match="reason"):
        await operations.cancel(ports.db, batch.batch_id, "  ", "cli:alice")
    assert await operations.audit(ports.db, batch.batch_id) == []


async def test_retry_failed_copies_exactly_the_failed_files(
    ports: Ports, settings: Settings
) -> None:
    """The retry batch holds the failed files verbatim, same run, linked to its parent."""
    specs = files(3, payload={"n": 1e16})
    batch = await submit(ports, specs, run_id="run-7")
    await record(ports, batch.batch_id, ["f00000"])
    await record(ports, batch.batch_id, ["f00001", "f00002"], ok=False)
    await finalize(ports.db, batch.batch_id, "event")
    retried = await operations.retry_failed(
        ports.db, ports.queue, batch.batch_id, "flaky", "cli:bob", new_batch_id="again"
    )
    assert (retried.created, retried.total_files) == (True, 2)
    rows = await sql(
        settings.database_url or "",
        "SELECT b.run_id, b.parent_batch_id, f.file_id, f.payload::text FROM batches b"
        " JOIN batch_files f USING (batch_id) WHERE b.batch_id = 'again' ORDER BY f.file_id",
    )
    assert [tuple(r) for r in rows] == [
        ("run-7", batch.batch_id, "f00001", '{"n":1e+16}'),
        ("run-7", batch.batch_id, "f00002", '{"n":1e+16}'),
    ]
    assert await ports.queue.length() == 3 + 2


async def test_retry_failed_repeated_with_its_id_creates_nothing(ports: Ports) -> None:
    """Repeating a retry with the same new batch id is a no-op with no second audit row."""
    batch = await submit(ports, files(1))
    await record(ports, batch.batch_id, ["f00000"], ok=False)
    await finalize(ports.db, batch.batch_id, "event")
    args = (ports.db, ports.queue, batch.batch_id, "flaky", "cli:bob")
    assert (await operations.retry_failed(*args, new_batch_id="again")).created
    assert not (await operations.retry_failed(*args, new_batch_id="again")).created
    assert await ports.queue.length() == 2
    assert [a["action"] for a in await operations.audit(ports.db, batch.batch_id)] == [
        "retry_failed"
    ]
    other = await submit(ports, files(1, prefix="x"), batch_id="taken")
    with pytest.raises(BatchConflict):
        await operations.retry_failed(*args, new_batch_id=other.batch_id)


async def test_retry_failed_refuses_unfinished_or_clean_batches(ports: Ports) -> None:
    """Only a finalized batch with at least one failed file can be retried."""
    running_batch = await submit(ports, files(1))
    with pytest.raises(ActionRefused, match="not finalized"):
        await operations.retry_failed(ports.db, ports.queue, running_batch.batch_id, "r", "a")
    await record(ports, running_batch.batch_id, ["f00000"])
    await finalize(ports.db, running_batch.batch_id, "event")
    with pytest.raises(ActionRefused, match="no failed file"):
        await operations.retry_failed(ports.db, ports.queue, running_batch.batch_id, "r", "a")


def _handled() -> float:
    """Handler outcomes this process has counted, succeeded or failed."""
    name = "reconciler_files_processed_total"
    found = (REGISTRY.get_sample_value(name, {"outcome": o}) for o in ("succeeded", "failed"))
    return sum(value or 0.0 for value in found)


async def test_queued_jobs_of_a_cancelled_batch_are_skipped_when_read(
    ports: Ports, settings: Settings
) -> None:
    """A worker reading a cancelled file's job acknowledges it without running the handler."""
    batch = await submit(ports, files(5))
    await operations.cancel(ports.db, batch.batch_id, "runaway", "cli:alice")
    before = _handled()
    async with running(settings, ports, Role.WORKER):
        await wait_for(lambda: _drained(ports), what="every job acknowledged")
    assert _handled() == before


async def _drained(ports: Ports) -> bool:
    return await ports.queue.length() == 0
