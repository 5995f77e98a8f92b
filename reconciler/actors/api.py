"""The API actor: serves the HTTP app (batches, probes, /metrics) with uvicorn.

Every role serves the probes and /metrics; only roles `all` and `api` serve /api.

It runs in the service's task group like every actor; signals belong to the service,
so uvicorn's own handlers are disabled, and shutdown is asked for, not cancelled.
"""

from __future__ import annotations

import contextlib
import socket
import traceback
from collections.abc import Iterator
from typing import Final

import anyio
import structlog
import uvicorn
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.config import Settings
from reconciler.database import Database
from reconciler.notifications import Notifications
from reconciler.queue import JobQueue
from reconciler.routes import Context, create_app, error
from reconciler.supervisor import Health

log = structlog.get_logger("reconciler.api")

GRACEFUL_SHUTDOWN_S: Final = 5.0
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
BACKLOG: Final = 2048  # pending connections; uvicorn's 2048, on our own socket


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
        notifications: Notifications | None = None,
    ) -> None:
        self._settings = settings
        context = Context(settings, db, queue, health, stop, notifications or Notifications())
        self.app = Guard(create_app(context, batches_api=batches_api))
        self.port: int | None = None
        self.started = anyio.Event()
        self._server: _Server | None = None
        self._stopped = anyio.Event()

    async def run(self) -> None:
        sock = socket.create_server(
            (self._settings.http_host, self._settings.http_port), reuse_port=False, backlog=BACKLOG
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
            # Cancelled, uvicorn never closes its asyncio servers: close them before the
            # socket, or the loop keeps watching a closed descriptor that the next
            # socket to get that number (a Redis connection, say) then trips over.
            for listener in getattr(self._server, "servers", []):
                listener.close()
            sock.close()
            self._stopped.set()

    async def shutdown(self) -> None:
        """Asks uvicorn to finish in-flight requests and stop listening."""
        if self._server is None:
            return
        self._server.should_exit = True
        with anyio.move_on_after(GRACEFUL_SHUTDOWN_S + 1):
            await self._stopped.wait()


class Guard:
    """Outermost layer: caps request bodies (413) and logs any exception that escapes
    the app as `request_failed`, answering a JSON 500 if nothing was sent yet. The
    traceback is logged without local variables: those hold the settings' secrets.

    A pure ASGI middleware rather than an `@app.middleware`: it adds no task and no
    copy per request, and it counts chunked bodies too, not just Content-Length.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > MAX_BODY_BYTES:
            await error(413, "request body too large")(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, _limited(receive), tracking_send)
        except BodyTooLarge:
            if not started:
                await error(413, "request body too large")(scope, receive, send)
        except Exception as exc:
            log.error(
                "request_failed",
                path=scope.get("path"), error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),  # never the locals
            )  # fmt: skip
            if not started:
                await error(500, "internal error")(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException, so FastAPI answers it rather than a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def _limited(receive: Receive) -> Receive:
    seen = 0

    async def counting_receive() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > MAX_BODY_BYTES:
            raise BodyTooLarge
        return message

    return counting_receive


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
