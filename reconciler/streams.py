"""Server-sent event streams of batches: progress while files finish, then `finalized`.

Both streams are level-based: a notification only wakes them, and they re-read the
database (the batch's counts, the outbox) to decide what to send, so a missed or
repeated notification changes nothing. Event ids make `Last-Event-ID` resume exact:
a batch's progress is numbered by its terminal files, and a `finalized` event carries
its outbox id, read back in commit-safe order (see schema/0006_event_order.sql).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import structlog

from reconciler import batches
from reconciler.database import Database, Row
from reconciler.delivery import FINALIZED_TYPE
from reconciler.errors import BatchNotFound, RetryableError
from reconciler.notifications import Kind, Notifications, Watch

log = structlog.get_logger("reconciler.streams")

RECHECK_S: Final = 1.0  # the safety-net re-read while notifications flow
POLL_S: Final = 0.5  # the re-read without LISTEN (PgBouncer in transaction mode)
OWED_RECHECK_S: Final = 0.02  # an announced event not yet readable in commit order
OWED_MAX_S: Final = 1.0  # then the safety-net re-read takes over
PAGE_SIZE: Final = 100
PING: Final = ": ping\n\n"


def frame(event: str, data: Any, event_id: str | None = None) -> str:
    """One SSE message; JSON data on a single line."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head + f"data: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def finalized_frame(row: Row) -> str:
    body = {"event_id": row["event_id"], "type": FINALIZED_TYPE, "data": row["data"]}
    return frame("finalized", body, row["event_id"])


def progress_seen(last_event_id: str | None) -> int:
    """How many terminal files the client has seen, from a progress event's id."""
    return int(last_event_id) if last_event_id and last_event_id.isdigit() else -1


async def finalized_event(db: Database, batch_id: str) -> Row | None:
    return await db.fetchrow("batch_finalized_event", batch_id)


class Pacer:
    """Sends a `: ping` when the stream has been silent for the ping interval."""

    def __init__(self, notifications: Notifications, ping_s: float) -> None:
        self._ping_s = ping_s
        self._recheck_s = notifications.interval(RECHECK_S, POLL_S)
        self._last = anyio.current_time()

    def sent(self) -> None:
        self._last = anyio.current_time()

    async def wait(self, watch: Watch, soon: bool = False) -> str | None:
        """Waits for a wake-up or a re-check; returns a ping when one is due."""
        timeout = OWED_RECHECK_S if soon else min(self._recheck_s, self._ping_s)
        await watch.wait(timeout)
        if anyio.current_time() - self._last >= self._ping_s:
            self.sent()
            return PING
        return None


async def batch_stream(
    db: Database, notifications: Notifications, batch_id: str, seen: int, ping_s: float
) -> AsyncIterator[str]:
    """Progress of one batch each time its terminal files grow, then `finalized`."""
    pacer = Pacer(notifications, ping_s)
    with notifications.watch(batch_id) as watch:
        while True:
            try:
                event = await finalized_event(db, batch_id)
                if event is not None:
                    yield finalized_frame(event)
                    return
                state = await batches.progress(db, batch_id)
            except BatchNotFound:
                return  # deleted while followed (retention or an operator)
            except RetryableError as exc:
                log.warning("stream_read_failed", batch_id=batch_id, error=str(exc))
            else:
                done = state["files_succeeded"] + state["files_failed"]
                if done > seen:
                    seen = done
                    pacer.sent()
                    yield frame("progress", state, str(done))
            if (ping := await pacer.wait(watch)) is not None:
                yield ping


async def start_cursor(db: Database, last_event_id: str | None) -> tuple[str, str]:
    """Right after the resumed event, or from now when there is none (or it is gone)."""
    row = await db.fetchrow("stream_cursor", last_event_id) if last_event_id else None
    if row is None:
        row = await db.fetchrow("stream_start")
    assert row is not None
    return row["txid"], row["event_id"]


async def all_stream(
    db: Database,
    notifications: Notifications,
    cursor: tuple[str, str],
    ping_s: float,
    with_progress: bool,
) -> AsyncIterator[str]:
    """Every batch's `finalized` events from the outbox; live progress if asked."""
    pacer = Pacer(notifications, ping_s)
    owed: dict[str, float] = {}  # announced event id -> until when to re-read soon
    with notifications.watch(None, tuple(Kind), collect=True) as watch:
        while True:
            try:
                rows = await db.fetch("finalized_events_after", *cursor, PAGE_SIZE)
            except RetryableError as exc:
                log.warning("stream_read_failed", error=str(exc))
                rows = []
            for row in rows:
                cursor = (row["txid"], row["event_id"])
                owed.pop(row["event_id"], None)
                pacer.sent()
                yield finalized_frame(row)
            if len(rows) == PAGE_SIZE:
                continue
            for state in watch.take_progress() if with_progress else ():
                pacer.sent()
                yield frame("progress", state)
            _owe(owed, watch)
            if (ping := await pacer.wait(watch, soon=bool(owed))) is not None:
                yield ping


def _owe(owed: dict[str, float], watch: Watch) -> None:
    """Adds the newly announced events; forgets those announced too long ago."""
    now = anyio.current_time()
    owed.update(dict.fromkeys(watch.finalized, now + OWED_MAX_S))
    watch.finalized = set()
    for event_id in [e for e, until in owed.items() if until <= now]:
        del owed[event_id]
