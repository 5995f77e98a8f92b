"""The API actor: serves the HTTP app (batches, probes, /metrics) with uvicorn.

Every role serves the probes and /metrics; only roles `all` and `api` serve /api.

It runs in the service's task group like every actor; signals belong to the service,
so uvicorn's own handlers are disabled, and shutdown is asked for, not cancelled.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Final

import anyio
import structlog
import uvicorn

from reconciler.config import Settings
from reconciler.database import Database
from reconciler.queue import JobQueue
from reconciler.routes import Context, create_app
from reconciler.supervisor import Health

log = structlog.get_logger("reconciler.api")

GRACEFUL_SHUTDOWN_S: Final = 5.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service owns SIGTERM and SIGINT


class Api:
    name = "api"

    def __init__(
        self,
        settings: Settings,
        db: Database,
        queue: JobQueue,
        health: Health,
        stop: anyio.Event,
        *,
        batches_api: bool = True,
    ) -> None:
        self._settings = settings
        context = Context(settings, db, queue, health, stop)
        self.app = create_app(context, batches_api=batches_api)
        self.port: int | None = None
        self.started = anyio.Event()
        self._server: _Server | None = None
        self._stopped = anyio.Event()

    async def run(self) -> None:
        sock = socket.create_server(
            (self._settings.http_host, self._settings.http_port), reuse_port=False
        )
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
        )  # fmt: skip
        self._server = _Server(config)
        self._stopped = anyio.Event()
        log.info("api_listening", host=self._settings.http_host, port=self.port)
        self.started.set()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            self._stopped.set()

    async def shutdown(self) -> None:
        """Asks uvicorn to finish in-flight requests and stop listening."""
        if self._server is None:
            return
        self._server.should_exit = True
        with anyio.move_on_after(GRACEFUL_SHUTDOWN_S + 1):
            await self._stopped.wait()
