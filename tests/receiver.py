"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in its own thread.

It checks every request with the `standardwebhooks` library, the way a subscriber
would, records what it saw, and answers as the test scripts it: a status with
headers, or no answer at all (the connection held open until the test ends).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from reconciler.webhooks import new_secret

HOLD_MAX_S = 60.0


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hold: bool = False  # never answer: the sender times out or dies waiting


@dataclass(frozen=True)
class Received:
    path: str
    event_id: str
    payload: dict[str, Any]
    headers: dict[str, str]
    at: float = field(default_factory=time.perf_counter)  # when it arrived


Script = Callable[[int], Answer]  # the n-th request (from 1) -> how to answer it


def always(status: int = 200) -> Script:
    return lambda _: Answer(status)


class Receiver:
    """What the server saw: verified requests, the ids it acknowledged, bad signatures."""

    def __init__(self, script: Script) -> None:
        self.secret = new_secret()
        self.script = script
        self.received: list[Received] = []
        self.acknowledged: Counter[str] = Counter()
        self.rejected: list[str] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self.url = ""

    def take(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Verifies and records one request; returns how to answer it."""
        try:
            payload = Webhook(self.secret).verify(body, headers)
        except (WebhookVerificationError, ValueError) as exc:
            with self._lock:
                self.rejected.append(f"{type(exc).__name__}: {exc}")
            return Answer(400)
        with self._lock:
            self.received.append(Received(path, headers["webhook-id"], payload, headers))
            answer = self.script(len(self.received))
            if 200 <= answer.status < 300 and not answer.hold:
                self.acknowledged[headers["webhook-id"]] += 1
        return answer

    def ids(self) -> list[str]:
        with self._lock:
            return [r.event_id for r in self.received]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer = receiver.take(self.path, body, headers)
            if answer.hold:
                receiver.released.wait(HOLD_MAX_S)
                self.close_connection = True
                return
            self.send_response(answer.status)
            body = b"" if answer.status in (204, 304) else b"ok"  # those have no body
            for name, value in {"content-length": str(len(body)), **answer.headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: the test reads `receiver`, not stderr

    return Handler


@contextmanager
def receiving(script: Script) -> Iterator[Receiver]:
    """A running receiver; `receiver.url` is where to subscribe."""
    receiver = Receiver(script)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/finalized"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.released.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody-home"


def payload_text(received: Received) -> str:
    return json.dumps(received.payload, sort_keys=True)
