"""Real `reconciler` processes, killed and stopped by signals, against real services."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import run_cli, service_process, with_env
from tests.helpers import age_pending_job, files, sql, submit, summary_of, wait_for


async def _count(settings: Settings, status: str) -> int:
    rows = await sql(
        settings.database_url or "", "SELECT count(*) FROM batch_files WHERE status = $1", status
    )
    return int(rows[0][0])


async def _pending_in_group(ports: Ports) -> int:
    info = await ports.queue._redis.xpending(ports.queue.stream, ports.queue.group)
    return int(info["pending"])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _age_every_lease(settings: Settings, ports: Ports) -> None:
    """Moves time instead of waiting out the visibility timeout."""
    await sql(
        settings.database_url or "",
        "UPDATE batch_files SET lease_expires_at = now() - interval '1 hour'"
        " WHERE status = 'processing'",
    )
    queue = ports.queue
    for entry in await queue._redis.xpending_range(queue.stream, queue.group, "-", "+", 1000):
        consumer, job_id = (_text(entry[key]) for key in ("consumer", "message_id"))
        await age_pending_job(ports, consumer, job_id, 3_600_000)


async def test_sigkill_mid_batch_then_restart_finalizes_exactly_once(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker killed with SIGKILL mid-batch: after a restart the batch finalizes once."""
    env = with_env(service_env, RECONCILER_CONCURRENCY="4", RECONCILER_SWEEP_INTERVAL_S="0.5")
    submitted = await submit(ports, files(16, {"sleep_s": 0.3}))
    with service_process(env, tmp_path / "first.log") as first:
        await wait_for(lambda: _count(settings, "succeeded"), what="first files done")
        await wait_for(lambda: _count(settings, "processing"), what="files in flight")
        first.signal(signal.SIGKILL)
        first.wait(10)
    assert await summary_of(ports, submitted.batch_id) is None
    await _age_every_lease(settings, ports)
    with service_process(env, tmp_path / "second.log"):
        summary = await wait_for(
            lambda: summary_of(ports, submitted.batch_id), timeout_s=60, what="summary"
        )
        await wait_for(lambda: _no_pending(ports), what="group drained")
    assert (summary["files_succeeded"], summary["files_failed"]) == (16, 0)
    rows = await sql(settings.database_url or "", "SELECT count(*) FROM run_summaries")
    assert rows[0][0] == 1


async def _no_pending(ports: Ports) -> bool:
    return await _pending_in_group(ports) == 0


async def test_sigterm_finishes_in_flight_files_and_releases_the_rest(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM drains: in-flight files finish and are acked; unstarted ones are released."""
    env = with_env(service_env, RECONCILER_CONCURRENCY="2", RECONCILER_DRAIN_TIMEOUT_S="20")
    submitted = await submit(ports, files(8, {"sleep_s": 1.0}))
    with service_process(env, tmp_path / "drain.log") as process:
        await wait_for(lambda: _count(settings, "processing"), what="files in flight")
        process.signal(signal.SIGTERM)
        assert process.wait(25) == 0
        released = process.wait_for_event("jobs_released")["count"]
    done = await _count(settings, "succeeded")
    assert done >= 2, "the files in flight at SIGTERM finished"
    assert await _pending_in_group(ports) == released, "claimed but unstarted: handed back"
    assert await ports.queue.length() == 8 - done, "every unfinished job is still on the stream"
    with service_process(env, tmp_path / "again.log") as again:
        summary = await wait_for(
            lambda: summary_of(ports, submitted.batch_id), timeout_s=60, what="summary"
        )
        redelivered = sum(e["count"] for e in again.events() if e["event"] == "jobs_reclaimed")
    assert summary["files_succeeded"] == 8
    assert redelivered == released, "only the unfinished files were redelivered"


async def test_migrate_from_three_processes_at_once(
    service_env: dict[str, str], settings: Settings
) -> None:
    """Three `reconciler migrate` processes started together all succeed."""
    results: list[int] = []

    async def migrate() -> None:
        done = await anyio.to_thread.run_sync(lambda: run_cli(service_env, "migrate"))
        results.append(done.returncode)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(migrate)
    assert results == [0, 0, 0]


async def test_bad_configuration_exits_2_naming_the_variable(service_env: dict[str, str]) -> None:
    """A malformed setting fails at start with one line naming it, exit code 2."""
    env = with_env(service_env, RECONCILER_CONCURRENCY="lots")
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, "run", timeout_s=30))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "reconciler: configuration error: RECONCILER_CONCURRENCY: "
        "expected a positive integer, got 'lots'"
    ]


async def test_submit_wait_prints_the_summary(
    service_env: dict[str, str], tmp_path: Path, ports: Ports
) -> None:
    """`reconciler submit --wait` on a folder against a running service shows the summary."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"part-{i}.txt").write_text("line\n" * (i + 1))
    env = with_env(service_env, RECONCILER_HANDLER="reconciler.handlers:inspect_file")
    with service_process(env, tmp_path / "svc.log"):
        args = ("submit", str(folder), "--batch-id", "cli-batch", "--wait")
        done = await anyio.to_thread.run_sync(lambda: run_cli(env, *args))
    assert done.returncode == 0, done.stderr
    assert "batch cli-batch created with 3 files" in done.stdout
    assert "completed" in done.stdout and "lines" in done.stdout
