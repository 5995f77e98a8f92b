"""The sweeper: a periodic, state-driven pass that repairs what events missed.

Each pass reclaims files whose worker stopped renewing its lease, finalizes batches
past their deadline and batches left complete but unfinalized past the grace period,
re-enqueues files whose job is gone, removes consumers of stopped processes, and deletes
finalized batches past their retention. Each repair runs on its own: a Redis outage
stops only the Redis ones. Every query reads a partial index (unfinished rows, or the
finalized batches by completion time), so a pass costs the same however much history
the tables hold.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import anyio
import structlog

from reconciler import metrics, reasons, requeue, retention
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import RetryableError
from reconciler.execution import Attempted, outcome_columns
from reconciler.finalization import Outcome, Trigger, finalize
from reconciler.queue import JobQueue

log = structlog.get_logger("reconciler.sweeper")

SWEEP_BATCH_LIMIT: Final = 1000


@dataclass(slots=True)
class SweepReport:
    """What one pass repaired, by kind."""

    repairs: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def add(self, kind: str, count: int) -> None:
        if count:
            self.repairs[kind] = self.repairs.get(kind, 0) + count
            metrics.SWEEP_REPAIRS.labels(kind).inc(count)


class Sweeper:
    name = "sweeper"

    def __init__(self, settings: Settings, db: Database, queue: JobQueue) -> None:
        self._settings = settings
        self._db = db
        self._queue = queue
        self._retention = retention.Retention(db, settings.retention_days)

    async def run(self) -> None:
        while True:
            await self.sweep_once()
            await anyio.sleep(self._settings.sweep_interval_s)

    async def sweep_once(self) -> SweepReport:
        """One full pass; safe to run on every replica at once."""
        report = SweepReport()
        started = time.perf_counter()
        repairs: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("lease_reclaimed", self._reclaim_leases),
            ("lease_exhausted", self._fail_exhausted),
            ("deadline", self._finalize_past_deadline),
            ("finalized", self._finalize_stuck),
            ("requeued", self._requeue_missing),
            ("consumers_removed", self._prune_consumers),
            ("retention_deleted", self._delete_expired),
        ]
        for kind, repair in repairs:
            try:
                report.add(kind, await repair())
            except RetryableError as exc:
                # The others still run: Postgres repairs go on while Redis is down.
                log.warning("sweep_repair_failed", repair=kind, error=str(exc))
                report.failed.append(kind)
        report.duration_s = time.perf_counter() - started
        metrics.SWEEP_DURATION.observe(report.duration_s)
        log.info("sweep_finished", duration_ms=round(report.duration_s * 1000, 3), **report.repairs)
        return report

    async def _reclaim_leases(self) -> int:
        rows = await self._db.fetch(
            "expired_leases", self._settings.max_attempts, SWEEP_BATCH_LIMIT
        )
        for row in rows:
            log.info("lease_reclaimed", batch_id=row["batch_id"], file_id=row["file_id"])
        return len(rows)

    async def _fail_exhausted(self) -> int:
        rows = await self._db.fetch(
            "exhausted_leases", self._settings.max_attempts, SWEEP_BATCH_LIMIT
        )
        if not rows:
            return 0
        lost = [
            (
                r["batch_id"],
                r["file_id"],
                Attempted(False, None, reasons.LAST_ATTEMPT_LOST, None, r["attempts"]),
            )
            for r in rows
        ]
        moved = await self._db.fetch("record_outcomes", *outcome_columns(lost))
        for batch in moved:
            if batch["complete"]:
                await finalize(self._db, batch["batch_id"], Trigger.SWEEP)
        return len(rows)

    async def _requeue_missing(self) -> int:
        """Re-enqueues files whose job is gone, each claimed in Postgres by one replica."""
        if await self._queue.take_recovery():
            # Redis lost the namespace (or this is its first sweep): every unfinished
            # file may have lost its job, in flight or not, so look now, not after a
            # lease and a grace period. The recovery key lets one replica do it. A file
            # whose submitter is enqueueing it right now may get a second job: the
            # consumer acknowledges or holds off duplicates, so it still runs once.
            return await self._requeue_unfinished()
        grace = max(self._settings.visibility_timeout_s, self._settings.stuck_grace_s)
        rows = await self._db.fetch("claim_unqueued_files", grace, SWEEP_BATCH_LIMIT)
        return await self._enqueue_missing(rows)

    async def _requeue_unfinished(self) -> int:
        requeued, after = 0, ("", "")
        while rows := await self._db.fetch("unfinished_files", *after, SWEEP_BATCH_LIMIT):
            requeued += await self._enqueue_missing(rows)
            after = (rows[-1]["batch_id"], rows[-1]["file_id"])
        if requeued:
            log.warning("redis_data_lost_requeued", files=requeued)
        return requeued

    async def _enqueue_missing(self, rows: Sequence[Row]) -> int:
        enqueued = await requeue.enqueue_missing(self._queue, rows)
        for row in enqueued:
            log.info("file_requeued", batch_id=row["batch_id"], file_id=row["file_id"])
        return len(enqueued)

    async def _prune_consumers(self) -> int:
        """Removes consumers of stopped processes: idle past the lease, nothing pending."""
        idle_ms = int(self._settings.visibility_timeout_s * 1000)
        removed = await self._queue.prune_consumers(idle_ms)
        if removed:
            log.info("consumers_removed", consumers=removed)
        return len(removed)

    async def _delete_expired(self) -> int:
        """Deletes a bounded chunk of finalized batches older than the retention."""
        return (await self._retention.delete_expired()).batches

    async def _finalize_stuck(self) -> int:
        rows = await self._db.fetch(
            "stuck_batches", self._settings.stuck_grace_s, SWEEP_BATCH_LIMIT
        )
        for row in rows:
            log.warning(
                "stuck_batch_detected",
                batch_id=row["batch_id"], files_succeeded=row["files_succeeded"],
                files_failed=row["files_failed"], total_files=row["total_files"],
                seconds_since_last_file=float(row["seconds_since_last_file"]),
            )  # fmt: skip
        return await self._finalize_all([r["batch_id"] for r in rows], Trigger.SWEEP)

    async def _finalize_past_deadline(self) -> int:
        rows = await self._db.fetch("deadline_batches", SWEEP_BATCH_LIMIT)
        return await self._finalize_all([r["batch_id"] for r in rows], Trigger.DEADLINE)

    async def _finalize_all(self, batch_ids: list[str], trigger: Trigger) -> int:
        done = 0
        for batch_id in batch_ids:
            result = await finalize(self._db, batch_id, trigger)
            done += result.outcome is Outcome.FINALIZED
        return done
