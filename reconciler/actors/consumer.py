"""The consumer: reads jobs from the stream, runs the handler, records, acknowledges.

Three stages joined by bounded channels: a reader (XREADGROUP, XAUTOCLAIM for jobs a
stopped consumer left behind) that spends an attempt in Postgres only on as many files
as there are free workers, the moment before they run; `concurrency` workers; and a
recorder that writes many outcomes per transaction, then acknowledges or dead-letters
them and tells the completion detector which batches moved. Every retried step is
idempotent, so a dependency error never costs an attempt.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler import jobs, metrics, reasons
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import MalformedJob, RetryableError, TerminalError
from reconciler.execution import Attempted, Executor, outcome_columns
from reconciler.queue import Delivery, JobQueue

log = structlog.get_logger("reconciler.consumer")
T = TypeVar("T")

READ_BLOCK_MS: Final = 500
READ_COUNT_MIN: Final = 128
CLAIM_CHECK_INTERVAL_S: Final = 5.0
RETRY_DELAY_S: Final = 0.1
RETRY_MAX_DELAY_S: Final = 5.0
RELEASE_TIMEOUT_S: Final = 3.0
RELEASE_MAX_JOBS: Final = 10_000
TERMINAL: Final = frozenset(("succeeded", "failed"))


@dataclass(frozen=True, slots=True)
class Work:
    """A file whose attempt is recorded as started: a worker runs it at once."""

    delivery: Delivery
    job: jobs.FileJob
    member: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Settle:
    """The last word on one delivery: an outcome to write, then an ack or a dead letter."""

    delivery: Delivery
    ids: tuple[str, str] | None = None
    attempted: Attempted | None = None
    dead: DeadLetter | None = None

    @property
    def member(self) -> str | None:
        return None if self.ids is None else jobs.member(*self.ids)


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Sent for each batch a flush moved: `complete` when its last file is terminal."""

    batch_id: str
    complete: bool


