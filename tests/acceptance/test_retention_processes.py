"""Retention against a real `reconciler run`: old finalized batches go with every row
they own, young and unfinalized ones stay, `0` keeps everything, and a large backlog
drains in bounded chunks on the index."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from reconciler import operations
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.queries import QUERIES
from reconciler.retention import CHUNK_BATCHES, FROM_THE_START, STATEMENTS_PER_PASS
from tests.acceptance.processes import ServiceProcess, run_cli, service_process, with_env
from tests.chaos.harness import read_events
from tests.helpers import files, running, sql, submit, wait_for

RETENTION_DAYS: Final = 30
OLD: Final = ("old-done", "old-cancelled", "old-parent", "old-child")
KEPT: Final = ("young-done", "ancient-open", "young-retry")
BACKLOG: Final = 100_000
HOOK: Final = "tests.delivery_hooks:record"

# Rows per batch in every table that holds rows of a batch (deliveries and their
# attempts through the batch's events).
_ROWS: Final = """
SELECT b.id,
       (SELECT count(*) FROM batches WHERE batch_id = b.id) AS batches,
       (SELECT count(*) FROM batch_files WHERE batch_id = b.id) AS files,
       (SELECT count(*) FROM run_summaries WHERE batch_id = b.id) AS summaries,
       (SELECT count(*) FROM events WHERE batch_id = b.id) AS events,
       (SELECT count(*) FROM deliveries d JOIN events e USING (event_id)
        WHERE e.batch_id = b.id) AS deliveries,
       (SELECT count(*) FROM delivery_attempts a JOIN deliveries d USING (delivery_id)
        JOIN events e USING (event_id) WHERE e.batch_id = b.id) AS attempts,
       (SELECT count(*) FROM operator_actions WHERE batch_id = b.id) AS audit
FROM unnest($1::text[]) AS b (id)
"""
# The whole size of each table, to see that nothing is left behind of a deleted batch.
_TOTALS: Final = """
SELECT (SELECT count(*) FROM batches) AS batches,
       (SELECT count(*) FROM batch_files) AS files,
       (SELECT count(*) FROM run_summaries) AS summaries,
       (SELECT count(*) FROM events) AS events,
       (SELECT count(*) FROM deliveries) AS deliveries,
       (SELECT count(*) FROM delivery_attempts) AS attempts,
       (SELECT count(*) FROM operator_actions) AS audit
"""
# Moves a batch's whole life `$2` days into the past.
_AGE: Final = """
UPDATE batches
SET created_at = created_at - make_interval(days => $2),
    last_file_completed_at = last_file_completed_at - make_interval(days => $2),
    completed_at = completed_at - make_interval(days => $2)
WHERE batch_id = ANY ($1::text[])
"""
# $1 finalized batches of one file each, with their files and summaries, completed
# 40 days ago (a millisecond apart, oldest first).
_BACKLOG: Final = """
WITH made AS (
    INSERT INTO batches (batch_id, run_id, status, files_digest, total_files,
                         files_succeeded, created_at, last_file_completed_at,
                         completed_at, finalized_by)
    SELECT 'bulk-' || g, 'bulk', 'completed', 'bulk', 1, 1, t, t, t, 'event'
    FROM (SELECT g, now() - interval '40 days' + g * interval '1 millisecond' AS t
          FROM generate_series(1, $1::integer) g) s
    RETURNING batch_id, created_at, completed_at
), made_files AS (
    INSERT INTO batch_files (batch_id, file_id, uri, status, attempts, finished_at)
    SELECT batch_id, 'f', 'mem://f', 'succeeded', 1, completed_at FROM made
)
INSERT INTO run_summaries (batch_id, run_id, status, finalized_by, total_files,
                           files_succeeded, files_failed, created_at, completed_at,
                           processing_seconds, errors, totals, metadata)
SELECT batch_id, 'bulk', 'completed', 'event', 1, 1, 0, created_at, completed_at,
       '{}', '[]', '{}', '{}'
