"""The consumer's last stage: writes outcomes and attempts, then acks or dead-letters.

Workers and the reader send `Started` and `Settle` items to its `Inbox`; the recorder
gathers them for up to the flush interval and writes each kind in one statement. An
attempt whose file is settled within the same flush is written with its outcome alone:
a fast file costs one row update. Each step is retried on its own and can run twice safely.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Final, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler import jobs, metrics, reasons
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import TerminalError
from reconciler.execution import Attempted, outcome_columns
from reconciler.queue import Delivery, JobQueue
from reconciler.retry import persist

log = structlog.get_logger("reconciler.consumer")

T = TypeVar("T")
MAX_ERROR_CHARS: Final = 2000
# Written flushes waiting for their acknowledgements while the next one is written.
SETTLES_AHEAD: Final = 1


# Not frozen: one is made per file, and a frozen dataclass's __init__ costs 4x.
@dataclass(slots=True)
class Started:
    """A handler began this attempt; written at the next flush unless its outcome is."""

    member: str
    batch_id: str
    file_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    kind: str
    detail: str


# Not frozen: one is made per file, and a frozen dataclass's __init__ costs 4x.
@dataclass(slots=True)
class Settle:
    """The last word on one delivery: an outcome to write, then an ack or a dead letter."""

    delivery: Delivery
    ids: tuple[str, str] | None = None
    attempted: Attempted | None = None
    dead: DeadLetter | None = None
    member: str | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """Sent once per flush that made the last file of some batches terminal: those."""

    batch_ids: tuple[str, ...]


Item = Settle | Started


# The consumer's hand-offs (here and in actors/consumer.py) wait on asyncio.Event, not
# anyio.Event: the service runs on asyncio (uvloop) only, and an anyio.Event costs 3.9 us
# to make against 0.3 us, about two of them per file.


class Written:
    """The attempt Postgres holds for each running file, for a retry to wait on.

    A retry starts only once the attempt before it is written, so a crash can cost a
    file at most the one attempt it was running.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self._changed = asyncio.Event()

    def record(self, starts: list[Started]) -> None:
        for start in starts:
            self.attempts[start.member] = max(self.attempts.get(start.member, 0), start.attempt)
        self.wake()

    def forget(self, member: str) -> None:
        self.attempts.pop(member, None)

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, member: str, attempt: int, stop: anyio.Event) -> bool:
        """Waits until `attempt` of the file is written; False if the service stops first."""
        while self.attempts.get(member, 0) < attempt:
            if stop.is_set():
                return False
            await self._changed.wait()
        return True


class Inbox:
    """What the workers and the reader hand the recorder, taken a flush at a time.

    A memory channel costs a trip through the event loop per item sent and received,
    two items per file; here `send` appends at once and waits only while `limit` items
    are already waiting (so a stalled recorder still holds the workers back).
    """

    def __init__(self, limit: int) -> None:
        self._items: list[Item] = []
        self._limit = limit
        self._closed = False
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()

    async def send(self, item: Item) -> None:
        while len(self._items) >= self._limit and not self._closed:
            await self._room.wait()
        if self._closed:
            raise anyio.ClosedResourceError
        self._items.append(item)
        self._arrived.set()
        if len(self._items) >= self._limit:
            self._full.set()

    def close(self) -> None:
        """No more items: `take` returns what is left, then an empty list."""
        self._closed = True
        self._arrived.set()
        self._full.set()
        self._room.set()

    async def take(self, wait_s: float) -> list[Item]:
        """Waits for one item, then up to `wait_s` for more (or until `limit` wait)."""
        while not self._items:
            if self._closed:
                return []
            self._arrived = asyncio.Event()
            await self._arrived.wait()
        if len(self._items) < self._limit and not self._closed:
            with anyio.move_on_after(wait_s):
                await self._full.wait()
        group, self._items = self._items[: self._limit], self._items[self._limit :]
        if len(self._items) < self._limit and not self._closed:
            self._full = asyncio.Event()
        self._room.set()
        self._room = asyncio.Event()
        return group