def consumer_name() -> str:
    """One name per process, stable for its life, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _Slots:
    """Free workers: the reader starts no more files than can run right now."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._changed = anyio.Event()

    def release(self) -> None:
        self.free += 1
        self._changed.set()

    def wake(self) -> None:
        self._changed.set()

    async def take(self, wanted: int, stop: anyio.Event) -> int:
        while self.free == 0 and not stop.is_set():
            self._changed = anyio.Event()
            await self._changed.wait()
        if stop.is_set():
            raise _Stopping
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
        progress: MemoryObjectSendStream[BatchProgress],
        stop: anyio.Event,
        name: str | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._queue = queue
        self._executor = executor
        self._progress = progress
        self._stop = stop
        self._fixed_name = name
        self.consumer = name or consumer_name()
        self._claim_cursor = "0-0"
        # Stream ids read and not yet settled: the only jobs whose Redis lease this run
        # renews, so an entry it lost track of goes idle and is reclaimed.
        self._in_flight: dict[str, None] = {}
        # Files running here, so a second entry for one of them is not run beside it.
        self._running: dict[str, str] = {}
        # Start keys whose attempt may be recorded but whose handler did not run (or was
        # interrupted by the stop): the release gives those attempts back.
        self._unrun: set[str] = set()
        self._slots = _Slots(settings.concurrency)
        # Bigger reads mean fewer round trips to Redis.
        self._read_count = max(settings.concurrency, READ_COUNT_MIN)
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        await self._queue.ensure_group()
        # A fresh name per run: leases a crashed run held are renewed by nobody, so
        # they expire and are claimed back instead of being kept alive forever.
        self.consumer = self._fixed_name or consumer_name()
        self._in_flight.clear()
        self._running.clear()
        self._unrun.clear()
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

    async def _release(self) -> None:
        """Hands unfinished jobs back at once instead of after the visibility timeout."""
        idle_ms = int(self._settings.visibility_timeout_s * 1000)
        leases = partial(self._db.execute, "release_leases", self.consumer, sorted(self._unrun))
        held = partial(self._queue.release, self.consumer, RELEASE_MAX_JOBS, idle_ms)
        itself = partial(self._queue.prune_consumers, 0, self.consumer)
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("leases_released", leases),
            ("jobs_released", held),
            ("consumers_removed", itself),
        ]
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            for event, step in steps:
                try:
                    log.info(event, consumer=self.consumer, count=_count(await step()))
                except RetryableError as exc:
                    log.warning(
                        "release_failed", consumer=self.consumer, step=event, error=str(exc)
                    )

    async def _pipeline(self) -> None:
        size = self._settings.concurrency
        work_send, work_recv = anyio.create_memory_object_stream[Work](size)
        out_send, out_recv = anyio.create_memory_object_stream[Settle](
            self._settings.flush_max_files
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._record, out_recv)
            async with work_recv, out_send:
                for _ in range(size):
                    tg.start_soon(self._work, work_recv.clone(), out_send.clone())
                async with work_send:
                    await self._read(work_send, out_send)

    # -- reader -------------------------------------------------------------------

    async def _read(
        self, work: MemoryObjectSendStream[Work], out: MemoryObjectSendStream[Settle]
    ) -> None:
        next_claim = 0.0
        try:
            while not self._stop.is_set():
                found = partial(self._next_deliveries, next_claim)
                deliveries, next_claim = await self._persist(found, "job_read_failed", True)
                self._in_flight.update(dict.fromkeys(d.id for d in deliveries))
                waiting = await self._decoded(deliveries, out)
                while waiting:
                    count = await self._slots.take(len(waiting), self._stop)
                    group, waiting = waiting[:count], waiting[count:]
                    await self._start(group, work, out)
        except _Stopping:
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
        self, deliveries: list[Delivery], out: MemoryObjectSendStream[Settle]
    ) -> list[tuple[Delivery, jobs.FileJob]]:
        """Parses deliveries; a malformed one fails the file it names and is dead-lettered."""
        parsed: list[tuple[Delivery, jobs.FileJob]] = []
        for delivery in deliveries:
            try:
                parsed.append((delivery, jobs.decode(delivery.fields)))
            except MalformedJob as exc:
                await out.send(_undecodable(delivery, str(exc)))
        return parsed

    async def _start(
        self,
        group: list[tuple[Delivery, jobs.FileJob]],
        work: MemoryObjectSendStream[Work],
        out: MemoryObjectSendStream[Settle],
    ) -> None:
        """Spends one attempt on each file of the group in one statement, then runs them."""
        fresh: list[Work] = []
        for delivery, job in group:
            member = jobs.member(job.batch_id, job.file_id)
            if member in self._running:
                self._drop(delivery)  # a second entry for a file running here
                self._slots.release()
            else:
                self._running[member] = f"{self.consumer}/{delivery.id}/0"
                fresh.append(Work(delivery, job, member))
        for item, row in zip(fresh, await self._claim(fresh), strict=True):
            if row is not None and row["started"] is not None:
                job = replace(item.job, attempt=int(row["started"]))
                await work.send(replace(item, job=job))
                continue
            self._unrun.discard(self._running.pop(item.member))
            self._slots.release()
            if row is None:
                await out.send(Settle(item.delivery, dead=DeadLetter("malformed", _UNSTORABLE)))
            else:
                await self._not_started(item, row, out)

    async def _claim(self, items: list[Work]) -> list[Row | None]:
        """Rows of `start_files`; None for a job whose ids Postgres refuses."""
        if not items:
            return []
        try:
            return list(await self._start_files(items))
        except TerminalError:
            if len(items) == 1:
                return [None]
        # One job Postgres cannot take must not hold back the others read with it.
        return [row for item in items for row in await self._claim([item])]

    async def _start_files(self, items: list[Work]) -> list[Row]:
        keys = [self._running[item.member] for item in items]
        self._unrun.update(keys)
        call = partial(
            self._db.fetch,
            "start_files",
            [item.job.batch_id for item in items],
            [item.job.file_id for item in items],
            keys,
            self.consumer,
            self._settings.visibility_timeout_s,
            self._settings.max_attempts,
        )
        return await self._persist(call, "job_start_failed", True)

    async def _not_started(self, item: Work, row: Row, out: MemoryObjectSendStream[Settle]) -> None:
        job = item.job
        ids = (job.batch_id, job.file_id)
        if not row["known"]:
            await out.send(Settle(item.delivery, dead=DeadLetter("unknown_batch", _UNKNOWN)))
        elif row["status"] in TERMINAL:
            await out.send(Settle(item.delivery, ids))  # a duplicate: acknowledge it
        elif row["held"]:
            self._drop(item.delivery)  # another worker's live lease: it will settle it
        else:
            # Every attempt started and the last one's worker died while running it.
            lost = Attempted(False, None, reasons.LAST_ATTEMPT_LOST, None, row["attempts_before"])
            await out.send(Settle(item.delivery, ids, lost))

    def _drop(self, delivery: Delivery) -> None:
        """Stops renewing a delivery: it goes idle and is looked at again later."""
        self._in_flight.pop(delivery.id, None)

    # -- workers ------------------------------------------------------------------

    async def _work(
        self, work: MemoryObjectReceiveStream[Work], out: MemoryObjectSendStream[Settle]
    ) -> None:
        async with work, out:
            async for item in work:
                try:
                    await self._run(item, out)
                finally:
                    self._running.pop(item.member, None)
                    self._slots.release()

    async def _run(self, item: Work, out: MemoryObjectSendStream[Settle]) -> None:
        self._unrun.discard(self._running[item.member])
        next_attempt = partial(self._next_attempt, item, out)
        try:
            attempted = await self._executor.execute(item.job, next_attempt)
        except anyio.get_cancelled_exc_class():
            self._unrun.add(self._running[item.member])  # the stop cut it short
            raise
        if attempted is not None:
            job = item.job
            await out.send(Settle(item.delivery, (job.batch_id, job.file_id), attempted))

    async def _next_attempt(
        self, item: Work, out: MemoryObjectSendStream[Settle], job: jobs.FileJob
    ) -> jobs.FileJob | None:
        """Records the retry as started; None when stopping or the file is no longer ours."""
        if self._stop.is_set():
            return None  # released with the attempts it spent
        key = self._running[item.member] = f"{self.consumer}/{item.delivery.id}/{job.attempt + 1}"
        try:
            [row] = await self._start_files([replace(item, job=job)])
        except _Stopping:
            return None  # the key stays unrun: the release gives its attempt back
        except TerminalError:
            self._unrun.discard(key)
            return None
        if row["started"] is not None:
            self._unrun.discard(key)
            return replace(job, attempt=int(row["started"]))
        self._unrun.discard(key)
        if row["status"] in TERMINAL:
            await out.send(Settle(item.delivery, (job.batch_id, job.file_id)))
        else:
            self._drop(item.delivery)
        return None

    # -- recorder -----------------------------------------------------------------

    async def _record(self, settles: MemoryObjectReceiveStream[Settle]) -> None:
        async with settles:
            while group := await self._collect(settles):
                await self._flush(group)

    async def _collect(self, settles: MemoryObjectReceiveStream[Settle]) -> list[Settle]:
        """Waits for one settle, then gathers more for up to the flush interval."""
        try:
            group = [await settles.receive()]
        except anyio.EndOfStream:
            return []
        deadline = anyio.current_time() + self._settings.flush_interval_s
        while len(group) < self._settings.flush_max_files:
            try:
                group.append(settles.receive_nowait())
                continue
            except anyio.WouldBlock:
                pass
            except anyio.EndOfStream:
                break
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            with anyio.move_on_after(remaining):
                try:
                    group.append(await settles.receive())
                except anyio.EndOfStream:
                    break
        return group

    async def _flush(self, group: list[Settle]) -> None:
        outcomes = [s for s in group if s.attempted is not None and s.ids is not None]
        rows = await self._write(outcomes) if outcomes else []
        # Committed: the detector may finalize while the acknowledgement is in flight.
        for row in rows:
            await self._progress.send(BatchProgress(row["batch_id"], bool(row["complete"])))
        acks = [s for s in group if s.dead is None]
        members = [m for s in acks if (m := s.member) is not None]
        await self._persist(
            partial(self._acked, [s.delivery.id for s in acks], members), "ack_failed"
        )
        for settle in group:
            if settle.dead is not None:
                await self._persist(partial(self._dead_letter, settle), "dead_letter_failed")

    async def _write(self, outcomes: list[Settle]) -> list[Row]:
        try:
            return await self._retrying("record_outcomes", *_columns(outcomes))
        except TerminalError:
            return await self._write_one_by_one(outcomes)

    async def _write_one_by_one(self, outcomes: list[Settle]) -> list[Row]:
        """An outcome Postgres refuses fails its file with the reason; the rest stand."""
        rows: list[Row] = []
        for settle in outcomes:
            try:
                rows += await self._retrying("record_outcomes", *_columns([settle]))
            except TerminalError as exc:
                assert settle.attempted is not None and settle.ids is not None
                log.warning("outcome_unstorable", batch_id=settle.ids[0], error=str(exc))
                error = f"{reasons.UNSTORABLE}{exc}"[:2000]
                failed = Attempted(False, None, error, 0.0, settle.attempted.attempts)
                rows += await self._retrying(
                    "record_outcomes", *_columns([replace(settle, attempted=failed)])
                )
        return rows

    async def _retrying(self, query: str, *args: object) -> list[Row]:
        # Outcomes live only in memory until written: retry rather than drop them.
        return await self._persist(partial(self._db.fetch, query, *args), "outcome_write_failed")

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

    async def _persist(
        self, call: Callable[[], Awaitable[T]], event: str, stoppable: bool = False
    ) -> T:
        """Retries through dependency blinks with backoff; stoppable calls end on stop."""
        delay = RETRY_DELAY_S
        while True:
            try:
                return await call()
            except RetryableError as exc:
                log.warning(event, consumer=self.consumer, error=str(exc), retry_in_s=delay)
            if stoppable and self._stop.is_set():
                raise _Stopping
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    # -- leases -------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Keeps this consumer's leases fresh in Postgres and in the stream's PEL.

        The two renewals are independent: a Postgres blink must not let the Redis
        lease lapse, or another consumer would take a job that is still running.
        """
        while True:
            await anyio.sleep(self._settings.lease_renew_interval_s)
            vis = self._settings.visibility_timeout_s
            await self._renew(
                "postgres", partial(self._db.execute, "renew_leases", self.consumer, vis)
            )
            await self._renew(
                "redis", partial(self._queue.renew, self.consumer, list(self._in_flight))
            )

    async def _renew(self, where: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except RetryableError as exc:
            log.warning("lease_renewal_failed", consumer=self.consumer, where=where, error=str(exc))


class _Stopping(Exception):
    """The service is stopping: a stoppable retry gives up."""


_UNKNOWN: Final = "no such batch or file"
_UNSTORABLE: Final = "its ids cannot be stored in Postgres"


def _undecodable(delivery: Delivery, detail: str) -> Settle:
    """A malformed job: the file it names (if any) fails with the reason."""
    ids = jobs.identify(delivery.fields)
    failed = Attempted(False, None, f"{reasons.UNDECODABLE}{detail}"[:2000], None, 0)
    return Settle(delivery, ids, failed if ids else None, DeadLetter("malformed", detail))


def _count(result: object) -> int:
    """How many rows or entries a release step touched."""
    if isinstance(result, str):  # a command tag: "UPDATE 3"
        return int(result.rsplit(" ", 1)[-1])
    return len(result) if isinstance(result, list) else int(str(result))


def _columns(group: list[Settle]) -> tuple[list[Any], ...]:
    rows = [(s.ids[0], s.ids[1], s.attempted) for s in group if s.ids and s.attempted]
    return outcome_columns(rows)
