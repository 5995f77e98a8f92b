"""A small HTTP/1.1 client for the webhook POSTs, on asyncio's protocols.

What a webhook attempt needs and nothing more: keep-alive connections per origin (http
or https), one deadline for the whole exchange, no redirects followed, no proxies, no
cookies, no decompression, and the answer's body read up to a cap. An answer is
parsed by httptools (llhttp, Node's parser, in C). A connection is reused only when
its answer ended cleanly where the parser says it ends: a 204 that carries a body
anyway still counts as the 204 it is, and its connection is closed.

Why not aiohttp, the client before: one signed POST cost 275-337 us of CPU through
aiohttp's ClientSession (request and payload objects, a writer task, a timer and a
cookie jar per request) and about 50 us through a protocol like this one
(docs/PERFORMANCE.md, "Tenth pass"), on the event loop that the consumer shares.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

IDLE_TIMEOUT_S: Final = 15.0  # an idle connection older than this is not reused
IDLE_PER_ORIGIN: Final = 16
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class HttpError(Exception):
    """No whole answer: a refused or dropped connection, a malformed answer, or a URL
    this client cannot post to. The message never quotes the URL."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes  # at most the cap's bytes of it


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class _Target:
    origin: _Origin
    head: bytes  # the request line and the Host header


class Client:
    """Posts over pooled connections; `close` (or leaving the `async with`) ends them."""

    def __init__(self, *, user_agent: str, tls: ssl.SSLContext | None = None) -> None:
        self._agent = f"user-agent: {user_agent}\r\n".encode()
        self._tls = tls
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float, cap: int
    ) -> Response:
        """The answer to one POST; TimeoutError past `timeout_s` (connecting included),
        HttpError when there is no whole answer. A connection taken from the pool that
        turns out closed by the server before answering is replaced once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        target = _target(url)
        request = _request(target, self._agent, headers, body)
        connection = self._pooled(target.origin, loop.time())
        if connection is not None:
            try:
                return await self._exchange(target.origin, connection, request, cap, deadline)
            except HttpError:
                if connection.answered:
                    raise
                # Nothing came back: most likely closed while idle (a keep-alive timeout)
                # as this was written. Tried once on a new connection; a receiver that read
                # it and then failed sees it again, with the same webhook-id.
        connection = await self._connect(target.origin, deadline)
        return await self._exchange(target.origin, connection, request, cap, deadline)

    async def _exchange(
        self, origin: _Origin, connection: _Connection, request: bytes, cap: int, deadline: float
    ) -> Response:
        try:
            response = await connection.exchange(request, cap, deadline)
        except BaseException:
            connection.close()
            raise
        if connection.reusable and not self._closed:
            self._keep(origin, connection)
        else:
            connection.close()
        return response

    def _pooled(self, origin: _Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest to be open
            if not connection.lost and now - connection.idle_since < IDLE_TIMEOUT_S:
                return connection
            connection.close()
        return None

    def _keep(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, deque())
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)
        while idle and (len(idle) > IDLE_PER_ORIGIN or idle[0].lost):
            idle.popleft().close()

    async def _connect(self, origin: _Origin, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.scheme == "https":
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:  # refused, unreachable, unresolvable, a bad certificate
            raise HttpError(f"cannot connect to {_hostport(origin)}: {exc}") from None
        return connection


class _Connection(asyncio.Protocol):
    """One connection: a request written, its answer parsed as the bytes arrive."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._cap = 0
        self._head_done = False
        self.answered = False  # a byte of the current answer arrived
        self.reusable = False
        self.lost = False
        self.idle_since = 0.0

    async def exchange(self, request: bytes, cap: int, deadline: float) -> Response:
        if self.lost or self._transport is None or self._transport.is_closing():
            raise HttpError("the connection closed before the request was sent")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self._headers, self._body, self._cap = {}, bytearray(), cap
        self._head_done = self.answered = self.reusable = False
        timer = loop.call_at(deadline, self._expire)
        try:
            try:
                self._transport.write(request)
            except (OSError, RuntimeError) as exc:  # uvloop raises on a transport closing
                raise HttpError(f"the connection failed while sending: {exc}") from None
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def _expire(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError())

    def _finish(self, *, reusable: bool) -> None:
        if self._waiter is None or self._waiter.done():
            return
        status = self._parser.get_status_code()
        self._waiter.set_result(Response(status, self._headers, bytes(self._body)))
        self.reusable = reusable and not self.lost

    def _waiting(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast: uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if not self._waiting():
            return
        if self._head_done:  # a body that ends with the connection
            self._finish(reusable=False)
        else:
            reason = f": {exc}" if exc else ""
            assert self._waiter is not None
            self._waiter.set_exception(HttpError(f"the connection closed before an answer{reason}"))

    def data_received(self, data: bytes) -> None:
        if not self._waiting():  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # HttpParserUpgrade among them
            if self._waiting():
                assert self._waiter is not None
                self._waiter.set_exception(HttpError(f"malformed answer: {exc}"))
            self.close()

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if not self._waiting():  # a second answer, or a body its status forbids
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._waiting():
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._waiting() and self._parser.get_status_code() >= 200:
            self._head_done = True

    def on_body(self, body: bytes) -> None:
        if not self._waiting():
            return
        self._body += body[: self._cap - len(self._body)]
        if len(self._body) >= self._cap:  # the rest is not read: the connection goes
            self._finish(reusable=False)

    def on_message_complete(self) -> None:
        if not self._waiting():
            return
        if not self._head_done:  # 1xx, informational: the answer is still to come
            self._headers = {}
            return
        self._finish(reusable=self._parser.should_keep_alive())


@functools.lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    """Where a URL's POST goes, and the head of its request; HttpError if it cannot."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HttpError("the URL is malformed") from None
    host = parts.hostname
    if parts.scheme not in DEFAULT_PORTS or not host:
        raise HttpError("the URL needs the scheme http or https and a host")
    if parts.username or parts.password:
        raise HttpError("the URL must not carry credentials")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise HttpError("the URL's host is not a valid name") from None
    origin = _Origin(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme])
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = _hostport(origin) if port else _bracketed(host)
    try:
        head = f"POST {path} HTTP/1.1\r\nhost: {host_header}\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise HttpError("the URL's path is not ASCII (percent-encode it)") from None
    if any(c in path for c in " \r\n"):
        raise HttpError("the URL's path holds a space or a line break")
    return _Target(origin, head)


def _request(target: _Target, agent: bytes, headers: Mapping[str, str], body: bytes) -> bytes:
    if any("\r" in field or "\n" in field for item in headers.items() for field in item):
        raise HttpError("a header holds a line break")
    try:
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("ascii")
    except UnicodeEncodeError:
        raise HttpError("a header is not ASCII") from None
    length = f"content-length: {len(body)}\r\n\r\n".encode()
    return b"".join((target.head, agent, fields, length, body))


def _hostport(origin: _Origin) -> str:
    return f"{_bracketed(origin.host)}:{origin.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
