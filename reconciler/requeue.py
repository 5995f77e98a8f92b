"""Enqueues again, byte for byte as submitted, the files of these rows whose job is gone.

The one path by which a job is rebuilt from Postgres: the sweeper's re-enqueue repair,
and the after-commit step of a batch written in its caller's own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from reconciler import jobs
from reconciler.database import Row
from reconciler.queue import JobQueue


async def enqueue_missing(queue: JobQueue, rows: Sequence[Row]) -> list[Row]:
    """Enqueues the jobs of these files that are not on the stream; returns their rows.

    Each row has batch_id, file_id, uri and payload (the JSON text as submitted).
    """
    if not rows:
        return []
    members = [jobs.member(r["batch_id"], r["file_id"]) for r in rows]
    gone = await queue.missing(members)
    lost = [(r, m) for r, m in zip(rows, members, strict=True) if m in gone]
    if lost:
        entries = [
            jobs.encode_text(r["batch_id"], r["file_id"], r["uri"], r["payload"]) for r, _ in lost
        ]
        await queue.enqueue(entries, [m for _, m in lost])
    return [r for r, _ in lost]
