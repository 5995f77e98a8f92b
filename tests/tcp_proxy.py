"""A TCP proxy in the test process, to make a dependency vanish and come back.

Put it in front of Postgres or Redis and point the service at `proxy.url`: `stop()`
refuses new connections and cuts the open ones (the server is gone), `cut()` only
cuts the open ones (a network blip), `start()` listens again on the same port.

The proxy accepts on its own listening socket rather than through `asyncio.Server`:
on Python 3.11 a connection accepted in the loop tick in which the server is closed
fails `Server._attach()` while its transport is built, asyncio swallows the error and
nobody closes the accepted socket (an "unclosed transport" ResourceWarning later, and
a client left waiting on a half-open connection). Here each accepted socket gets its
forwarding task in the same callback that accepts it, and that task always closes it.
"""

from __future__ import annotations

import asyncio
import socket
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
        self._listener: socket.socket | None = None
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
        if self._listener is None:
            listener = socket.create_server((LISTEN_HOST, self._port))  # SO_REUSEADDR
            listener.setblocking(False)
            self._port = listener.getsockname()[1]
            asyncio.get_running_loop().add_reader(listener, self._accept, listener)
            self._listener = listener

    async def stop(self) -> None:
        """Stops listening and cuts every open connection: the server is gone."""
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener)
            listener.close()
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

    def _accept(self, listener: socket.socket) -> None:
        """Takes every waiting connection; each is owned by its task from here on."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            task = asyncio.get_running_loop().create_task(self._forward(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forward(self, conn: socket.socket) -> None:
        with conn:  # closed at the end, whatever happens (a no-op after the abort)
            if self._listener is None:  # accepted while stopping: refuse it
                return
            conn.setblocking(False)
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            except OSError:
                return
            self._writers.add(writer)
            try:
                await self._pipe(reader, writer)
            finally:
                writer.transport.abort()
                self._writers.discard(writer)

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
