"""The consumer: reads jobs from the stream, runs the handler, records, acknowledges.

Three stages: a reader (XREADGROUP, XAUTOCLAIM for jobs a
stopped consumer left behind) that checks each file in Postgres with a read and hands
runnable ones to workers as they come free; `concurrency` workers; and the recorder
(`reconciler/recording.py`). Files reach the workers, and outcomes the recorder,
without a trip through the event loop each: a worker that finds the next file waiting
takes it at once, so a read block of fast files runs as one unit. An attempt is
written once its handler has started: with its outcome when the file is done by the
next flush, else on its own as in flight. Reading, stopping and dependency errors
spend no attempt.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from reconciler import jobs, metrics, reasons
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import MalformedJob, RetryableError, TerminalError
from reconciler.execution import Attempted, Executor
from reconciler.queue import Delivery, JobQueue
from reconciler.recording import (
    Completed,
    DeadLetter,
    Inbox,
    Recorder,
    Settle,
    Started,
    Written,
    undecodable,
)
from reconciler.retry import Stopping, persist

log = structlog.get_logger("reconciler.consumer")
T = TypeVar("T")

READ_BLOCK_MS: Final = 500
READ_COUNT_MIN: Final = 128
CLAIM_CHECK_INTERVAL_S: Final = 5.0
RELEASE_STEP_TIMEOUT_S: Final = 1.0
RELEASE_MAX_JOBS: Final = 10_000
TERMINAL: Final = frozenset(("succeeded", "failed"))
# A file that waited longer than this for a free worker is checked again before it runs.
RECHECK_AFTER_S: Final = 1.0
UNKNOWN_DETAIL: Final = "no such batch or file"
UNSTORABLE_DETAIL: Final = "its ids cannot be stored in Postgres"

Out = Inbox


# Not frozen: one is made per file, and a frozen dataclass's __init__ costs 4x.
@dataclass(slots=True)
class Work:
    """A runnable file: `job.attempt` is the attempt its handler will start."""

    delivery: Delivery
    job: jobs.FileJob
    member: str
    checked_at: float


def consumer_name() -> str:
    """One name per process, stable for its life, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _Dispatch:
    """Runnable files for the workers, handed over without a task switch."""

    def __init__(self) -> None:
        self._items: deque[Work] = deque()
        self._idle: deque[asyncio.Event] = deque()
        self._closed = False

    def put(self, item: Work) -> None:
        self._items.append(item)
        if self._idle:
            self._idle.popleft().set()

    def close(self) -> None:
        """Workers finish the files handed out, then stop."""
        self._closed = True
        while self._idle:
            self._idle.popleft().set()

    async def next(self) -> Work | None:
        """The next file; None once closed and drained.

        One trip through the event loop first, as a channel would make: a worker
        running fast files back to back must not hold back the finalizer, whose
        statements each wait for a turn of the loop (finalize latency doubled when
        a worker ran eight files per turn).
        """
        await asyncio.sleep(0)
        while not self._items:
            if self._closed:
                return None
            woken = asyncio.Event()
            self._idle.append(woken)
            try:
                await woken.wait()
            finally:
                if not woken.is_set():
                    self._idle.remove(woken)
        return self._items.popleft()


