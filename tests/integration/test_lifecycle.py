"""The batch lifecycle against real Postgres and Redis, service actors in-process."""

from __future__ import annotations

from functools import partial

import anyio
import anyio.lowlevel

from reconciler import batches
from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.helpers import files, running, submit, summary_of, wait_for


async def test_last_file_finishing_on_idle_queue_finalizes_by_event(
    settings: Settings, ports: Ports
) -> None:
    """The batch whose last file ends while the queue is idle is finalized by the event."""
    submitted = await submit(ports, files(5, {"sleep_s": 0.01}))
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
        assert await ports.queue.length() == 0, "no job left to pull: the queue is idle"
    assert summary["status"] == "completed"
    assert summary["finalized_by"] == "event"
    assert (summary["files_succeeded"], summary["files_failed"]) == (5, 0)
    assert summary["totals"]["attempt"] == 5


async def test_failures_are_retried_then_counted_and_grouped(
    settings: Settings, ports: Ports
) -> None:
    """A flaky file succeeds on retry; a broken one fails after max attempts, grouped by error."""
    flaky = files(2, {"fail_attempts": 2}, prefix="flaky")
    broken = files(3, {"fail_attempts": 99, "error": "bad header"}, prefix="broken")
    submitted = await submit(ports, flaky + broken)
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
    assert summary["status"] == "completed_with_errors"
    assert (summary["files_succeeded"], summary["files_failed"]) == (2, 3)
    assert summary["errors"] == [{"message": "RuntimeError: bad header", "count": 3}]
    rows = await ports.db.fetch("blocking_files", submitted.batch_id, 10)
    assert rows == []
    progress = await batches.progress(ports.db, submitted.batch_id)
    assert progress["files_pending"] == progress["files_processing"] == 0


async def test_zero_file_batch_completes_at_once(ports: Ports) -> None:
    """A batch with no files is finalized during submission."""
    submitted = await submit(ports, [])
    summary = await summary_of(ports, submitted.batch_id)
    assert summary is not None
    assert (summary["status"], summary["total_files"], summary["finalized_by"]) == (
        "completed",
        0,
        "event",
    )


async def test_resubmitting_same_files_is_a_no_op(ports: Ports) -> None:
    """The same batch id with the same files creates nothing new."""
    first = await submit(ports, files(3), batch_id="b-same")
    again = await submit(ports, list(reversed(files(3))), batch_id="b-same")
    assert (first.created, again.created) == (True, False)
    assert await ports.queue.length() == 3


async def test_handler_timeout_fails_the_file_and_batch_still_finalizes(
    settings: Settings, ports: Ports
) -> None:
    """A handler that hangs forever is cut by the per-file timeout; the batch finalizes."""
    from dataclasses import replace

    quick = replace(settings, file_timeout_s=0.2, max_attempts=1)
    submitted = await submit(ports, files(1, {"hang": True}) + files(1, prefix="ok"))
    async with running(quick, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
    assert summary["errors"] == [{"message": "timed out", "count": 1}]
    assert summary["files_succeeded"] == 1


async def test_many_batches_each_finalized_exactly_once(settings: Settings, ports: Ports) -> None:
    """Forty batches processed together each get one summary, with every file counted once."""
    ids = [(await submit(ports, files(10))).batch_id for _ in range(40)]
    async with running(settings, ports, Role.WORKER):
        for batch_id in ids:
            await wait_for(partial(summary_of, ports, batch_id), what=batch_id)
    no_filter = (None, None, None, None)  # run id, id prefix, keyset
    counts = await ports.db.fetch("list_batches", "completed", False, 0.0, *no_filter, 100)
    assert len(counts) == 40
    assert all(row["files_succeeded"] == 10 for row in counts)
    await anyio.lowlevel.checkpoint()
