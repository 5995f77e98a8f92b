"""Operator actions on a batch: cancel it, run its failed files again, read the audit.

Each action writes its audit row (action, reason, actor, time) in the same transaction
as its effect, so there is never an effect without its row nor a row without its effect.
A cancel finalizes through `finalization`, so its batch gets its summary and its event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from reconciler import batches, jobs, metrics
from reconciler.batches import FileSpec
from reconciler.database import Database, Row, Session
from reconciler.errors import ActionRefused, BatchConflict, BatchNotFound, InvalidBatch
from reconciler.finalization import FinalizeResult, Outcome, finalize_now, observe
from reconciler.queue import JobQueue

log = structlog.get_logger("reconciler.operations")

CANCEL: Final = "cancel"
RETRY_FAILED: Final = "retry_failed"
MAX_REASON_CHARS: Final = 2000


@dataclass(frozen=True, slots=True)
class Retried:
    batch_id: str
    parent_batch_id: str
    created: bool
    total_files: int


async def cancel(db: Database, batch_id: str, reason: str, actor: str) -> FinalizeResult:
    """Finalizes the batch now as `operator`; its unfinished files fail as cancelled."""
    _check_reason(reason)
    async with db.transaction() as tx:
        result = await finalize_now(tx, batch_id)
        _refuse_unless_finalized(result)
        await _audit(tx, batch_id, CANCEL, reason, actor, {"status": result.status})
    observe(result)
    metrics.OPERATOR_ACTIONS.labels(CANCEL).inc()
    log.info("batch_cancelled", batch_id=batch_id, actor=actor, status=result.status)
    return result


def _refuse_unless_finalized(result: FinalizeResult) -> None:
    if result.outcome is Outcome.NOT_FOUND:
        raise BatchNotFound(f"no batch {result.batch_id!r}")
    if result.outcome is Outcome.ALREADY_FINALIZED:
        raise ActionRefused(f"batch {result.batch_id!r} is already finalized ({result.status})")
    if result.outcome is not Outcome.FINALIZED:
        raise ActionRefused(f"batch {result.batch_id!r} could not be cancelled: {result.outcome}")


async def retry_failed(
    db: Database,
    queue: JobQueue,
    batch_id: str,
    reason: str,
    actor: str,
    new_batch_id: str | None = None,
) -> Retried:
    """A new batch of the finalized batch's failed files, same run; idempotent on its id."""
    _check_reason(reason)
    new_batch_id = new_batch_id or batches.new_batch_id()
    if not jobs.storable(new_batch_id):
        raise InvalidBatch("batch_id has a NUL or is not UTF-8")
    async with db.transaction() as tx:
        parent, failed = await _failed_files(tx, batch_id)
        retried = await _create_child(tx, parent, new_batch_id, failed)
        if retried.created:
            detail = {"new_batch_id": new_batch_id, "files": len(failed)}
            await _audit(tx, batch_id, RETRY_FAILED, reason, actor, detail)
    if retried.created:
        await _enqueue(queue, new_batch_id, failed)
        metrics.OPERATOR_ACTIONS.labels(RETRY_FAILED).inc()
        log.info("batch_retried", batch_id=batch_id, new_batch_id=new_batch_id, actor=actor)
    return retried


async def _failed_files(tx: Session, batch_id: str) -> tuple[Row, list[Row]]:
    """The batch's failed files, refusing a batch that is unknown, unfinished or clean."""
    parent = await tx.fetchrow("batch_for_update", batch_id)
    if parent is None:
        raise BatchNotFound(f"no batch {batch_id!r}")
    if parent["status"] == "processing":
        raise ActionRefused(f"batch {batch_id!r} is not finalized: cancel it or wait")
    failed = await tx.fetch("failed_files", batch_id)
    if not failed:
        raise ActionRefused(f"batch {batch_id!r} has no failed file")
    return parent, failed


async def _create_child(tx: Session, parent: Row, batch_id: str, failed: Sequence[Row]) -> Retried:
    parent_id = parent["batch_id"]
    digest = batches.files_digest([_spec(row) for row in failed])
    created = await tx.fetchval(
        "insert_batch", batch_id, parent["run_id"], parent["metadata"], digest, len(failed), None
    )
    if created is None:
        await _check_repeat(tx, parent_id, batch_id, digest)
        return Retried(batch_id, parent_id, False, len(failed))
    await tx.execute("copy_failed_files", parent_id, batch_id)
    await tx.execute("set_parent_batch", batch_id, parent_id)
    return Retried(batch_id, parent_id, True, len(failed))


async def _check_repeat(tx: Session, parent_id: str, batch_id: str, digest: str) -> None:
    """A retry repeated with the same new id is a no-op; any other batch there conflicts."""
    existing = await tx.fetchrow("batch_lineage", batch_id)
    if existing is None or existing["parent_batch_id"] != parent_id:
        raise BatchConflict(f"batch {batch_id!r} exists and is not a retry of {parent_id!r}")
    if existing["files_digest"] != digest:
        raise BatchConflict(f"batch {batch_id!r} is a retry of {parent_id!r} with other files")


def _spec(row: Row) -> FileSpec:
    payload = None if row["payload"] is None else json.loads(row["payload"])
    return FileSpec(row["file_id"], row["uri"], payload)


async def _enqueue(queue: JobQueue, batch_id: str, failed: Sequence[Row]) -> None:
    """One job per file, its payload spliced in as stored (a crash here is swept up)."""
    entries = [jobs.encode_text(batch_id, r["file_id"], r["uri"], r["payload"]) for r in failed]
    members = [jobs.member(batch_id, r["file_id"]) for r in failed]
    for start in range(0, len(entries), batches.CHUNK_FILES):
        end = start + batches.CHUNK_FILES
        await queue.enqueue(entries[start:end], members[start:end])


async def audit(db: Database, batch_id: str) -> list[dict[str, Any]]:
    """Every operator action on the batch, oldest first."""
    await batches.progress(db, batch_id)  # raises BatchNotFound
    return [batches.jsonable(row) for row in await db.fetch("batch_audit", batch_id)]


async def _audit(
    tx: Session, batch_id: str, action: str, reason: str, actor: str, detail: dict[str, Any]
) -> None:
    await tx.execute("insert_operator_action", batch_id, action, reason, actor, detail)


def _check_reason(reason: str) -> None:
    if not reason.strip():
        raise InvalidBatch("an operator action needs a non-empty reason")
    if len(reason) > MAX_REASON_CHARS or not jobs.storable(reason):
        raise InvalidBatch(f"the reason must be at most {MAX_REASON_CHARS} characters of text")
