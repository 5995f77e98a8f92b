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
from dataclasses import dataclass
from typing import Final

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler import jobs, metrics
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import MalformedJob, RetryableError
from reconciler.execution import Attempted, Executor
from reconciler.queue import Delivery, JobQueue

log = structlog.get_logger("reconciler.consumer")

READ_BLOCK_MS: Final = 500
READ_COUNT_MIN: Final = 128
CLAIM_CHECK_INTERVAL_S: Final = 5.0
WRITE_RETRY_DELAY_S: Final = 0.1
WRITE_RETRY_MAX_DELAY_S: Final = 5.0
RELEASE_TIMEOUT_S: Final = 3.0
RELEASE_MAX_JOBS: Final = 10_000
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
        self.consumer = name or consumer_name()
        self._claim_cursor = "0-0"
        # Bigger reads mean fewer round trips to Redis and fewer claim statements.
        self._read_count = max(settings.concurrency, READ_COUNT_MIN)
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        await self._queue.ensure_group()
        log.info("consumer_started", consumer=self.consumer)
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew_leases)
                    await self._pipeline()
                    tg.cancel_scope.cancel()
        finally:
            if self._stop.is_set() and not self._scope.cancel_called:
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
        while not self._stop.is_set():
            deliveries: list[Delivery] = []
            if anyio.current_time() >= next_claim:
                deliveries = await self._claim_idle()
                next_claim = anyio.current_time() + CLAIM_CHECK_INTERVAL_S
            if not deliveries:
                deliveries = await self._queue.read(self.consumer, self._read_count, READ_BLOCK_MS)
            for item in await self._admit(deliveries):
                await work.send(item)

    async def _claim_idle(self) -> list[Delivery]:
        idle_ms = int(self._settings.visibility_timeout_s * 1000)
        self._claim_cursor, found = await self._queue.claim_idle(
            self.consumer, idle_ms, self._settings.concurrency, self._claim_cursor
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
        rows = await self._db.fetch(
            "start_files",
            [job.batch_id for _, job in parsed],
            [job.file_id for _, job in parsed],
            self.consumer,
            self._settings.visibility_timeout_s,
        )
        return await self._sort(parsed, rows)

    async def _sort(
        self, parsed: list[tuple[Delivery, jobs.FileJob]], rows: list[Row]
    ) -> list[Work]:
        admitted: list[Work] = []
        duplicates: list[tuple[str, str]] = []
        for (delivery, job), row in zip(parsed, rows, strict=True):
            if not row["known"]:
                await self._dead_letter(delivery, "unknown_batch", "no such batch or file")
            elif row["attempts"] is None:
                duplicates.append((delivery.id, jobs.member(job.batch_id, job.file_id)))
            else:
                attempts = int(row["attempts"])
                exhausted = attempts > self._settings.max_attempts
                job = jobs.FileJob(job.batch_id, job.file_id, job.uri, job.payload, attempts)
                admitted.append(Work(delivery.id, job, exhausted))
        await self._queue.ack([d for d, _ in duplicates], [m for _, m in duplicates])
        return admitted

    async def _dead_letter(self, delivery: Delivery, kind: str, reason: str) -> None:
        await self._queue.dead_letter(delivery, reason)
        metrics.JOBS_DEAD_LETTERED.labels(kind).inc()
        log.warning("job_dead_lettered", job_id=delivery.id, kind=kind, reason=reason)

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
        rows = await self._retrying("record_outcomes", *_outcome_columns(group))
        # Committed: the detector may finalize while the acknowledgement is in flight.
        for row in rows:
            await self._progress.send(BatchProgress(row["batch_id"], bool(row["complete"])))
        await self._ack(
            [o.delivery_id for o in group], [jobs.member(o.batch_id, o.file_id) for o in group]
        )

    async def _retrying(self, query: str, *args: object) -> list[Row]:
        # Outcomes live only in memory until written: retry rather than drop them.
        delay = WRITE_RETRY_DELAY_S
        while True:
            try:
                return await self._db.fetch(query, *args)
            except RetryableError as exc:
                log.warning("outcome_write_failed", error=str(exc), retry_in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_DELAY_S)

    async def _ack(self, ids: list[str], members: list[str]) -> None:
        delay = WRITE_RETRY_DELAY_S
        while True:
            try:
                await self._queue.ack(ids, members)
                return
            except RetryableError as exc:
                log.warning("ack_failed", error=str(exc), retry_in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_DELAY_S)

    # -- leases -------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Keeps this consumer's leases fresh in Postgres and in the stream's PEL."""
        while True:
            await anyio.sleep(self._settings.lease_renew_interval_s)
            try:
                await self._db.execute(
                    "renew_leases", self.consumer, self._settings.visibility_timeout_s
                )
                await self._queue.renew(self.consumer, 4 * self._settings.concurrency + 64)
            except RetryableError as exc:
                log.warning("lease_renewal_failed", consumer=self.consumer, error=str(exc))


def _outcome_columns(group: list[Outcome]) -> tuple[list[object], ...]:
    return (
        [o.batch_id for o in group],
        [o.file_id for o in group],
        [o.attempted.ok for o in group],
        [o.attempted.result for o in group],
        [o.attempted.error for o in group],
        [o.attempted.duration_s for o in group],
        [o.attempted.attempts for o in group],
    )