FROM made
"""


def _env(service_env: dict[str, str], days: int) -> dict[str, str]:
    return with_env(
        service_env,
        RECONCILER_RETENTION_DAYS=str(days),
        RECONCILER_SWEEP_INTERVAL_S="0.2",
        RECONCILER_STUCK_GRACE_S="3600",
    )


async def _rows(url: str, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    found = await sql(url, _ROWS, list(batch_ids))
    return {r["id"]: {k: int(v) for k, v in dict(r).items() if k != "id"} for r in found}


async def _totals(url: str) -> dict[str, int]:
    return {k: int(v) for k, v in dict((await sql(url, _TOTALS))[0]).items()}


async def _delivered(url: str, batch_ids: Sequence[str]) -> bool:
    rows = await _rows(url, batch_ids)
    return all(r["attempts"] >= 1 and r["summaries"] == 1 for r in rows.values())


async def _make_history(settings: Settings, ports: Ports) -> None:
    """Batches with every kind of row: files, summaries, events, hook deliveries and
    their attempts, cancels and retries with their audit rows, a parent and its child."""
    url = settings.database_url or ""
    with_hook = dataclasses.replace(settings, on_finalized=HOOK, retention_days=0)
    async with running(with_hook, ports):
        await submit(ports, files(3), batch_id="old-done")
        await submit(ports, files(2), batch_id="young-done")
        await wait_for(lambda: _delivered(url, ["old-done", "young-done"]), what="events delivered")
    # No worker from here on: these batches only move by operator actions.
    for parent, child, child_cancelled in (
        ("old-cancelled", "young-retry", False),
        ("old-parent", "old-child", True),
    ):
        await submit(ports, files(2), batch_id=parent)
        await operations.cancel(ports.db, parent, "runaway", "alice")
        await operations.retry_failed(ports.db, ports.queue, parent, "again", "alice", child)
        if child_cancelled:
            await operations.cancel(ports.db, child, "still broken", "alice")
    await submit(ports, files(2), batch_id="ancient-open")
    await sql(url, _AGE, list(OLD), RETENTION_DAYS + 1)
    await sql(url, _AGE, ["young-done"], RETENTION_DAYS - 1)  # a day inside the limit
    await sql(url, _AGE, ["ancient-open"], 400)  # never finalized: never deleted


def _deleted_total(process: ServiceProcess) -> float:
    answer = httpx.get(f"http://127.0.0.1:{process.port}/metrics", timeout=10)
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "reconciler_retention_deleted_total":
                return float(sample.value)
    raise AssertionError("reconciler_retention_deleted_total is not exported")


def _passes(process: ServiceProcess) -> list[dict[str, Any]]:
    return [e for e in read_events(process.log_path) if e.get("event") == "sweep_finished"]


async def _passes_after(process: ServiceProcess, count: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        found = _passes(process)
        return found if len(found) >= count else None

    return await wait_for(enough, what=f"{count} sweep passes")


async def test_old_finalized_batches_go_with_all_their_rows(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Past the retention: batch, files, summary, event, deliveries, attempts, audit go;
    a young batch, an ancient unfinalized one and the young retry of an old one stay."""
    url = settings.database_url or ""
    await _make_history(settings, ports)
    before = await _rows(url, OLD + KEPT)
    assert before["old-done"]["attempts"] >= 1 and before["old-done"]["files"] == 3
    assert before["old-cancelled"]["audit"] == 2 and before["old-child"]["audit"] == 1
    assert all(before[b]["events"] == 1 and before[b]["deliveries"] >= 1 for b in OLD)
    parents = await sql(url, "SELECT parent_batch_id FROM batches WHERE batch_id = 'young-retry'")
    assert parents[0][0] == "old-cancelled"
    totals = await _totals(url)
    env = _env(service_env, RETENTION_DAYS)
    with service_process(env, tmp_path / "sweeper.log", "--role", "sweeper") as proc:
        await _passes_after(proc, 1)

        async def old_gone() -> bool:
            rows = await _rows(url, OLD)
            return all(not any(r.values()) for r in rows.values())

        await wait_for(old_gone, what="the old batches deleted")
        seen = len(_passes(proc))
        await _passes_after(proc, seen + 3)  # later passes delete nothing more
        deleted = await anyio.to_thread.run_sync(_deleted_total, proc)
    after = await _rows(url, OLD + KEPT)
    assert {b: after[b] for b in KEPT} == {b: before[b] for b in KEPT}
    assert deleted == len(OLD)
    gone = {k: sum(before[b][k] for b in OLD) for k in totals}
    assert await _totals(url) == {k: totals[k] - gone[k] for k in totals}
    status = await sql(
        url, "SELECT status, parent_batch_id FROM batches WHERE batch_id = 'young-retry'"
    )
    assert tuple(status[0]) == ("processing", None)  # the child stays, unlinked


