"""A TCP proxy in the test process that injects network faults on a fixed port.

Modes: `heal()` forwards; `delay(s)` adds one-way latency to every chunk; `blackhole()`
holds every byte (open connections stall, new ones are accepted and never answered)
until healed, as a partition would; `reset()` sends RST on every open connection and on
each new one until healed. `retarget(url)` points new connections at another upstream,
so a server that comes back on a new port keeps one URL for the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit, urlunsplit

LISTEN_HOST: Final = "127.0.0.1"
CHUNK_BYTES: Final = 65536
QUEUE_CHUNKS: Final = 64
CONNECT_TIMEOUT_S: Final = 5.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
Chunks = asyncio.Queue[tuple[float, bytes]]


@dataclass(eq=False)
class _Link:
    """One proxied connection: both writers and the tasks pumping between them."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort_with_rst(writer)
        for task in self.tasks:
            task.cancel()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class FaultyProxy:
    """Forwards 127.0.0.1:port to an upstream, with faults switched on and off."""

    def __init__(self, upstream_url: str) -> None:
        self._url = upstream_url
        self._upstream = _address(upstream_url)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._delay_s = 0.0
        self._resetting = False
        self._serving: set[asyncio.Task[None]] = set()
        self.port = 0
        self.accepted = 0

    @property
    def url(self) -> str:
        """The upstream URL with the proxy's host and port instead."""
        parts = urlsplit(self._url)
        auth = parts.netloc.rpartition("@")[0]
        host = f"{LISTEN_HOST}:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{auth}@{host}" if auth else host))

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, LISTEN_HOST, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._reset_all()
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    def retarget(self, upstream_url: str) -> None:
        """New connections go to this upstream (same credentials, new host and port)."""
        self._upstream = _address(upstream_url)

    def heal(self) -> None:
        self._delay_s, self._resetting = 0.0, False
        self._open.set()

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def blackhole(self) -> None:
        self._open.clear()

    def reset(self) -> None:
        """RST on every open connection, and on every new one until `heal()`."""
        self._resetting = True
        self._reset_all()

    def cut(self) -> None:
        """One RST on every open connection; new ones are served normally."""
        self._reset_all()

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()
        self._links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._resetting:
            _abort_with_rst(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        link = _Link(writer)
        self._serving.add(task)
        self._links.add(link)
        try:
            await self._connect(link, reader)
        except (OSError, TimeoutError, asyncio.CancelledError):
            link.reset()
        finally:
            self._links.discard(link)
            self._serving.discard(task)

    async def _connect(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        await self._open.wait()  # a blackhole accepts and then never answers
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(*self._upstream), CONNECT_TIMEOUT_S
        )
        link.upstream = up_writer
        link.tasks = [
            asyncio.create_task(self._pump(client_reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, link.client)),
        ]
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in link.tasks:
            task.cancel()
        for closing in (up_writer, link.client):
            closing.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copies one direction; chunks wait out the delay, and the blackhole, in a queue."""
        queue: Chunks = asyncio.Queue(QUEUE_CHUNKS)
        both = [
            asyncio.create_task(self._receive(source, queue)),
            asyncio.create_task(self._send(queue, sink)),
        ]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in both:
                task.cancel()
            await asyncio.gather(*both, return_exceptions=True)

    async def _receive(self, source: asyncio.StreamReader, queue: Chunks) -> None:
        while chunk := await source.read(CHUNK_BYTES):
            await queue.put((time.monotonic() + self._delay_s, chunk))
        await queue.put((0.0, b""))

    async def _send(self, queue: Chunks, sink: asyncio.StreamWriter) -> None:
        while True:
            due, chunk = await queue.get()
            await self._open.wait()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                return
            sink.write(chunk)
            await sink.drain()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or LISTEN_HOST, parts.port or 0


@asynccontextmanager
async def faulty_proxy(upstream_url: str) -> AsyncIterator[FaultyProxy]:
    """A listening proxy to `upstream_url` for the duration of the block."""
    proxy = FaultyProxy(upstream_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
