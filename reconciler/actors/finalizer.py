"""Where a batch is finalized: one level-based function of the database state.

`finalize` re-reads the batch under a transaction-level advisory lock and decides; the
trigger that woke it (event, sweep, demand, deadline) is only a label. The Finalizer
actor runs it for completion events, retrying while another replica holds the lock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from reconciler import metrics
from reconciler.database import Database, Row, Session
from reconciler.errors import RetryableError

log = structlog.get_logger("reconciler.finalizer")

TIMED_OUT_REASON: Final = "timed out: the batch deadline passed before this file finished"
MAX_ERROR_GROUPS: Final = 50
FINALIZE_CONCURRENCY: Final = 8
BUSY_RETRY_DELAY_S: Final = 0.05
BUSY_RETRY_MAX_DELAY_S: Final = 2.0
BUSY_RETRY_LIMIT: Final = 20


class Outcome(enum.StrEnum):
    FINALIZED = "finalized"
    NOT_READY = "not_ready"
    BUSY = "busy"
    ALREADY_FINALIZED = "already_finalized"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class FinalizeResult:
    outcome: Outcome
    batch_id: str
    trigger: str
    status: str | None = None
    latency_s: float | None = None


async def finalize(db: Database, batch_id: str, trigger: str) -> FinalizeResult:
    """Finalizes the batch if, and only if, the database says it is done."""
    log.info("finalization_called", batch_id=batch_id, trigger=trigger)
    try:
        async with db.transaction() as tx:
            result = await _decide(tx, batch_id, trigger)
    except RetryableError:
        metrics.FINALIZATIONS.labels(trigger, "error").inc()
        raise
    _observe(result)
    return result


async def _decide(tx: Session, batch_id: str, trigger: str) -> FinalizeResult:
    if not await tx.fetchval("try_lock_batch", batch_id):
        return FinalizeResult(Outcome.BUSY, batch_id, trigger)
    batch = await tx.fetchrow("batch_for_update", batch_id)
    if batch is None:
        return FinalizeResult(Outcome.NOT_FOUND, batch_id, trigger)
    if batch["status"] != "processing":
        return FinalizeResult(Outcome.ALREADY_FINALIZED, batch_id, trigger, batch["status"])
    failed = batch["files_failed"]
    remaining = batch["total_files"] - batch["files_succeeded"] - failed
    if remaining and batch["deadline_passed"]:
        row = await tx.fetchrow("fail_remaining_files", batch_id, TIMED_OUT_REASON)
        failed, remaining = row["files_failed"] if row else failed, 0
    log.info(
        "finalization_conditions_checked",
        batch_id=batch_id, trigger=trigger, total_files=batch["total_files"],
        files_succeeded=batch["files_succeeded"], files_failed=failed, files_remaining=remaining,
    )  # fmt: skip
    if remaining:
        return FinalizeResult(Outcome.NOT_READY, batch_id, trigger)
    status = "completed_with_errors" if failed else "completed"
    return await _write(tx, batch, status, trigger)


async def _write(tx: Session, batch: Row, status: str, trigger: str) -> FinalizeResult:
    batch_id = batch["batch_id"]
    log.info("aggregation_started", batch_id=batch_id, trigger=trigger)
    row = await tx.fetchrow("finalize_batch", batch_id, status, trigger, MAX_ERROR_GROUPS)
    log.info("aggregation_finished", batch_id=batch_id, trigger=trigger)
    latency_s = float(row["latency_s"]) if row is not None else 0.0
    return FinalizeResult(Outcome.FINALIZED, batch_id, trigger, status, latency_s)


def _observe(result: FinalizeResult) -> None:
    metrics.FINALIZATIONS.labels(result.trigger, result.outcome.value).inc()
    if result.outcome is Outcome.FINALIZED:
        metrics.FINALIZATION_LATENCY.labels(result.trigger).observe(result.latency_s or 0.0)
        log.info(
            "batch_finalized",
            batch_id=result.batch_id, trigger=result.trigger, status=result.status,
            latency_ms=round((result.latency_s or 0.0) * 1000, 3),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class FinalizeRequest:
    batch_id: str
    trigger: str = "event"


class Finalizer:
    """Finalizes the batches it is told about, a few at a time, retrying busy locks."""

    name = "finalizer"

    def __init__(
        self,
        db: Database,
        requests: MemoryObjectReceiveStream[FinalizeRequest],
        concurrency: int = FINALIZE_CONCURRENCY,
    ) -> None:
        self._db = db
        self._requests = requests
        self._slots = anyio.Semaphore(concurrency)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            async for request in self._requests:
                await self._slots.acquire()
                tg.start_soon(self._settle, request)

    async def _settle(self, request: FinalizeRequest) -> None:
        try:
            await self._settle_with_retries(request)
        finally:
            self._slots.release()

    async def _settle_with_retries(self, request: FinalizeRequest) -> None:
        delay = BUSY_RETRY_DELAY_S
        for _ in range(BUSY_RETRY_LIMIT):
            try:
                result = await finalize(self._db, request.batch_id, request.trigger)
            except RetryableError as exc:
                log.warning(
                    "finalization_failed",
                    batch_id=request.batch_id, trigger=request.trigger, error=str(exc),
                )  # fmt: skip
            else:
                if result.outcome is not Outcome.BUSY:
                    return
            await anyio.sleep(delay)
            delay = min(delay * 2, BUSY_RETRY_MAX_DELAY_S)
        # The sweeper finds it on its next pass: deferred, not dropped.
        log.warning("finalization_deferred", batch_id=request.batch_id, trigger=request.trigger)
