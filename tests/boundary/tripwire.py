"""A faulty proxy that resets every connection when a client sends a marked command.

The marker is a string only one command carries (a job's batch id, say): the reset
lands at that exact step of the service, `times` times in a row, then traffic flows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.chaos.faulty_proxy import CHUNK_BYTES, FaultyProxy


class TripwireProxy(FaultyProxy):
    """Forwards like FaultyProxy; a client chunk holding `marker` resets every link."""

    def __init__(self, upstream_url: str, marker: bytes, times: int) -> None:
        super().__init__(upstream_url)
        self._marker = marker
        self._times = times
        self.trips = 0

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        if not any(link.upstream is sink for link in self._links):
            await super()._pump(source, sink)  # upstream to client: untouched
            return
        while chunk := await source.read(CHUNK_BYTES):
            if self._marker in chunk and self.trips < self._times:
                self.trips += 1
                self.cut()  # the marked command never reaches the server
                return
            sink.write(chunk)
            await sink.drain()


@asynccontextmanager
async def tripwire_proxy(
    upstream_url: str, marker: bytes, times: int
) -> AsyncIterator[TripwireProxy]:
    proxy = TripwireProxy(upstream_url, marker, times)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
