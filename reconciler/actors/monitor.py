"""The monitor: refreshes the batch, delivery and queue gauges from Postgres and Redis.

The gauges describe shared state, so every replica reports the same value; alert on
`max()` of them, never `sum()`.
"""

from __future__ import annotations

import anyio
import structlog

from reconciler import metrics
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.errors import RetryableError
from reconciler.queue import JobQueue

log = structlog.get_logger("reconciler.monitor")


class Monitor:
    name = "monitor"

    def __init__(self, settings: Settings, db: Database, queue: JobQueue) -> None:
        self._settings = settings
        self._db = db
        self._queue = queue

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except RetryableError as exc:
                log.warning("gauges_refresh_failed", error=str(exc))
            await anyio.sleep(self._settings.stats_interval_s)

    async def refresh(self) -> None:
        row = await self._db.fetchrow("gauges", self._settings.stuck_grace_s)
        if row is not None:
            metrics.BATCHES_IN_PROGRESS.set(row["in_progress"])
            metrics.BATCHES_STUCK.set(row["stuck"])
            metrics.OLDEST_UNFINALIZED_AGE.set(float(row["oldest_age_s"]))
        oldest_undelivered_s = await self._db.fetchval("delivery_gauges")
        metrics.OLDEST_UNDELIVERED_AGE.set(float(oldest_undelivered_s or 0))
        metrics.QUEUE_PENDING.set(await self._queue.length())
