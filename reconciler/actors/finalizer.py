"""The finalizer actor: finalizes the batches the completion detector names.

It runs `finalization.finalize_each` a few groups at a time: the batches one flush
completed go together, with any that queued while every slot was busy, in one
statement. It retries the batches whose lock another replica holds; whatever it gives
up on, the sweeper finds later. When the replica's delivery actor has the slots free,
the statement hands it the webhook deliveries of the batches it finalizes (`Handoff`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from reconciler.database import Database
from reconciler.errors import RetryableError, TerminalError
from reconciler.finalization import FinalizeResult, Handing, Outcome, Trigger, finalize_each

log = structlog.get_logger("reconciler.finalizer")

FINALIZE_CONCURRENCY: Final = 8
# Batches per statement: a group waits for its slowest batch, so keep it small.
FINALIZE_GROUP_MAX: Final = 16
BUSY_RETRY_DELAY_S: Final = 0.05
BUSY_RETRY_MAX_DELAY_S: Final = 2.0
BUSY_RETRY_LIMIT: Final = 20


@dataclass(frozen=True, slots=True)
class FinalizeRequest:
    """Batches whose last file was just recorded (trigger `event`)."""

    batch_ids: tuple[str, ...]


class Handoff(Protocol):
    """Where finalized batches' deliveries go without a claim: the delivery actor."""

    def handing(self, batches: int) -> Handing | None: ...

    def take(self, handing: Handing, batches: int, results: Sequence[FinalizeResult]) -> None: ...

    async def release_unanswered(self, batch_ids: Sequence[str]) -> None: ...


class Finalizer:
    """Finalizes the batches it is told about, a few groups at a time, retrying busy locks."""

    name = "finalizer"

    def __init__(
        self,
        db: Database,
        requests: MemoryObjectReceiveStream[FinalizeRequest],
        concurrency: int = FINALIZE_CONCURRENCY,
        handoff: Handoff | None = None,
    ) -> None:
        self._db = db
        self._requests = requests
        self._slots = anyio.Semaphore(concurrency)
        self._handoff = handoff

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            async for request in self._requests:
                await self._slots.acquire()
                tg.start_soon(self._settle, self._joined(request))

    def _joined(self, first: FinalizeRequest) -> list[str]:
        """The request's batches, with those of requests already waiting, up to a group."""
        batch_ids = dict.fromkeys(first.batch_ids)
        while len(batch_ids) < FINALIZE_GROUP_MAX:
            try:
                batch_ids.update(dict.fromkeys(self._requests.receive_nowait().batch_ids))
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return list(batch_ids)

    async def _settle(self, batch_ids: list[str]) -> None:
        try:
            await self._settle_with_retries(batch_ids)
        finally:
            self._slots.release()

    async def _settle_with_retries(self, batch_ids: list[str]) -> None:
        delay = BUSY_RETRY_DELAY_S
        waiting = batch_ids
        unanswered = False  # a call lost its reply: it may have committed, and handed over
        for _ in range(BUSY_RETRY_LIMIT):
            try:
                results = await self._finalize(waiting)
            except RetryableError as exc:
                unanswered = True
                log.warning(
                    "finalization_failed",
                    batch_ids=waiting, trigger=Trigger.EVENT.value, error=str(exc),
                )  # fmt: skip
            except TerminalError:
                if len(waiting) == 1:
                    raise
                await self._settle_alone(waiting)
                return
            else:
                if unanswered:
                    await self._release_unanswered(results)
                    unanswered = False
                waiting = [r.batch_id for r in results if r.outcome is Outcome.BUSY]
                if not waiting:
                    return
            await anyio.sleep(delay)
            delay = min(delay * 2, BUSY_RETRY_MAX_DELAY_S)
        # The sweeper finds them on its next pass: deferred, not dropped.
        for batch_id in waiting:
            log.warning("finalization_deferred", batch_id=batch_id, trigger=Trigger.EVENT.value)

    async def _finalize(self, batch_ids: list[str]) -> list[FinalizeResult]:
        handoff = self._handoff
        handing = handoff.handing(len(batch_ids)) if handoff is not None else None
        if handoff is None or handing is None:
            return await finalize_each(self._db, batch_ids, Trigger.EVENT)
        results: list[FinalizeResult] = []
        try:
            results = await finalize_each(self._db, batch_ids, Trigger.EVENT, handing)
            return results
        finally:
            handoff.take(handing, len(batch_ids), results)

    async def _release_unanswered(self, results: Sequence[FinalizeResult]) -> None:
        """Batches found finalized after a call lost its reply: that call may be the one
        that finalized them and handed their deliveries to nobody (if it handed nothing,
        the release finds nothing)."""
        found = [r.batch_id for r in results if r.outcome is Outcome.ALREADY_FINALIZED]
        if self._handoff is not None and found:
            await self._handoff.release_unanswered(found)

    async def _settle_alone(self, batch_ids: list[str]) -> None:
        """Each batch on its own: one Postgres refuses must not hold back the others.
        The first refusal is raised once every other batch has had its turn."""
        refused: TerminalError | None = None
        for batch_id in batch_ids:
            try:
                await self._settle_with_retries([batch_id])
            except TerminalError as exc:
                refused = refused or exc
        if refused is not None:
            raise refused
