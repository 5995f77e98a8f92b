"""Where a batch is finalized: one level-based function of the database state.

`finalize` re-reads the batch under a transaction-level advisory lock and decides; the
trigger that woke it (event, sweep, demand, deadline) is only a label. The finalizer
actor, the sweeper, the HTTP API and submission all call it. An operator's cancel
(`finalize_now`) goes through the same decision, inside the caller's transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import structlog

from reconciler import metrics, reasons
from reconciler.database import Database, Row, Session
from reconciler.errors import RetryableError

log = structlog.get_logger("reconciler.finalizer")

MAX_ERROR_GROUPS: Final = 50


class Trigger(enum.StrEnum):
    """What woke a finalization: only a label, never a reason to decide differently."""

    EVENT = "event"
    SWEEP = "sweep"
    DEMAND = "demand"
    DEADLINE = "deadline"
    OPERATOR = "operator"


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
    observe(result)
    return result


async def finalize_now(tx: Session, batch_id: str) -> FinalizeResult:
    """An operator's cancel, in the caller's transaction: waits for the batch's lock,
    fails its unfinished files as cancelled and finalizes it. Call `observe` after commit.
    """
    await tx.fetchval("lock_batch", batch_id)
    return await _decide(tx, batch_id, Trigger.OPERATOR)


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
    fail_reason = _fail_reason(batch, trigger)
    if remaining and fail_reason:
        row = await tx.fetchrow("fail_remaining_files", batch_id, fail_reason)
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


def _fail_reason(batch: Row, trigger: str) -> str | None:
    """Why unfinished files fail now, if they do: a cancel, or the deadline passed."""
    if trigger == Trigger.OPERATOR:
        return reasons.CANCELLED
    return reasons.TIMED_OUT if batch["deadline_passed"] else None


async def _write(tx: Session, batch: Row, status: str, trigger: str) -> FinalizeResult:
    batch_id = batch["batch_id"]
    log.info("aggregation_started", batch_id=batch_id, trigger=trigger)
    row = await tx.fetchrow("finalize_batch", batch_id, status, trigger, MAX_ERROR_GROUPS)
    log.info("aggregation_finished", batch_id=batch_id, trigger=trigger)
    latency_s = float(row["latency_s"]) if row is not None else 0.0
    return FinalizeResult(Outcome.FINALIZED, batch_id, trigger, status, latency_s)


def observe(result: FinalizeResult) -> None:
    """Counts a finalization's outcome; logs and times it when it finalized."""
    metrics.FINALIZATIONS.labels(result.trigger, result.outcome.value).inc()
    if result.outcome is Outcome.FINALIZED:
        metrics.FINALIZATION_LATENCY.labels(result.trigger).observe(result.latency_s or 0.0)
        log.info(
            "batch_finalized",
            batch_id=result.batch_id, trigger=result.trigger, status=result.status,
            latency_ms=round((result.latency_s or 0.0) * 1000, 3),
        )  # fmt: skip
