"""The finalizer actor: finalizes the batches the completion detector names.

It runs `finalization.finalize` a few batches at a time and retries while another
replica holds a batch's lock; whatever it gives up on, the sweeper finds later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from reconciler.database import Database
from reconciler.errors import RetryableError
from reconciler.finalization import Outcome, finalize

log = structlog.get_logger("reconciler.finalizer")

FINALIZE_CONCURRENCY: Final = 8
BUSY_RETRY_DELAY_S: Final = 0.05
BUSY_RETRY_MAX_DELAY_S: Final = 2.0
BUSY_RETRY_LIMIT: Final = 20


@dataclass(frozen=True, slots=True)
class FinalizeRequest:
    batch_id: str
    trigger: str = "event"


class Finalizer:
    """Finalizes the batches it is told about, a few at a time, retrying busy locks."""

    name = "finalizer"

    def __init__(
        self,
        db: Database,
        requests: MemoryObjectReceiveStream[FinalizeRequest],
        concurrency: int = FINALIZE_CONCURRENCY,
    ) -> None:
        self._db = db
        self._requests = requests
        self._slots = anyio.Semaphore(concurrency)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            async for request in self._requests:
                await self._slots.acquire()
                tg.start_soon(self._settle, request)

    async def _settle(self, request: FinalizeRequest) -> None:
        try:
            await self._settle_with_retries(request)
        finally:
            self._slots.release()

    async def _settle_with_retries(self, request: FinalizeRequest) -> None:
        delay = BUSY_RETRY_DELAY_S
        for _ in range(BUSY_RETRY_LIMIT):
            try:
                result = await finalize(self._db, request.batch_id, request.trigger)
            except RetryableError as exc:
                log.warning(
                    "finalization_failed",
                    batch_id=request.batch_id, trigger=request.trigger, error=str(exc),
                )  # fmt: skip
            else:
                if result.outcome is not Outcome.BUSY:
                    return
            await anyio.sleep(delay)
            delay = min(delay * 2, BUSY_RETRY_MAX_DELAY_S)
        # The sweeper finds it on its next pass: deferred, not dropped.
        log.warning("finalization_deferred", batch_id=request.batch_id, trigger=request.trigger)
