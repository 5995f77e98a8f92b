"""A local webhook receiver for the benchmarks: answers every POST 200 at once.

It runs in a process of its own, as a subscriber's server would, so its work neither
holds the harness's interpreter lock nor hides in the harness's CPU figure: it is
measured as `receiver` on its own. It is a minimal HTTP/1.1 server on one asyncio
protocol (keep-alive, Content-Length bodies, no chunking), about as cheap per request
as a Python server gets, so what the benchmarks attribute to a webhook is the
service's sending and settling rather than a slow receiver. It counts the
`webhook-id`s (event ids) it acknowledged and keeps when it first answered 200 to each
(wall clock, to compare with the database's on the same host); `GET /record` returns
both. It does not verify signatures: the tests do that with the `standardwebhooks`
library.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

HOST: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 10.0
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NOT_FOUND: Final = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Receiver:
    """The harness's handle on the receiver process."""

    def __init__(self, port: int, pid: int) -> None:
        self.url = f"http://{HOST}:{port}/hook"
        self.pid = pid
        self._record_url = f"http://{HOST}:{port}/record"

    def record(self) -> tuple[Counter[str], dict[str, float]]:
        """Acknowledgements per event id, and when each was first answered (epoch s)."""
        with urllib.request.urlopen(self._record_url, timeout=30) as answer:
            found = json.load(answer)
        return Counter(found["acknowledged"]), dict(found["answered_at"])

    @property
    def acknowledged(self) -> Counter[str]:
        return self.record()[0]

    @property
    def answered_at(self) -> dict[str, float]:
        return self.record()[1]


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A receiver process listening on a free port of 127.0.0.1 for the block."""
    with helper("bench.receiver") as (pid, line):
        if not line.isdigit():
            raise RuntimeError(f"the webhook receiver did not start: {line!r}")
        yield Receiver(int(line), pid)


@contextmanager
def helper(module: str, *args: str) -> Iterator[tuple[int, str]]:
    """`python -m module args` for the block: its pid and the first line it printed
    (once it is ready), then terminated."""
    child = subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        yield child.pid, child.stdout.readline().strip()
    finally:
        child.terminate()
        child.wait(START_TIMEOUT_S)


class _Http(asyncio.Protocol):
    """One keep-alive connection: requests parsed as their bytes arrive."""

    def __init__(self, seen: _Seen) -> None:
        self._seen = seen
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end].decode("latin-1").split("\r\n")
            headers = dict(_header(line) for line in head[1:])
            length = int(headers.get("content-length", "0"))
            if len(self._buffer) < end + 4 + length:
                return  # the body is still on its way
            self._buffer = self._buffer[end + 4 + length :]
            self._answer(head[0], headers)

    def _answer(self, request_line: str, headers: dict[str, str]) -> None:
        assert self._transport is not None
        method, path = request_line.split(" ", 2)[:2]
        if method == "POST":
            self._transport.write(OK)  # sent: the 2xx is on its way
            self._seen.record(headers.get("webhook-id", ""))
        elif method == "GET" and path == "/record":
            body = json.dumps(self._seen.as_json()).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            self._transport.write(head + body)
        else:
            self._transport.write(NOT_FOUND)


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


class _Seen:
    def __init__(self) -> None:
        self.acknowledged: Counter[str] = Counter()
        self.answered_at: dict[str, float] = {}

    def record(self, webhook_id: str) -> None:
        self.acknowledged[webhook_id] += 1
        self.answered_at.setdefault(webhook_id, time.time())

    def as_json(self) -> dict[str, Any]:
        return {"acknowledged": self.acknowledged, "answered_at": self.answered_at}


async def _serve() -> None:
    seen = _Seen()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(seen), HOST, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve())
