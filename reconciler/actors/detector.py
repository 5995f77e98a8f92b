"""The completion detector: turns "these files finished" into "finalize these batches".

It listens to the consumer's completion reports, so a batch is finalized the moment its
last file is recorded, whether or not another job ever arrives (trigger `event`). The
batches one flush completed are named together and finalized in one statement.
"""

from __future__ import annotations

import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from reconciler.actors.finalizer import FinalizeRequest
from reconciler.recording import Completed

log = structlog.get_logger("reconciler.detector")


class CompletionDetector:
    name = "detector"

    def __init__(
        self,
        completed: MemoryObjectReceiveStream[Completed],
        requests: MemoryObjectSendStream[FinalizeRequest],
    ) -> None:
        self._completed = completed
        self._requests = requests

    async def run(self) -> None:
        async for event in self._completed:
            log.debug("batch_completion_detected", batch_ids=list(event.batch_ids))
            await self._requests.send(FinalizeRequest(event.batch_ids))
