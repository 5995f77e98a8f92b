"""What the console's pages show, read through the same functions as the API and CLI.

Only what no API endpoint reads has its own statement (the `console_*` blocks of
`queries.sql`): the keyset page of batches, a page of one batch's files, the retries
of a batch, and the overview's counts over the last hour.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

from reconciler import batches, delivery, operations
from reconciler.console import charts
from reconciler.database import Database
from reconciler.errors import RetryableError
from reconciler.queue import JobQueue

PAGE_SIZE: Final = 50
FILES_PAGE_SIZE: Final = 100
WINDOW_S: Final = 3600.0  # the overview looks back one hour
BUCKET_S: Final = 60.0  # in one-minute steps
FILE_STATUSES: Final = ("pending", "processing", "succeeded", "failed")
BATCH_STATUSES: Final = ("processing", "completed", "completed_with_errors")


@dataclass(frozen=True, slots=True)
class BatchFilter:
    status: str | None = None
    stuck: bool = False
    run_id: str | None = None
    prefix: str | None = None


def cursor_of(row: dict[str, Any]) -> str:
    """The `after` parameter that continues the list after this row."""
    return f"{row['created_at']}|{row['batch_id']}"


def parse_cursor(text: str | None) -> tuple[dt.datetime | None, str | None]:
    """The (created_at, batch_id) an `after` parameter names; ValueError if malformed."""
    if not text:
        return None, None
    moment, sep, batch_id = text.partition("|")
    if not sep:
        raise ValueError("`after` is a created_at|batch_id pair")
    created = dt.datetime.fromisoformat(moment)
    return (created if created.tzinfo else created.replace(tzinfo=dt.UTC)), batch_id


async def batch_page(
    db: Database, which: BatchFilter, grace_s: float, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of batches, newest first, and the cursor of the next page, if any."""
    filters = (which.status, which.stuck, grace_s, which.run_id, which.prefix)
    rows = await db.fetch("console_batches", *filters, *parse_cursor(after), PAGE_SIZE)
    items = [batches.jsonable(r) for r in rows]
    return items, cursor_of(items[-1]) if len(items) == PAGE_SIZE else None


async def overview(db: Database, queue: JobQueue, grace_s: float) -> dict[str, Any]:
    """The overview's numbers: gauges, finalizations and throughput of the last hour."""
    gauges = await db.fetchrow("gauges", grace_s)
    undelivered = await db.fetchrow("console_undelivered")
    triggers = await db.fetch("console_finalizations", WINDOW_S)
    buckets = await db.fetch("console_throughput", WINDOW_S, BUCKET_S)
    assert gauges is not None and undelivered is not None
    return {
        **batches.jsonable(gauges),
        **batches.jsonable(undelivered),
        "finalizations": {r["finalized_by"]: r["batches"] for r in triggers},
        "dead_letters": await _dead_letters(queue),
        "charts": _charts([batches.jsonable(b) for b in buckets]),
    }


async def _dead_letters(queue: JobQueue) -> int | None:
    """None when Redis does not answer: the page says so instead of failing."""
    try:
        return await queue.dead_letter_count()
    except RetryableError:
        return None


def _charts(buckets: list[dict[str, Any]]) -> dict[str, charts.Chart]:
    count = int(WINDOW_S // BUCKET_S)
    by_ago = {b["ago"]: b for b in buckets}
    minutes = [by_ago.get(ago) for ago in range(count - 1, -1, -1)]  # oldest first
    files = [float(b["files"]) / BUCKET_S if b else 0.0 for b in minutes]
    mean = [b["latency_mean_s"] if b else None for b in minutes]
    return {
        "files": charts.line(files, "files/s"),
        "latency": charts.line(mean, "s"),
    }


async def batch_detail(
    db: Database, batch_id: str, grace_s: float, file_status: str | None, after: str
) -> dict[str, Any]:
    """Everything the batch page shows; BatchNotFound for an unknown id."""
    explained = await batches.explain(db, batch_id, grace_s)
    files = await db.fetch("console_batch_files", batch_id, file_status, after, FILES_PAGE_SIZE)
    children = await db.fetch("console_child_batches", batch_id)
    return {
        "progress": await batches.progress(db, batch_id),
        "explain": explained,
        "files": [batches.jsonable(f) for f in files],
        "files_next": files[-1]["file_id"] if len(files) == FILES_PAGE_SIZE else None,
        "summary": await batches.summary(db, batch_id),
        "deliveries": await delivery.of_batch(db, batch_id),
        "audit": await operations.audit(db, batch_id),
        "children": [batches.jsonable(c) for c in children],
    }
