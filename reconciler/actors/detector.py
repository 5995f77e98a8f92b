"""The completion detector: turns "these files finished" into "finalize this batch".

It listens to the consumer's progress events, so a batch is finalized the moment its
last file is recorded, whether or not another job ever arrives (trigger `event`).
"""

from __future__ import annotations

import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler.actors.finalizer import FinalizeRequest
from reconciler.recording import BatchProgress

log = structlog.get_logger("reconciler.detector")


class CompletionDetector:
    name = "detector"

    def __init__(
        self,
        progress: MemoryObjectReceiveStream[BatchProgress],
        requests: MemoryObjectSendStream[FinalizeRequest],
    ) -> None:
        self._progress = progress
        self._requests = requests

    async def run(self) -> None:
        async for event in self._progress:
            if event.complete:
                log.debug("batch_completion_detected", batch_id=event.batch_id)
                await self._requests.send(FinalizeRequest(event.batch_id, "event"))
