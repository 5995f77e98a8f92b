"""Retention: finalized batches older than RECONCILER_RETENTION_DAYS are deleted.

The sweeper calls `delete_expired` once per pass. Each statement deletes a bounded
chunk (at most CHUNK_BATCHES batches, and no more files than CHUNK_FILES after the
first batch), oldest first, in its own transaction, and a pass runs at most
STATEMENTS_PER_PASS of them: no pass holds locks for long, and a backlog (retention
switched on over years of history) drains over several passes instead of one huge
delete. The batch rows are taken with SKIP LOCKED, so replicas sweeping at once share
the work instead of waiting on each other. A batch still processing is never deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import structlog

from reconciler import metrics
from reconciler.database import Database

log = structlog.get_logger("reconciler.retention")

CHUNK_BATCHES: Final = 500
CHUNK_FILES: Final = 50_000
STATEMENTS_PER_PASS: Final = 10


@dataclass(frozen=True, slots=True)
class Deleted:
    """What one pass deleted."""

    batches: int = 0
    files: int = 0
    statements: int = 0


async def delete_expired(
    db: Database,
    retention_days: int,
    *,
    chunk_batches: int = CHUNK_BATCHES,
    chunk_files: int = CHUNK_FILES,
    statements: int = STATEMENTS_PER_PASS,
) -> Deleted:
    """Deletes finalized batches completed more than `retention_days` ago, in chunks.

    Returns what went; 0 days keeps everything. Each chunk is counted as soon as it is
    committed, so an error in a later one loses no count.
    """
    if retention_days <= 0:
        return Deleted()
    batches = files = ran = 0
    while ran < statements:
        row = await db.fetchrow(
            "delete_expired_batches", retention_days, chunk_batches, chunk_files
        )
        ran += 1
        gone, gone_files = (int(row["batches"]), int(row["files"])) if row else (0, 0)
        metrics.RETENTION_DELETED.inc(gone)
        batches, files = batches + gone, files + gone_files
        if gone < chunk_batches and gone_files < chunk_files:
            break  # nothing more is due (or the rest is held by another replica)
    if batches:
        log.info("retention_deleted", batches=batches, files=files, statements=ran)
    return Deleted(batches, files, ran)