async def test_zero_days_keeps_everything(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """RECONCILER_RETENTION_DAYS=0: passes run, nothing is deleted however old."""
    url = settings.database_url or ""
    await _make_history(settings, ports)
    await sql(url, _AGE, list(OLD), 3650)
    totals = await _totals(url)
    with service_process(_env(service_env, 0), tmp_path / "sweeper.log", "--role", "sweeper") as p:
        passes = await _passes_after(p, 5)
        deleted = await anyio.to_thread.run_sync(_deleted_total, p)
    assert await _totals(url) == totals
    assert deleted == 0 and not any("retention_deleted" in e for e in passes)


async def test_a_large_backlog_drains_in_bounded_chunks_on_the_index(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """100k old batches: the statement reads the partial index, two replicas share the
    work, no pass deletes more than its bound, and every old batch goes, nothing else."""
    url = settings.database_url or ""
    await sql(url, _BACKLOG, BACKLOG)
    await submit(ports, files(2), batch_id="young-open")
    await sql(url, _AGE, ["young-open"], 400)
    plan = await sql(
        url,
        "EXPLAIN " + QUERIES["delete_expired_batches"],
        RETENTION_DAYS,
        CHUNK_BATCHES,
        50_000,
        FROM_THE_START,
    )
    text = "\n".join(r[0] for r in plan)
    assert "batches_finalized_idx" in text and "Seq Scan on batches" not in text, text
    env = _env(service_env, RETENTION_DAYS)
    with (
        service_process(env, tmp_path / "a.log", "--role", "sweeper") as a,
        service_process(env, tmp_path / "b.log", "--role", "sweeper") as b,
    ):

        async def drained() -> bool:
            rows = await sql(url, "SELECT count(*) FROM batches WHERE run_id = 'bulk'")
            return int(rows[0][0]) == 0

        await wait_for(drained, timeout_s=240, what="the backlog deleted")

        async def counted() -> float:
            totals = [await anyio.to_thread.run_sync(_deleted_total, p) for p in (a, b)]
            return sum(totals) if sum(totals) >= BACKLOG else 0

        assert await wait_for(counted, what="every deletion counted") == BACKLOG
        logged = [e for p in (a, b) for e in read_events(p.log_path)]
    passes = [e for e in logged if e.get("event") == "sweep_finished"]
    per_pass = [e["retention_deleted"] for e in passes if "retention_deleted" in e]
    bound = CHUNK_BATCHES * STATEMENTS_PER_PASS
    assert len(per_pass) >= BACKLOG // bound and max(per_pass) <= bound, per_pass
    assert not [e for e in logged if e.get("event") == "sweep_repair_failed"]
    left = await _totals(url)
    assert (left["batches"], left["files"], left["summaries"]) == (1, 2, 0)


async def test_a_bad_retention_fails_at_start_naming_it(service_env: dict[str, str]) -> None:
    """RECONCILER_RETENTION_DAYS=-1: `reconciler run` exits 2 with one line naming it."""
    env = with_env(service_env, RECONCILER_RETENTION_DAYS="-1")
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, "run", timeout_s=30))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "reconciler: configuration error: RECONCILER_RETENTION_DAYS: expected a whole number"
        " of days 0-36500 (0 keeps everything), got '-1'"
    ]