class _Slots:
    """Free workers: the reader hands out no more files than can run right now."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._changed = asyncio.Event()

    def release(self, count: int = 1) -> None:
        self.free += count
        self._changed.set()

    def wake(self) -> None:
        self._changed.set()

    async def take(self, wanted: int, stop: anyio.Event) -> int:
        while self.free == 0 and not stop.is_set():
            self._changed = asyncio.Event()
            await self._changed.wait()
        if stop.is_set():
            raise Stopping
        taken = min(self.free, wanted)
        self.free -= taken
        return taken


class Consumer:
    name = "consumer"

    def __init__(
        self,
        settings: Settings,
        db: Database,
        queue: JobQueue,
        executor: Executor,
        completed: MemoryObjectSendStream[Completed],
        stop: anyio.Event,
        name: str | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._queue = queue
        self._executor = executor
        self._completed = completed
        self._stop = stop
        self._fixed_name = name
        self.consumer = name or consumer_name()
        self._claim_cursor = "0-0"
        # Stream ids read and not yet settled: the only jobs whose Redis lease this run
        # renews, so an entry it lost track of goes idle and is reclaimed.
        self._in_flight: dict[str, None] = {}
        # Files handed out or running here, with the attempt they run, so a second
        # entry for one of them is not run beside it.
        self._running: dict[str, int] = {}
        self._written = Written()
        # Files whose handler the stop cut short, with that attempt: given back.
        self._interrupted: dict[str, tuple[str, str, int]] = {}
        self._slots = _Slots(settings.concurrency)
        # Bigger reads mean fewer round trips to Redis and fewer checks in Postgres.
        self._read_count = max(settings.concurrency, READ_COUNT_MIN)
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        if self._stop.is_set():  # stopped between two runs: a fresh run has nothing to drain
            return
        await self._queue.ensure_group()
        # A fresh name per run: leases a crashed run held are renewed by nobody, so
        # they expire and are claimed back instead of being kept alive forever.
        self.consumer = self._fixed_name or consumer_name()
        self._in_flight.clear()
        self._running.clear()
        self._written = Written()
        self._interrupted.clear()
        self._slots = _Slots(self._settings.concurrency)
        log.info("consumer_started", consumer=self.consumer)
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew_leases)
                    tg.start_soon(self._wake_on_stop)
                    await self._pipeline()
                    tg.cancel_scope.cancel()
        finally:
            if not self._scope.cancel_called:
                await self._release()
        log.info("consumer_stopped", consumer=self.consumer)

    def abandon(self) -> None:
        """Stops at once, as a crash would: nothing drained, nothing released."""
        self._scope.cancel()

    async def _wake_on_stop(self) -> None:
        await self._stop.wait()
        self._slots.wake()
        self._written.wake()

    async def _release(self) -> None:
        """Hands unfinished jobs back at once instead of after the visibility timeout."""
        cut_short = [list(column) for column in zip(*self._interrupted.values(), strict=True)]
        leases = partial(
            self._db.execute, "release_leases", self.consumer, *(cut_short or [[], [], []])
        )
        idle_ms = int(self._settings.visibility_timeout_s * 1000)
        held = partial(self._queue.release, self.consumer, RELEASE_MAX_JOBS, idle_ms)
        itself = partial(self._queue.prune_consumers, 0, self.consumer)
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("leases_released", leases),
            ("jobs_released", held),
            ("consumers_removed", itself),
        ]
        with anyio.CancelScope(shield=True):
            for event, step in steps:
                # Each step retried on its own, for a bounded time: whatever is not
                # released here, the sweeper repairs after the visibility timeout.
                with anyio.move_on_after(RELEASE_STEP_TIMEOUT_S) as scope:
                    done = await persist(step, "release_failed", log, consumer=self.consumer)
                    log.info(event, consumer=self.consumer, count=_count(done))
                if scope.cancelled_caught:
                    log.warning("release_gave_up", consumer=self.consumer, step=event)

    async def _pipeline(self) -> None:
        work = _Dispatch()
        out = Inbox(self._settings.flush_max_files)
        recorder = Recorder(self._settings, self._db, self._queue, self._completed, self.consumer)
        recorder.track(self._in_flight, self._running, self._written)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run, out)
            try:
                async with anyio.create_task_group() as workers:
                    for _ in range(self._settings.concurrency):
                        workers.start_soon(self._work, work, out)
                    try:
                        await self._read(work, out)
                    finally:
                        work.close()
            finally:
                out.close()

    # -- reader -------------------------------------------------------------------

    async def _read(self, work: _Dispatch, out: Out) -> None:
        next_claim = 0.0
        try:
            while not self._stop.is_set():
                found = partial(self._next_deliveries, next_claim)
                deliveries, next_claim = await self._persist(found, "job_read_failed")
                self._in_flight.update(dict.fromkeys(d.id for d in deliveries))
                waiting = await self._runnable(await self._decoded(deliveries, out), out)
                while waiting:
                    count = await self._slots.take(len(waiting), self._stop)
                    group, waiting = waiting[:count], waiting[count:]
                    await self._hand_out(group, work, out)
        except Stopping:
            return

    async def _next_deliveries(self, next_claim: float) -> tuple[list[Delivery], float]:
        """Jobs a stopped consumer left idle first, then new ones."""
        if anyio.current_time() >= next_claim:
            found = await self._claim_idle()
            # A full page means more may be waiting: claim again on the next turn.
            again = len(found) >= self._read_count
            wait = 0.0 if again else CLAIM_CHECK_INTERVAL_S
            if found:
                return found, anyio.current_time() + wait
            next_claim = anyio.current_time() + wait
        fresh = await self._queue.read(self.consumer, self._read_count, READ_BLOCK_MS)
        return fresh, next_claim

    async def _claim_idle(self) -> list[Delivery]:
        idle_ms = int(self._settings.visibility_timeout_s * 1000)
        self._claim_cursor, found = await self._queue.claim_idle(
            self.consumer, idle_ms, self._read_count, self._claim_cursor
        )
        if found:
            metrics.JOBS_REDELIVERED.inc(len(found))
            log.info("jobs_reclaimed", consumer=self.consumer, count=len(found))
        return found

    async def _decoded(
        self, deliveries: list[Delivery], out: Out
    ) -> list[tuple[Delivery, jobs.FileJob]]:
        """Parses deliveries; a malformed one fails the file it names and is dead-lettered."""
        parsed: list[tuple[Delivery, jobs.FileJob]] = []
        for delivery in deliveries:
            try:
                parsed.append((delivery, jobs.decode(delivery.fields)))
            except MalformedJob as exc:
                await out.send(undecodable(delivery, str(exc), jobs.identify(delivery.fields)))
        return parsed

    async def _runnable(self, parsed: list[tuple[Delivery, jobs.FileJob]], out: Out) -> list[Work]:
        """Checks each file in Postgres; settles the ones that must not run here."""
        fresh: list[tuple[Delivery, jobs.FileJob, str]] = []
        for delivery, job in parsed:
            member = jobs.member(job.batch_id, job.file_id)
            if member in self._running:
                self._drop(delivery)  # a second entry for a file running here
            else:
                self._running[member] = 0
                fresh.append((delivery, job, member))
        checked_at = anyio.current_time()
        runnable: list[Work] = []
        for (delivery, job, member), row in zip(fresh, await self._peek(fresh), strict=True):
            if row is not None and _may_run(row, self._settings.max_attempts):
                job = job.with_attempt(int(row["attempts"]) + 1)
                runnable.append(Work(delivery, job, member, checked_at))
                continue
            del self._running[member]
            await self._not_runnable(delivery, job, member, row, out)
        return runnable

    async def _peek(self, items: list[tuple[Delivery, jobs.FileJob, str]]) -> list[Row | None]:
        """Rows of `peek_files`; None for a job whose ids Postgres refuses."""
        if not items:
            return []
        batch_ids = [job.batch_id for _, job, _ in items]
        file_ids = [job.file_id for _, job, _ in items]
        call = partial(self._db.fetch, "peek_files", batch_ids, file_ids, self.consumer)
        try:
            return list(await self._persist(call, "job_check_failed"))
        except TerminalError:
            if len(items) == 1:
                return [None]
        # One job Postgres cannot take must not hold back the others read with it.
        return [row for item in items for row in await self._peek([item])]

    async def _not_runnable(
        self, delivery: Delivery, job: jobs.FileJob, member: str, row: Row | None, out: Out
    ) -> None:
        ids = (job.batch_id, job.file_id)
        if row is None:
            await out.send(Settle(delivery, dead=DeadLetter("malformed", UNSTORABLE_DETAIL)))
        elif not row["known"]:
            await out.send(Settle(delivery, dead=DeadLetter("unknown_batch", UNKNOWN_DETAIL)))
        elif row["status"] in TERMINAL:
            await out.send(Settle(delivery, ids, member=member))  # a duplicate: acknowledge it
        elif row["held"]:
            self._drop(delivery)  # another worker's live lease: it will settle the file
        else:
            # Every attempt started and the last one's worker died while running it.
            lost = Attempted(False, None, reasons.LAST_ATTEMPT_LOST, None, row["attempts"])
            await out.send(Settle(delivery, ids, lost, member=member))

    async def _hand_out(self, group: list[Work], work: _Dispatch, out: Out) -> None:
        """Sends files to free workers; a group that waited long is checked again first."""
        if anyio.current_time() - group[0].checked_at > RECHECK_AFTER_S:
            for item in group:
                del self._running[item.member]
            checked = await self._runnable([(i.delivery, i.job) for i in group], out)
            self._slots.release(len(group) - len(checked))
            group = checked
        for item in group:
            work.put(item)

    def _drop(self, delivery: Delivery) -> None:
        """Stops renewing a delivery: it goes idle and is looked at again later."""
        self._in_flight.pop(delivery.id, None)

    # -- workers ------------------------------------------------------------------

    async def _work(self, work: _Dispatch, out: Out) -> None:
        while (item := await work.next()) is not None:
            try:
                if not await self._run(item, out):
                    self._running.pop(item.member, None)  # else once its outcome is written
            finally:
                self._slots.release()

    async def _run(self, item: Work, out: Out) -> bool:
        """Runs the file's attempts; True once its outcome is on the way to the recorder."""
        job = item.job
        await self._started(item, job, out)
        try:
            attempted = await self._executor.execute(job, partial(self._next_attempt, item, out))
        except anyio.get_cancelled_exc_class():
            attempt = self._running[item.member]
            self._interrupted[item.member] = (job.batch_id, job.file_id, attempt)
            raise
        if attempted is None:
            return False
        ids = (job.batch_id, job.file_id)
        await out.send(Settle(item.delivery, ids, attempted, member=item.member))
        return True

    async def _started(self, item: Work, job: jobs.FileJob, out: Out) -> None:
        self._running[item.member] = job.attempt
        await out.send(Started(item.member, job.batch_id, job.file_id, job.attempt))

    async def _next_attempt(self, item: Work, out: Out, job: jobs.FileJob) -> jobs.FileJob | None:
        """The retry, announced as started; None when stopping (released as it stands)."""
        if not await self._written.until(item.member, job.attempt, self._stop):
            return None
        following = job.with_attempt(job.attempt + 1)
        await self._started(item, following, out)
        return following

    # -- leases -------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Keeps this consumer's leases fresh in Postgres and in the stream's PEL.

        Two loops, each on its own clock: a Postgres call hanging until its timeout
        must not delay the Redis renewal, or another consumer would take a job that
        is still running here (and the reverse).
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_every, "postgres", self._renew_postgres)
            tg.start_soon(self._renew_every, "redis", self._renew_redis)

    async def _renew_every(self, where: str, renew: Callable[[], Awaitable[None]]) -> None:
        while True:
            await anyio.sleep(self._settings.lease_renew_interval_s)
            try:
                await renew()
            except RetryableError as exc:
                log.warning(
                    "lease_renewal_failed", consumer=self.consumer, where=where, error=str(exc)
                )

    async def _renew_postgres(self) -> None:
        vis = self._settings.visibility_timeout_s
        await self._db.execute("renew_leases", self.consumer, vis)

    async def _renew_redis(self) -> None:
        await self._queue.renew(self.consumer, list(self._in_flight))

    async def _persist(self, call: Callable[[], Awaitable[T]], event: str) -> T:
        return await persist(call, event, log, self._stop, consumer=self.consumer)


def _may_run(row: Row, max_attempts: int) -> bool:
    if not row["known"] or row["status"] in TERMINAL or row["held"]:
        return False
    return int(row["attempts"]) < max_attempts


def _count(result: object) -> int:
    """How many rows or entries a release step touched."""
    if isinstance(result, str):  # a command tag: "UPDATE 3"
        return int(result.rsplit(" ", 1)[-1])
    return len(result) if isinstance(result, list) else int(str(result))
