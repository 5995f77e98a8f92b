"""A local webhook receiver for the benchmarks: answers every POST 200 at once.

It runs in its own thread (as a subscriber's server would be its own process), reads
each body, counts the `webhook-id`s (event ids) it acknowledged and keeps when it first
answered 200 to each (wall clock, to compare with the database's on the same host); it
does not verify signatures, which the tests do with the `standardwebhooks` library.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, cast

HOST: Final = "127.0.0.1"


class Receiver:
    def __init__(self, port: int) -> None:
        self.url = f"http://{HOST}:{port}/hook"
        self.acknowledged: Counter[str] = Counter()
        self.answered_at: dict[str, float] = {}  # event id -> first 2xx sent (epoch s)
        self._lock = threading.Lock()

    def record(self, webhook_id: str) -> None:
        answered = time.time()
        with self._lock:
            self.acknowledged[webhook_id] += 1
            self.answered_at.setdefault(webhook_id, answered)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.receiver = Receiver(self.server_address[1])


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A receiver listening on a free port of 127.0.0.1 for the duration of the block."""
    server = _Server()
    receiver = server.receiver
    thread = threading.Thread(target=server.serve_forever, name="bench-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver would

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()  # sent: the 2xx is on its way
        cast(_Server, self.server).receiver.record(self.headers.get("webhook-id", ""))

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: thousands of requests per run
