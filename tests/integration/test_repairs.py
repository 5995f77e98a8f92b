"""What the sweeper and the finalizer repair: the old bug, dead workers, lost jobs."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest
from prometheus_client import REGISTRY

from reconciler import batches, metrics
from reconciler.actors.finalizer import Finalizer, FinalizeRequest
from reconciler.actors.monitor import Monitor
from reconciler.actors.sweeper import Sweeper
from reconciler.app import Ports, Role
from reconciler.config import Settings
from reconciler.errors import TerminalError
from reconciler.finalization import Outcome, finalize, finalize_each
from reconciler.reasons import TIMED_OUT as TIMED_OUT_REASON
from tests.helpers import (
    age_pending_job,
    files,
    lock_held,
    record,
    running,
    sql,
    start_as,
    submit,
    summary_of,
    wait_for,
)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_sweeper_repairs_batch_left_complete_but_unfinalized(
    settings: Settings, ports: Ports
) -> None:
    """The original bug (all files done, no finalization ran) is repaired by the sweep."""
    graceful = replace(settings, stuck_grace_s=10.0)
    submitted = await submit(ports, files(3))
    await record(ports, submitted.batch_id, ["f00000", "f00001", "f00002"])
    monitor = Monitor(graceful, ports.db, ports.queue)
    sweeper = Sweeper(graceful, ports.db, ports.queue)

    assert (await sweeper.sweep_once()).repairs == {}, "inside the grace period: no repair"
    await sql(
        graceful.database_url or "",
        "UPDATE batches SET last_file_completed_at = now() - interval '1 hour' WHERE batch_id = $1",
        submitted.batch_id,
    )
    await monitor.refresh()
    assert metrics.BATCHES_STUCK._value.get() == 1
    report = await sweeper.sweep_once()
    await monitor.refresh()
    assert report.repairs == {"finalized": 1}
    assert metrics.BATCHES_STUCK._value.get() == 0
    summary = await summary_of(ports, submitted.batch_id)
    assert summary is not None and summary["finalized_by"] == "sweep"


async def test_racing_finalizers_write_one_summary(settings: Settings, ports: Ports) -> None:
    """Eight finalizers racing on one complete batch finalize it exactly once."""
    submitted = await submit(ports, files(2))
    await record(ports, submitted.batch_id, ["f00000", "f00001"])
    outcomes: list[Outcome] = []

    async def one(trigger: str) -> None:
        outcomes.append((await finalize(ports.db, submitted.batch_id, trigger)).outcome)

    async with anyio.create_task_group() as tg:
        for trigger in ("event", "sweep", "demand", "deadline") * 2:
            tg.start_soon(one, trigger)
    assert outcomes.count(Outcome.FINALIZED) == 1
    assert set(outcomes) <= {Outcome.FINALIZED, Outcome.BUSY, Outcome.ALREADY_FINALIZED}
    rows = await sql(
        settings.database_url or "",
        "SELECT count(*) FROM run_summaries WHERE batch_id = $1",
        submitted.batch_id,
    )
    assert rows[0][0] == 1
    again = await finalize(ports.db, submitted.batch_id, "demand")
    assert again.outcome is Outcome.ALREADY_FINALIZED


async def test_busy_lock_is_reported_not_dropped(ports: Ports) -> None:
    """While another transaction holds the batch's lock, finalize answers BUSY."""
    submitted = await submit(ports, files(1))
    await record(ports, submitted.batch_id, ["f00000"])
    async with lock_held(ports, submitted.batch_id):
        busy = await finalize(ports.db, submitted.batch_id, "event")
    assert busy.outcome is Outcome.BUSY
    assert (await finalize(ports.db, submitted.batch_id, "event")).outcome is Outcome.FINALIZED