class Recorder:
    """Writes what the workers report.

    `in_flight` loses each delivery it settles; `running` (file -> attempt) loses a file
    once its outcome is written, so a second entry for it is not run in between.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        queue: JobQueue,
        completed: MemoryObjectSendStream[Completed],
        consumer: str,
    ) -> None:
        self._settings = settings
        self._db = db
        self._queue = queue
        self._completed = completed
        self._consumer = consumer
        self._in_flight: dict[str, None] = {}
        self._running: dict[str, int] = {}
        self._written = Written()

    def track(self, in_flight: dict[str, None], running: dict[str, int], written: Written) -> None:
        """Shares the consumer's books of deliveries, running files and written attempts."""
        self._in_flight, self._running, self._written = in_flight, running, written

    async def run(self, items: Inbox) -> None:
        """Writes each flush to Postgres while the one before it is settled in Redis.

        The two stores work side by side: a flush's acknowledgements (a third of its
        time) no longer hold back the next flush's outcome statement. A flush is
        settled only after its own statements committed, and at most
        `SETTLES_AHEAD` written flushes wait for theirs.
        """
        written, to_settle = anyio.create_memory_object_stream[list[Settle]](SETTLES_AHEAD)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._settle_each, to_settle)
            async with written:
                while group := await items.take(self._settings.flush_interval_s):
                    if settles := await self._flush(group):  # not a flush of starts only
                        await written.send(settles)

    async def _flush(self, items: list[Item]) -> list[Settle]:
        """Writes a flush's attempts and outcomes; returns its deliveries to settle."""
        settles = [s for s in items if isinstance(s, Settle)]
        await self._write_starts(items, {s.member for s in settles})
        outcomes = [s for s in settles if s.attempted is not None and s.ids is not None]
        rows = await self._write(outcomes) if outcomes else []
        self._forget(outcomes)
        # Committed: the detector may finalize while the acknowledgement is in flight.
        if complete := tuple(row["batch_id"] for row in rows if row["complete"]):
            await self._completed.send(Completed(complete))
        return settles

    async def _settle_each(self, flushes: MemoryObjectReceiveStream[list[Settle]]) -> None:
        async with flushes:
            async for settles in flushes:
                await self._settle(settles)

    async def _settle(self, settles: list[Settle]) -> None:
        """Acknowledges a written flush's deliveries, or dead-letters them."""
        acks = [s for s in settles if s.dead is None]
        members = [m for s in acks if (m := s.member) is not None]
        await self._retried(partial(self._acked, [s.delivery.id for s in acks], members), "ack")
        for settle in settles:
            if settle.dead is not None:
                await self._retried(partial(self._dead_letter, settle), "dead_letter")

    def _forget(self, outcomes: list[Settle]) -> None:
        for settle in outcomes:
            attempted = settle.attempted
            if attempted and self._running.get(settle.member or "") == attempted.attempts:
                del self._running[settle.member or ""]
                self._written.forget(settle.member or "")

    async def _write_starts(self, items: list[Item], settled: set[str | None]) -> None:
        """Attempts still running at this flush: in flight, with a lease, in Postgres."""
        running = {s.member: s for s in items if isinstance(s, Started)}
        starts = [s for member, s in running.items() if member not in settled]
        if not starts:
            return
        columns = (
            [s.batch_id for s in starts],
            [s.file_id for s in starts],
            [s.attempt for s in starts],
        )
        vis = self._settings.visibility_timeout_s
        call = partial(self._db.execute, "record_starts", *columns, self._consumer, vis)
        await self._retried(call, "start_write")
        self._written.record(starts)

    async def _write(self, outcomes: list[Settle]) -> list[Row]:
        try:
            return await self._record(outcomes)
        except TerminalError:
            return await self._write_one_by_one(outcomes)

    async def _write_one_by_one(self, outcomes: list[Settle]) -> list[Row]:
        """An outcome Postgres refuses fails its file with the reason; the rest stand."""
        rows: list[Row] = []
        for settle in outcomes:
            try:
                rows += await self._record([settle])
            except TerminalError as exc:
                log.warning("outcome_unstorable", ids=settle.ids, error=str(exc))
                rows += await self._record([_unstorable(settle, exc)])
        return rows

    async def _record(self, outcomes: list[Settle]) -> list[Row]:
        # Outcomes live only in memory until written: retry rather than drop them.
        rows = [(s.ids[0], s.ids[1], s.attempted) for s in outcomes if s.ids and s.attempted]
        call = partial(self._db.fetch, "record_outcomes", *outcome_columns(rows))
        return await self._retried(call, "outcome_write")

    async def _acked(self, ids: list[str], members: list[str]) -> None:
        await self._queue.ack(ids, members)
        for job_id in ids:
            self._in_flight.pop(job_id, None)

    async def _dead_letter(self, settle: Settle) -> None:
        assert settle.dead is not None
        delivery, dead = settle.delivery, settle.dead
        await self._queue.dead_letter(delivery, dead.detail, settle.member)
        self._in_flight.pop(delivery.id, None)
        metrics.JOBS_DEAD_LETTERED.labels(dead.kind).inc()
        ids = {"batch_id": settle.ids[0], "file_id": settle.ids[1]} if settle.ids else {}
        log.warning(
            "job_dead_lettered", job_id=delivery.id, reason=dead.kind, detail=dead.detail, **ids
        )

    async def _retried(self, call: Callable[[], Awaitable[T]], step: str) -> T:
        return await persist(call, f"{step}_failed", log, consumer=self._consumer)


def _unstorable(settle: Settle, exc: Exception) -> Settle:
    assert settle.attempted is not None
    error = f"{reasons.UNSTORABLE}{exc}"[:MAX_ERROR_CHARS]
    return replace(settle, attempted=Attempted(False, None, error, 0.0, settle.attempted.attempts))


def undecodable(delivery: Delivery, detail: str, ids: tuple[str, str] | None) -> Settle:
    """A malformed job: the file it names (if any) fails with the reason."""
    error = f"{reasons.UNDECODABLE}{detail}"[:MAX_ERROR_CHARS]
    failed = Attempted(False, None, error, None, 0) if ids else None
    member = jobs.member(*ids) if ids else None
    return Settle(delivery, ids, failed, DeadLetter("malformed", detail), member)
