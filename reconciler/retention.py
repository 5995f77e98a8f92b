"""Retention: finalized batches older than RECONCILER_RETENTION_DAYS are deleted.

The sweeper calls `Retention.delete_expired` once per pass. Each statement deletes a
bounded chunk (at most CHUNK_BATCHES batches, and no more files than CHUNK_FILES after
the first batch), oldest first, in its own transaction, and a pass runs at most
STATEMENTS_PER_PASS of them: no pass holds locks for long, and a backlog (retention
switched on over years of history) drains over several passes instead of one huge
delete. The batch rows are taken with SKIP LOCKED, so replicas sweeping at once share
the work instead of waiting on each other. A batch still processing is never deleted.

The index entries of deleted batches stay (dead) at the head of the completion-time
index until VACUUM reaches them, and a scan from the start would walk all of them on
every statement. So each statement starts where the last one ended: after its chunk
when the chunk was full, else at the moment before which batches were due (every
entry before it is dead). Only every RESCAN_S does a statement start from the very
beginning, which picks up a batch skipped because another transaction held it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import structlog

from reconciler import metrics
from reconciler.database import Database

log = structlog.get_logger("reconciler.retention")

CHUNK_BATCHES: Final = 500
CHUNK_FILES: Final = 50_000
STATEMENTS_PER_PASS: Final = 10
RESCAN_S: Final = 600.0
# Before every completion time: the statement's lower bound for a scan from the start.
FROM_THE_START: Final = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Deleted:
    """What one pass deleted."""

    batches: int = 0
    files: int = 0
    statements: int = 0


class Retention:
    """Deletes the finalized batches of one database past the retention, chunk by chunk."""

    def __init__(
        self,
        db: Database,
        retention_days: int,
        *,
        chunk_batches: int = CHUNK_BATCHES,
        chunk_files: int = CHUNK_FILES,
        statements: int = STATEMENTS_PER_PASS,
        rescan_s: float = RESCAN_S,
    ) -> None:
        self._db = db
        self._days = retention_days
        self._chunk_batches = chunk_batches
        self._chunk_files = chunk_files
        self._statements = statements
        self._rescan_s = rescan_s
        self._after = FROM_THE_START
        self._rescan_at = 0.0

    async def delete_expired(self) -> Deleted:
        """One pass: deletes batches completed more than `retention_days` ago, in chunks.

        Returns what went; 0 days keeps everything. Each chunk is counted as soon as it
        is committed, so an error in a later one loses no count.
        """
        if self._days <= 0:
            return Deleted()
        if time.monotonic() >= self._rescan_at:
            self._after, self._rescan_at = FROM_THE_START, time.monotonic() + self._rescan_s
        batches = files = ran = 0
        while ran < self._statements:
            row = await self._db.fetchrow(
                "delete_expired_batches",
                self._days,
                self._chunk_batches,
                self._chunk_files,
                self._after,
            )
            ran += 1
            gone, gone_files = (int(row["batches"]), int(row["files"])) if row else (0, 0)
            metrics.RETENTION_DELETED.inc(gone)
            batches, files = batches + gone, files + gone_files
            full = gone >= self._chunk_batches or gone_files >= self._chunk_files
            if row is not None:
                # A full chunk may have left due batches after it; otherwise every
                # entry before the due moment is deleted (or held: the rescan's job).
                self._after = row["last_completed_at"] if full else row["due_before"]
            if not full:
                break  # nothing more is due (or the rest is held by another replica)
        if batches:
            log.info("retention_deleted", batches=batches, files=files, statements=ran)
        return Deleted(batches, files, ran)
