"""The consumer: reads jobs from the stream, runs the handler, records, acknowledges.

Three stages joined by bounded channels: a reader (XREADGROUP, XAUTOCLAIM for jobs a
stopped consumer left behind, claims in Postgres), `concurrency` workers, and a
recorder that writes many outcomes per transaction, then XACKs them in one call and
tells the completion detector which batches moved.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler import jobs, metrics
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
UNSTORABLE_REASON: Final = "the handler's outcome could not be stored"
EXHAUSTED_REASON: Final = "gave up: attempts spent and the last worker stopped mid-file"


@dataclass(frozen=True, slots=True)
class Work:
    delivery_id: str
    job: jobs.FileJob
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery_id: str
    batch_id: str
    file_id: str
    attempted: Attempted


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Sent for each batch a flush moved: `complete` when its last file is terminal."""

    batch_id: str
    complete: bool


def consumer_name() -> str:
    """One name per process, stable for its life, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


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
        # Stream ids read and not yet acknowledged: the only jobs whose Redis lease
        # this run renews, so an entry it lost track of goes idle and is reclaimed.
        self._in_flight: dict[str, None] = {}
        # Bigger reads mean fewer round trips to Redis and fewer claim statements.
        self._read_count = max(settings.concurrency, READ_COUNT_MIN)
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        await self._queue.ensure_group()
        # A fresh name per run: leases a crashed run held are renewed by nobody, so
        # they expire and are claimed back instead of being kept alive forever.
        self.consumer = self._fixed_name or consumer_name()
        self._in_flight.clear()
        log.info("consumer_started", consumer=self.consumer)
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew_leases)
                    await self._pipeline()
                    tg.cancel_scope.cancel()
        finally:
            if not self._scope.cancel_called:
                await self._release()
        log.info("consumer_stopped", consumer=self.consumer)

    def abandon(self) -> None:
        """Stops at once, as a crash would: nothing drained, nothing released."""
        self._scope.cancel()

    async def _release(self) -> None:
        """Hands unfinished jobs back at once instead of after the visibility timeout."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await self._db.execute("release_leases", self.consumer)
                count = await self._queue.release(
                    self.consumer, RELEASE_MAX_JOBS, int(self._settings.visibility_timeout_s * 1000)
                )
            except RetryableError as exc:
                log.warning("release_failed", consumer=self.consumer, error=str(exc))
                return
            log.info("jobs_released", consumer=self.consumer, count=count)

    async def _pipeline(self) -> None:
        size = self._settings.concurrency
        work_send, work_recv = anyio.create_memory_object_stream[Work](size)
        out_send, out_recv = anyio.create_memory_object_stream[Outcome](
            self._settings.flush_max_files
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._record, out_recv)
            async with work_recv, out_send:
                for _ in range(size):
                    tg.start_soon(self._work, work_recv.clone(), out_send.clone())
            async with work_send:
                await self._read(work_send)

    # -- reader -------------------------------------------------------------------

    async def _read(self, work: MemoryObjectSendStream[Work]) -> None:
        next_claim = 0.0
        try:
            while not self._stop.is_set():
                found = partial(self._next_deliveries, next_claim)
                deliveries, next_claim = await self._persist(found, "job_read_failed", True)
                self._in_flight.update(dict.fromkeys(d.id for d in deliveries))
                # These are ours in the stream's PEL now: keep trying rather than drop them.
                claim = partial(self._admit, deliveries)
                for item in await self._persist(claim, "job_claim_failed", True):
                    await work.send(item)
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

    async def _admit(self, deliveries: list[Delivery]) -> list[Work]:
        """Parses and claims deliveries; dead-letters the bad ones, acks duplicates."""
        parsed: list[tuple[Delivery, jobs.FileJob]] = []
        for delivery in deliveries:
            try:
                parsed.append((delivery, jobs.decode(delivery.fields)))
            except MalformedJob as exc:
                await self._dead_letter(delivery, "malformed", str(exc))
        if not parsed:
            return []
        try:
            return await self._sort(parsed, await self._claim(parsed))
        except TerminalError:
            return await self._admit_one_by_one(parsed)

    async def _claim(self, parsed: list[tuple[Delivery, jobs.FileJob]]) -> list[Row]:
        return await self._db.fetch(
            "start_files",
            [job.batch_id for _, job in parsed],
            [job.file_id for _, job in parsed],
            self.consumer,
            self._settings.visibility_timeout_s,
        )

    async def _admit_one_by_one(self, parsed: list[tuple[Delivery, jobs.FileJob]]) -> list[Work]:
        """One job Postgres cannot take must not hold back the others read with it."""
        admitted: list[Work] = []
        for pair in parsed:
            try:
                admitted += await self._sort([pair], await self._claim([pair]))
            except TerminalError as exc:
                await self._dead_letter(pair[0], "malformed", f"cannot be stored: {exc}", pair[1])
        return admitted

    async def _sort(
        self, parsed: list[tuple[Delivery, jobs.FileJob]], rows: list[Row]
    ) -> list[Work]:
        admitted: list[Work] = []
        duplicates: list[tuple[str, str]] = []
        for (delivery, job), row in zip(parsed, rows, strict=True):
            if not row["known"]:
                await self._dead_letter(delivery, "unknown_batch", "no such batch or file", job)
            elif row["attempts"] is None:
                duplicates.append((delivery.id, jobs.member(job.batch_id, job.file_id)))
            else:
                attempts = int(row["attempts"])
                exhausted = attempts > self._settings.max_attempts
                job = jobs.FileJob(job.batch_id, job.file_id, job.uri, job.payload, attempts)
                admitted.append(Work(delivery.id, job, exhausted))
        await self._acked([d for d, _ in duplicates], [m for _, m in duplicates])
        return admitted

    async def _acked(self, ids: list[str], members: list[str]) -> None:
        await self._queue.ack(ids, members)
        for job_id in ids:
            self._in_flight.pop(job_id, None)

    async def _dead_letter(
        self, delivery: Delivery, reason: str, detail: str, job: jobs.FileJob | None = None
    ) -> None:
        await self._queue.dead_letter(delivery, detail)
        self._in_flight.pop(delivery.id, None)
        metrics.JOBS_DEAD_LETTERED.labels(reason).inc()
        ids = {"batch_id": job.batch_id, "file_id": job.file_id} if job else {}
        log.warning("job_dead_lettered", job_id=delivery.id, reason=reason, detail=detail, **ids)

    # -- workers ------------------------------------------------------------------

    async def _work(
        self, work: MemoryObjectReceiveStream[Work], outcomes: MemoryObjectSendStream[Outcome]
    ) -> None:
        async with work, outcomes:
            async for item in work:
                if self._stop.is_set():
                    continue  # draining: not started, so left for another consumer
                attempted = await self._attempt(item)
                job = item.job
                await outcomes.send(Outcome(item.delivery_id, job.batch_id, job.file_id, attempted))

    async def _attempt(self, item: Work) -> Attempted:
        if item.exhausted:
            metrics.FILES_PROCESSED.labels("failed").inc()  # rare: no cached child needed
            return Attempted(False, None, EXHAUSTED_REASON, 0.0, item.job.attempt)
        return await self._executor.execute(item.job)

    # -- recorder -----------------------------------------------------------------

    async def _record(self, outcomes: MemoryObjectReceiveStream[Outcome]) -> None:
        async with outcomes:
            while group := await self._collect(outcomes):
                await self._flush(group)

    async def _collect(self, outcomes: MemoryObjectReceiveStream[Outcome]) -> list[Outcome]:
        """Waits for one outcome, then gathers more for up to the flush interval."""
        try:
            group = [await outcomes.receive()]
        except anyio.EndOfStream:
            return []
        deadline = anyio.current_time() + self._settings.flush_interval_s
        while len(group) < self._settings.flush_max_files:
            try:
                group.append(outcomes.receive_nowait())
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
                    group.append(await outcomes.receive())
                except anyio.EndOfStream:
                    break
        return group

    async def _flush(self, group: list[Outcome]) -> None:
        try:
            rows = await self._retrying("record_outcomes", *_columns(group))
        except TerminalError:
            rows = await self._flush_one_by_one(group)
        # Committed: the detector may finalize while the acknowledgement is in flight.
        for row in rows:
            await self._progress.send(BatchProgress(row["batch_id"], bool(row["complete"])))
        await self._ack(
            [o.delivery_id for o in group], [jobs.member(o.batch_id, o.file_id) for o in group]
        )

    async def _flush_one_by_one(self, group: list[Outcome]) -> list[Row]:
        """An outcome Postgres refuses fails its file with the reason; the rest stand."""
        rows: list[Row] = []
        for outcome in group:
            try:
                rows += await self._retrying("record_outcomes", *_columns([outcome]))
            except TerminalError as exc:
                log.warning("outcome_unstorable", batch_id=outcome.batch_id, error=str(exc))
                failed = Attempted(False, None, f"{UNSTORABLE_REASON}: {exc}"[:2000], 0.0,
                                   outcome.attempted.attempts)  # fmt: skip
                stand_in = Outcome(outcome.delivery_id, outcome.batch_id, outcome.file_id, failed)
                rows += await self._retrying("record_outcomes", *_columns([stand_in]))
        return rows

    async def _retrying(self, query: str, *args: object) -> list[Row]:
        # Outcomes live only in memory until written: retry rather than drop them.
        return await self._persist(partial(self._db.fetch, query, *args), "outcome_write_failed")

    async def _ack(self, ids: list[str], members: list[str]) -> None:
        await self._persist(partial(self._acked, ids, members), "ack_failed")

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
        """Keeps this consumer's leases fresh in Postgres and in the stream's PEL."""
        while True:
            await anyio.sleep(self._settings.lease_renew_interval_s)
            try:
                await self._db.execute(
                    "renew_leases", self.consumer, self._settings.visibility_timeout_s
                )
                await self._queue.renew(self.consumer, list(self._in_flight))
            except RetryableError as exc:
                log.warning("lease_renewal_failed", consumer=self.consumer, error=str(exc))


class _Stopping(Exception):
    """The service is stopping: a stoppable retry gives up."""


def _columns(group: list[Outcome]) -> tuple[list[Any], ...]:
    return outcome_columns([(o.batch_id, o.file_id, o.attempted) for o in group])
