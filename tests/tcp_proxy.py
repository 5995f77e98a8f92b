"""A TCP proxy in the test process, to make a dependency vanish and come back.

Put it in front of Postgres or Redis and point the service at `proxy.url`: `stop()`
refuses new connections and cuts the open ones (the server is gone), `cut()` only
cuts the open ones (a network blip), `start()` listens again on the same port.
Built on asyncio streams (the suite's backend), which own every accepted socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

LISTEN_HOST = "127.0.0.1"
CHUNK_BYTES = 65536


class TcpProxy:
    """Forwards every connection to `upstream_url`'s host and port."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream_url = upstream_url
        self._upstream = (parts.hostname or LISTEN_HOST, parts.port or 0)
        self._port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The upstream URL with the proxy's host and port instead."""
        parts = urlsplit(self._upstream_url)
        auth, _, _ = parts.netloc.rpartition("@")
        here = f"{LISTEN_HOST}:{self._port}"
        return urlunsplit(parts._replace(netloc=f"{auth}@{here}" if auth else here))

    @property
    def connections(self) -> int:
        """Open client-side connections."""
        return len(self._tasks)

    async def start(self) -> None:
        """Listens (on the same port as before, if it listened before)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._forward, LISTEN_HOST, self._port)
            self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops listening and cuts every open connection: the server is gone."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            self.cut()
            await server.wait_closed()
        self.cut()

    def cut(self) -> None:
        """Resets every open connection, as a network failure would."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        """Stops, then waits until every forwarding task has ended."""
        await self.stop()
        while self._tasks:
            self.cut()
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if self._server is not None:  # accepted while stopping: refuse it
                await self._pipe(reader, writer)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            return
        self._writers.add(up_writer)
        try:
            pair = (writer, up_writer)
            await asyncio.gather(_pump(reader, up_writer, pair), _pump(up_reader, writer, pair))
        finally:
            up_writer.transport.abort()
            self._writers.discard(up_writer)


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
) -> None:
    try:
        while chunk := await source.read(CHUNK_BYTES):
            sink.write(chunk)
            await sink.drain()
    except OSError:
        pass
    for writer in both:  # one side ended: end the other too
        writer.transport.abort()


@asynccontextmanager
async def tcp_proxy(upstream_url: str) -> AsyncIterator[TcpProxy]:
    """A listening proxy to `upstream_url` for the duration of the block."""
    proxy = TcpProxy(upstream_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
