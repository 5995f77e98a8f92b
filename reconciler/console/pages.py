"""What the console's pages show, read through the same functions as the API and CLI.

Only what no API endpoint reads has its own statement (the `console_*` blocks of
`queries.sql`): the keyset page of batches, a page of one batch's files, the retries
of a batch, and the overview's counts over the last hour.
"""

from __future__ import annotations

import datetime as dt
import time
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


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching the ids that start with `prefix`, taken literally."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def batch_page(
    db: Database, which: BatchFilter, grace_s: float, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of batches, newest first, and the cursor of the next page, if any."""
    pattern = None if which.prefix is None else like_prefix(which.prefix)
    filters = (which.status, which.stuck, grace_s, which.run_id, pattern)
    rows = await db.fetch("list_batches", *filters, *parse_cursor(after), PAGE_SIZE)
    items = [batches.jsonable(r) for r in rows]
    return items, cursor_of(items[-1]) if len(items) == PAGE_SIZE else None


async def overview(db: Database, queue: JobQueue, grace_s: float, recent: Recent) -> dict[str, Any]:
    """The overview's numbers: gauges, finalizations and throughput of the last hour."""
    gauges = await db.fetchrow("gauges", grace_s)
    undelivered = await db.fetchrow("console_undelivered")
    assert gauges is not None and undelivered is not None
    buckets = await recent.read(db)
    return {
        **batches.jsonable(gauges),
        **batches.jsonable(undelivered),
        "finalizations": _by_trigger(buckets),
        "dead_letters": await _dead_letters(queue),
        "charts": _charts(buckets),
    }


@dataclass(slots=True)
class Bucket:
    """One minute's finalizations by one trigger."""

    batches: int = 0
    files: int = 0
    latency_sum_s: float = 0.0


class Recent:
    """The last hour of finalizations per minute, re-reading only the newest minutes.

    A minute that ended more than a minute ago no longer changes (a finalization's
    transaction lasts milliseconds), so it is read once and kept; each visit reads the
    rows since then only, from an index, whatever the hour held. Minutes are counted
    on this host's clock against Postgres's timestamps: the two must agree to within
    that minute (NTP), as they must for the sweeper's grace periods anyway.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[int, str], Bucket] = {}
        self._settled = 0  # buckets before this one are final

    async def read(self, db: Database) -> dict[int, dict[str, Bucket]]:
        """Bucket (oldest is now minus the window) -> trigger -> counts."""
        now = int(time.time() // BUCKET_S)
        first = now - int(WINDOW_S // BUCKET_S) + 1
        since = max(first, self._settled)
        start = dt.datetime.fromtimestamp(since * BUCKET_S, dt.UTC)
        rows = await db.fetch("console_finalized_since", start, BUCKET_S)
        self._kept = {k: v for k, v in self._kept.items() if first <= k[0] < since}
        for row in rows:
            self._kept[row["bucket"], row["finalized_by"]] = Bucket(
                row["batches"], row["files"], row["latency_sum_s"]
            )
        self._settled = now - 1
        found: dict[int, dict[str, Bucket]] = {b: {} for b in range(first, now + 1)}
        for (bucket, trigger), counts in self._kept.items():
            found[bucket][trigger] = counts
        return found


def _by_trigger(buckets: dict[int, dict[str, Bucket]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for by_trigger in buckets.values():
        for trigger, bucket in by_trigger.items():
            counts[trigger] = counts.get(trigger, 0) + bucket.batches
    return counts


async def _dead_letters(queue: JobQueue) -> int | None:
    """None when Redis does not answer: the page says so instead of failing."""
    try:
        return await queue.dead_letter_count()
    except RetryableError:
        return None


def _charts(buckets: dict[int, dict[str, Bucket]]) -> dict[str, charts.Chart]:
    """Files per second and mean latency per minute, oldest first."""
    files, mean = [], []
    for _, by_trigger in sorted(buckets.items()):
        total = Bucket()
        for bucket in by_trigger.values():
            total.batches += bucket.batches
            total.files += bucket.files
            total.latency_sum_s += bucket.latency_sum_s
        files.append(total.files / BUCKET_S)
        mean.append(total.latency_sum_s / total.batches if total.batches else None)
    return {"files": charts.line(files, "files/s"), "latency": charts.line(mean, "s")}


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
