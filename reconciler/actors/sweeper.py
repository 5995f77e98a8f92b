"""The sweeper: a periodic, state-driven pass that repairs what events missed.

Each pass reclaims files whose worker stopped renewing its lease, re-enqueues pending
files whose job is gone, finalizes batches past their deadline, and finalizes batches
left complete but unfinalized past the grace period. Every query reads a partial index
over unfinished rows, so a pass costs the same however much history the tables hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import anyio
import structlog

from reconciler import jobs, metrics
from reconciler.config import Settings
from reconciler.database import Database, columns
from reconciler.execution import Attempted, outcome_columns
from reconciler.finalization import Outcome, finalize
from reconciler.queue import JobQueue

log = structlog.get_logger("reconciler.sweeper")

SWEEP_BATCH_LIMIT: Final = 1000
LEASE_LOST_REASON: Final = "worker stopped renewing its lease and the attempts are spent"


@dataclass(slots=True)
class SweepReport:
    """What one pass repaired, by kind."""

    repairs: dict[str, int] = field(default_factory=dict)
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

    async def run(self) -> None:
        while True:
            await self.sweep_once()
            await anyio.sleep(self._settings.sweep_interval_s)

    async def sweep_once(self) -> SweepReport:
        """One full pass; safe to run on every replica at once."""
        report = SweepReport()
        started = time.perf_counter()
        report.add("lease_reclaimed", await self._reclaim_leases())
        report.add("lease_exhausted", await self._fail_exhausted())
        report.add("requeued", await self._requeue_missing())
        report.add("deadline", await self._finalize_each("deadline_batches", "deadline"))
        report.add("finalized", await self._finalize_stuck())
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
                Attempted(False, None, LEASE_LOST_REASON, None, r["attempts"]),
            )
            for r in rows
        ]
        moved = await self._db.fetch("record_outcomes", *outcome_columns(lost))
        for batch in moved:
            if batch["complete"]:
                await finalize(self._db, batch["batch_id"], "sweep")
        return len(rows)

    async def _requeue_missing(self) -> int:
        grace = max(self._settings.visibility_timeout_s, self._settings.stuck_grace_s)
        rows = await self._db.fetch("unqueued_files", grace, SWEEP_BATCH_LIMIT)
        if not rows:
            return 0
        members = [jobs.member(r["batch_id"], r["file_id"]) for r in rows]
        gone = await self._queue.missing(members)
        lost = [r for r, m in zip(rows, members, strict=True) if m in gone]
        if lost:
            entries = [
                jobs.encode(r["batch_id"], r["file_id"], r["uri"], r["payload"]) for r in lost
            ]
            await self._queue.enqueue(entries, [m for m in members if m in gone])
        # Waiting or requeued, each is looked at again only after another grace period.
        await self._db.execute("touch_pending", *columns(rows, "batch_id", "file_id"))
        for row in lost:
            log.info("file_requeued", batch_id=row["batch_id"], file_id=row["file_id"])
        return len(lost)

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
        return await self._finalize_all([r["batch_id"] for r in rows], "sweep")

    async def _finalize_each(self, query: str, trigger: str) -> int:
        rows = await self._db.fetch(query, SWEEP_BATCH_LIMIT)
        return await self._finalize_all([r["batch_id"] for r in rows], trigger)

    async def _finalize_all(self, batch_ids: list[str], trigger: str) -> int:
        done = 0
        for batch_id in batch_ids:
            result = await finalize(self._db, batch_id, trigger)
            done += result.outcome is Outcome.FINALIZED
        return done