async def test_a_group_finalizes_each_batch_on_its_own(ports: Ports) -> None:
    """One statement for three batches: the complete one finalizes, the one whose lock is
    held answers BUSY, the unfinished one NOT_READY, each in the order given."""
    done, locked, unfinished = [await submit(ports, files(2)) for _ in range(3)]
    for batch in (done, locked):
        await record(ports, batch.batch_id, ["f00000", "f00001"])
    await record(ports, unfinished.batch_id, ["f00000"])
    ids = [done.batch_id, locked.batch_id, unfinished.batch_id]
    async with lock_held(ports, locked.batch_id):
        results = await finalize_each(ports.db, ids, "event")
    assert [(r.batch_id, r.outcome) for r in results] == [
        (done.batch_id, Outcome.FINALIZED),
        (locked.batch_id, Outcome.BUSY),
        (unfinished.batch_id, Outcome.NOT_READY),
    ]
    assert await summary_of(ports, done.batch_id) is not None
    assert await summary_of(ports, locked.batch_id) is None
    again = await finalize_each(ports.db, ids, "event")
    assert [r.outcome for r in again] == [
        Outcome.ALREADY_FINALIZED, Outcome.FINALIZED, Outcome.NOT_READY,
    ]  # fmt: skip


async def test_file_of_dead_worker_is_reclaimed_and_batch_finalizes(
    settings: Settings, ports: Ports
) -> None:
    """A file left 'processing' by a worker that died is reclaimed; the batch finalizes."""
    submitted = await submit(ports, files(2))
    # A worker named "dead" takes one job and dies: its entry stays pending in Redis
    # and its file stays 'processing' in Postgres.
    taken = await ports.queue.read("dead", 1, 100)
    await start_as(ports, settings, "dead", submitted.batch_id, "f00000")
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET lease_expires_at = now() - interval '1 hour' WHERE worker = 'dead'",
    )
    await age_pending_job(ports, "dead", taken[0].id, 3_600_000)  # the Redis lease too
    before = _sample("reconciler_jobs_redelivered_total")
    report = await Sweeper(settings, ports.db, ports.queue).sweep_once()
    assert report.repairs == {"lease_reclaimed": 1}
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
    assert (summary["files_succeeded"], summary["finalized_by"]) == (2, "event")
    assert _sample("reconciler_jobs_redelivered_total") == before + 1


async def test_lease_with_attempts_spent_fails_the_file(settings: Settings, ports: Ports) -> None:
    """A dead worker's file whose attempts are spent is failed, and the batch finalizes."""
    submitted = await submit(ports, files(1))
    await start_as(ports, settings, "dead", submitted.batch_id, "f00000")
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET attempts = 3, lease_expires_at = now() - interval '1 s'",
    )
    report = await Sweeper(settings, ports.db, ports.queue).sweep_once()
    assert report.repairs == {"lease_exhausted": 1}
    summary = await summary_of(ports, submitted.batch_id)
    assert summary is not None
    assert summary["status"] == "completed_with_errors"
    assert summary["errors"][0]["count"] == 1


async def test_deadline_fails_remaining_files_and_finalizes(
    settings: Settings, ports: Ports
) -> None:
    """Past its deadline, a batch finalizes with the unfinished files failed as timed out."""
    submitted = await submit(ports, files(3), deadline_s=3600)
    await record(ports, submitted.batch_id, ["f00000"])
    await sql(
        settings.database_url or "",
        "UPDATE batches SET deadline_at = now() - interval '1 s' WHERE batch_id = $1",
        submitted.batch_id,
    )
    report = await Sweeper(settings, ports.db, ports.queue).sweep_once()
    assert report.repairs == {"deadline": 1}
    summary = await summary_of(ports, submitted.batch_id)
    assert summary is not None
    assert (summary["status"], summary["finalized_by"]) == ("completed_with_errors", "deadline")
    assert summary["errors"] == [{"message": TIMED_OUT_REASON, "count": 2}]
    async with running(settings, ports, Role.WORKER):
        await wait_for(lambda: _queue_empty(ports), what="late jobs acknowledged")


async def _queue_empty(ports: Ports) -> bool:
    return await ports.queue.length() == 0


