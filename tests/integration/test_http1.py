"""The webhook client (`reconciler.http1`) against real servers on 127.0.0.1.

Each test scripts a small asyncio server: how it answers, when it closes. The client's
promises: keep-alive reuse only after a clean answer, one deadline, no redirect
followed, a capped body, and an error (never a hang or a leak) for everything else.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from reconciler.http1 import Client, HttpError
from tests.receiver import refused_url


@pytest.fixture(
    params=[("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: the service runs on uvloop, whose transports and TLS are its own."""
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TIMEOUT_S = 5.0
# uvloop's loop clock counts whole milliseconds, cached per loop iteration (libuv's
# uv_now): a timer read on it can seem to fire up to a millisecond early.
CLOCK_SLACK_S = 0.005


@dataclass
class Server:
    """What a scripted server saw."""

    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # a connection's handler returned


# Runs for each connection; `server.connections` is its number (from 1).
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Server], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader, server: Server) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    request = head + await reader.readexactly(length)
    server.requests.append(request)
    return request


@asynccontextmanager
async def serving(
    handle: Handler, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[Server]:
    """A server running `handle(reader, writer, server)` for each connection."""
    state = Server("")

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handle(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away first
        finally:
            writer.close()
            state.ended.set()

    server = await asyncio.start_server(connected, host, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    state.url = f"{'https' if tls else 'http'}://{host}:{port}/hook?x=1"
    async with server:
        yield state


def answering(*answers: bytes) -> Handler:
    """Answers the server's n-th request, on whichever connection, with `answers[n]`."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        while len(server.requests) < len(answers):
            await read_request(reader, server)
            writer.write(answers[len(server.requests) - 1])
            await writer.drain()

    return handle


def scripted(*answers: bytes) -> AbstractAsyncContextManager[Server]:
    return serving(answering(*answers))


async def post(client: Client, url: str, body: bytes = b"{}", cap: int = 4096) -> tuple[int, bytes]:
    answer = await client.post(url, body, {"webhook-id": "evt_1"}, timeout_s=TIMEOUT_S, cap=cap)
    return answer.status, answer.body


async def test_a_connection_is_kept_alive_and_the_request_is_as_written() -> None:
    async with scripted(OK, OK) as server, Client(user_agent="ua-test") as client:
        assert await post(client, server.url, b'{"a":1}') == (200, b"ok")
        assert await post(client, server.url) == (200, b"ok")
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /hook?x=1 HTTP/1.1"
    port = server.url.split(":")[2].split("/")[0]
    assert {b"host: 127.0.0.1:" + port.encode(), b"user-agent: ua-test"} <= set(lines)
    assert {b"webhook-id: evt_1", b"content-length: 7"} <= set(lines)
    assert body == b'{"a":1}'


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\nunexpected", 204),
        (OK + b"HTTP/1.1 500 Again\r\nContent-Length: 0\r\n\r\n", 200),
    ],
    ids=["204-with-a-body", "an-answer-twice"],
)
async def test_bytes_past_an_answer_end_its_connection(first: bytes, status: int) -> None:
    """What follows a whole answer (a body a 204 may not carry, an answer nobody asked
    for) is not read as the next request's answer: the first answer counts, and the
    connection is not used again. aiohttp read such bytes as the next answer and failed
    every later delivery to that receiver with a parse error."""
    async with scripted(first, OK) as server, Client(user_agent="t") as client:
        assert (await post(client, server.url))[0] == status
        assert await post(client, server.url) == (200, b"ok")
    assert server.connections == 2


async def test_a_long_body_is_read_up_to_the_cap_and_its_connection_closed() -> None:
    big = b"x" * 1_000_000
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
    async with scripted(answer, OK) as server, Client(user_agent="t") as client:
        assert await post(client, server.url, cap=100) == (500, b"x" * 100)
        assert await post(client, server.url) == (200, b"ok")
    assert server.connections == 2


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with scripted(chunked, OK) as server, Client(user_agent="t") as client:
        assert await post(client, server.url) == (503, b"abcde")
        assert await post(client, server.url) == (200, b"ok")  # the same connection
    assert server.connections == 1

    async def until_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 400 Bad\r\nConnection: close\r\n\r\nto the end")
        await writer.drain()
        writer.close()

    async with serving(until_close) as server, Client(user_agent="t") as client:
        assert await post(client, server.url, b"") == (400, b"to the end")


async def test_an_informational_answer_is_skipped() -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    async with scripted(hints + OK) as server, Client(user_agent="t") as client:
        assert await post(client, server.url) == (200, b"ok")


async def test_a_redirect_is_returned_not_followed() -> None:
    moved = b"HTTP/1.1 307 Moved\r\nLocation: http://127.0.0.1:9/\r\nContent-Length: 0\r\n\r\n"
    async with scripted(moved) as server, Client(user_agent="t") as client:
        answer = await client.post(server.url, b"{}", {}, timeout_s=TIMEOUT_S, cap=10)
    assert (answer.status, answer.headers["location"]) == (307, "http://127.0.0.1:9/")
    assert len(server.requests) == 1


async def answer_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
) -> None:
    """Answers one request 200; returning, the server closes the connection."""
    await read_request(reader, server)
    writer.write(OK)
    await writer.drain()


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    """Closed after its answer (a server's keep-alive timeout), or when the next request
    arrives: either way the next POST goes through on a new connection."""

    async with serving(answer_once) as server, Client(user_agent="t") as client:
        assert await post(client, server.url) == (200, b"ok")
        await wait_ended(server)
        assert await post(client, server.url) == (200, b"ok")
    assert server.connections == 2

    async def drop_the_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await answer_once(reader, writer, server)
        if server.connections == 1:
            await reader.readuntil(b"\r\n\r\n")  # the second request: closed unanswered

    async with serving(drop_the_second) as server, Client(user_agent="t") as client:
        assert await post(client, server.url) == (200, b"ok")
        assert await post(client, server.url) == (200, b"ok")
    assert server.connections == 2


async def wait_ended(server: Server) -> None:
    with anyio.fail_after(TIMEOUT_S):
        await server.ended.wait()
    server.ended.clear()


async def until_the_client_closes(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
) -> None:
    """Reads a request's head, never answers, and returns when the client hangs up."""
    await reader.readuntil(b"\r\n\r\n")
    await reader.read()  # everything until the end of the stream


async def test_a_new_connection_closed_unanswered_is_an_error() -> None:
    async def hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with serving(hang_up) as server, Client(user_agent="t") as client:
        with pytest.raises(HttpError, match="closed before an answer"):
            await post(client, server.url)
    assert server.connections == 1  # not tried again: it was a fresh connection


async def test_no_answer_times_out_and_the_connection_is_closed() -> None:
    async with serving(until_the_client_closes) as server, Client(user_agent="t") as client:
        started = anyio.current_time()
        with pytest.raises(TimeoutError):
            await client.post(server.url, b"{}", {}, timeout_s=0.3, cap=10)
        assert 0.3 - CLOCK_SLACK_S <= anyio.current_time() - started < TIMEOUT_S
        await wait_ended(server)


async def test_a_cancelled_post_closes_its_connection() -> None:
    async with serving(until_the_client_closes) as server, Client(user_agent="t") as client:
        with anyio.move_on_after(0.2):
            await post(client, server.url)
        await wait_ended(server)


async def test_a_refused_connection_and_a_malformed_answer_are_errors() -> None:
    async with Client(user_agent="t") as client:
        with pytest.raises(HttpError, match=r"cannot connect to 127\.0\.0\.1"):
            await post(client, refused_url())
    async with scripted(b"SMTP ready\r\n\r\n") as server, Client(user_agent="t") as client:
        with pytest.raises(HttpError, match="malformed answer"):
            await post(client, server.url)


@pytest.mark.parametrize(
    ("url", "headers", "reason"),
    [
        ("ftp://127.0.0.1/x", {}, "scheme http or https"),
        ("http://user:pw@127.0.0.1/x", {}, "credentials"),
        ("http://127.0.0.1:99999/x", {}, "malformed"),
        ("http://127.0.0.1/a b", {}, "space or a line break"),
        ("http://127.0.0.1/x", {"webhook-id": "a\r\nx-injected: 1"}, "line break"),
    ],
)
async def test_what_cannot_be_posted_is_refused_before_connecting(
    url: str, headers: dict[str, str], reason: str
) -> None:
    async with Client(user_agent="t") as client:
        with pytest.raises(HttpError, match=reason) as raised:
            await client.post(url, b"{}", headers, timeout_s=TIMEOUT_S, cap=10)
    assert "user:pw" not in str(raised.value)


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    names = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    files = ["-keyout", str(key), "-out", str(cert)]
    options = ["-days", "1", "-subj", "/CN=localhost", "-addext", names]
    subprocess.run([*command.split(), *files, *options], check=True, capture_output=True)
    return key, cert


async def test_https_verifies_the_server_and_keeps_the_connection(tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serving(answering(OK, OK), tls=server_tls) as server:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with Client(user_agent="t", tls=trusting) as client:
            assert await post(client, server.url) == (200, b"ok")
            assert await post(client, server.url) == (200, b"ok")
        assert server.connections == 1
        async with Client(user_agent="t") as client:  # the system's roots do not know it
            with pytest.raises(HttpError, match="CERTIFICATE_VERIFY_FAILED"):
                await post(client, server.url)