async def test_files_never_enqueued_are_requeued(settings: Settings, ports: Ports) -> None:
    """A crash between the database commit and the enqueue loses nothing."""
    await ports.db.fetchval("insert_batch", "crashed", "crashed", {}, "digest", 2, None)
    await ports.db.execute("insert_files", "crashed", ["a", "b"], ["/a", "/b"], [None, None], True)
    sweeper = Sweeper(settings, ports.db, ports.queue)
    await ports.queue.take_recovery()  # Redis has not lost anything here
    assert (await sweeper.sweep_once()).repairs == {}, "recent: maybe still being enqueued"
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour'",
    )
    assert (await sweeper.sweep_once()).repairs == {"requeued": 2}
    async with running(settings, ports, Role.WORKER):
        summary = await wait_for(lambda: summary_of(ports, "crashed"), what="summary")
    assert summary["files_succeeded"] == 2


async def test_redis_losing_its_data_loses_no_file(settings: Settings, ports: Ports) -> None:
    """With the stream and group gone, the consumer recreates them and the sweep requeues."""
    submitted = await submit(ports, files(4))
    await ports.queue._redis.delete(ports.queue.stream, ports.queue.queued)  # restarted empty
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour'",
    )
    async with running(settings, ports, Role.WORKER):
        report = await Sweeper(settings, ports.db, ports.queue).sweep_once()
        assert report.repairs == {"requeued": 4}
        summary = await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
    assert summary["files_succeeded"] == 4


async def test_waiting_jobs_are_not_requeued(settings: Settings, ports: Ports) -> None:
    """A pending file whose job is still on the stream is left alone, however old."""
    await submit(ports, files(2))
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour'",
    )
    assert (await Sweeper(settings, ports.db, ports.queue).sweep_once()).repairs == {}
    assert await ports.queue.length() == 2


async def test_poison_jobs_are_dead_lettered_and_consumer_goes_on(
    settings: Settings, ports: Ports
) -> None:
    """Garbage and unknown batches land in the dead-letter stream with reasons."""
    redis = ports.queue._redis
    await redis.xadd(ports.queue.stream, {"job": "{not json"})
    await redis.xadd(ports.queue.stream, {"job": '{"batch_id": "b"}'})
    await redis.xadd(
        ports.queue.stream, {"job": '{"batch_id": "nope", "file_id": "f", "uri": "u"}'}
    )
    submitted = await submit(ports, files(2))
    async with running(settings, ports, Role.WORKER):
        await wait_for(lambda: summary_of(ports, submitted.batch_id), what="summary")
    dead = await ports.queue.dead_letters()
    reasons = [d.fields[b"reason"].decode() for d in dead]
    assert len(reasons) == 3
    assert reasons[0].startswith("job is not JSON")
    assert reasons[1] == "job field 'file_id' must be a non-empty string"
    assert reasons[2] == "no such batch or file"
    assert all(b"original_id" in d.fields for d in dead)
    assert await ports.queue.length() == 0


async def test_explain_names_the_blocking_files(settings: Settings, ports: Ports) -> None:
    """Explain says which condition fails and lists the files in the way."""
    submitted = await submit(ports, files(2))
    await record(ports, submitted.batch_id, ["f00000"])
    report = await batches.explain(ports.db, submitted.batch_id, settings.stuck_grace_s)
    holds = {c["name"]: c["holds"] for c in report["conditions"]}
    assert holds["every_file_terminal"] is False and holds["not_finalized"] is True
    assert [f["file_id"] for f in report["blocking_files"]] == ["f00001"]
    assert report["verdict"] == "waiting for 1 file(s) to finish"


async def test_a_group_postgres_refuses_is_finalized_batch_by_batch(ports: Ports) -> None:
    """A batch id Postgres cannot take fails its group's statement: the finalizer then
    finalizes the others alone and raises the refusal (the supervisor's to restart)."""
    good = await submit(ports, files(1))
    await record(ports, good.batch_id, ["f00000"])
    send, receive = anyio.create_memory_object_stream[FinalizeRequest](4)
    with send, receive:
        await send.send(FinalizeRequest(("refused\x00", good.batch_id)))
        with pytest.raises(BaseExceptionGroup) as raised, anyio.fail_after(10):
            await Finalizer(ports.db, receive).run()
    refused, rest = raised.value.split(TerminalError)
    assert refused is not None and rest is None, raised.value
    assert await summary_of(ports, good.batch_id) is not None
