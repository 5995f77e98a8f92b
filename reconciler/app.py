"""The composition root: builds the ports, the channels and the actors of a role.

Shutdown follows the manager pattern: `stop` ends reading, the consumer drains within
the deadline, the other actors are cancelled, and the HTTP server stops last so the
probes answer (503 on /readyz) until the very end.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import structlog

from reconciler import metrics, migrations
from reconciler.actors.api import Api
from reconciler.actors.consumer import Consumer
from reconciler.actors.delivery import Deliverer
from reconciler.actors.detector import CompletionDetector
from reconciler.actors.finalizer import Finalizer, FinalizeRequest
from reconciler.actors.monitor import Monitor
from reconciler.actors.sweeper import Sweeper
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.errors import ConfigError, TerminalError
from reconciler.execution import Executor
from reconciler.handlers import load_handler
from reconciler.notifications import Notifications
from reconciler.queue import JobQueue
from reconciler.recording import Completed
from reconciler.supervisor import Actor, Health, supervise

log = structlog.get_logger("reconciler.app")

PROGRESS_BUFFER: Final = 1024
FINALIZE_BUFFER: Final = 1024


class Role(enum.StrEnum):
    ALL = "all"
    WORKER = "worker"
    SWEEPER = "sweeper"
    API = "api"


@dataclass(frozen=True, slots=True)
class Ports:
    db: Database
    queue: JobQueue
    # Polling only, unless opened by `open_ports` with `listen=True`.
    notifications: Notifications = field(default_factory=Notifications)


@asynccontextmanager
async def open_ports(
    settings: Settings, *, listen: bool = False, on_demand: bool = False
) -> AsyncIterator[Ports]:
    """Connects to Postgres and Redis; closes them all on exit.

    `listen=True` (the service, `Client`) also LISTENs on a connection of its own, so
    waiters, streams and the delivery actor are woken at once; without it, or with
    `RECONCILER_DATABASE_POOLER=transaction` (LISTEN cannot work through PgBouncer in
    transaction mode), they poll. One-shot commands need no listener. `on_demand=True`
    (`Client`) opens that connection at the first wait rather than at once, so a client
    that only submits is not sent every notification.
    """
    if not settings.database_url:
        raise ConfigError("RECONCILER_DATABASE_URL: not set")
    if not settings.redis_url:
        raise ConfigError("RECONCILER_REDIS_URL: not set")
    db = await Database.connect(
        settings.database_url, max_size=_pool_size(settings), pooler=settings.database_pooler
    )
    queue = JobQueue.connect(settings.redis_url, settings.namespace)
    listen = listen and settings.database_pooler != "transaction"
    notifications = Notifications(settings.database_url if listen else None, on_demand=on_demand)
    try:
        async with notifications.running():
            yield Ports(db, queue, notifications)
    finally:
        with anyio.CancelScope(shield=True):
            await queue.close()
            await db.close()


def _pool_size(settings: Settings) -> int:
    return max(8, min(24, settings.concurrency // 2 + 8))


@dataclass
class Service:
    """The actors of one role, wired together, ready to `serve()`."""

    settings: Settings
    ports: Ports
    role: Role = Role.ALL
    stop: anyio.Event = field(default_factory=anyio.Event)
    health: Health = field(default_factory=Health)
    consumer: Consumer | None = None
    actors: list[Actor] = field(default_factory=list)
    api: Api | None = None  # set by __post_init__: every role serves probes and /metrics
    channels: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        wants = {self.role} if self.role is not Role.ALL else set(Role)
        self.actors.append(Monitor(self.settings, self.ports.db, self.ports.queue))
        deliverer = None
        if wants & {Role.WORKER, Role.SWEEPER}:
            # Completion callbacks go out from every role that does background work.
            deliverer = Deliverer(self.settings, self.ports.db, self.ports.notifications)
        if Role.WORKER in wants:
            self._add_worker(deliverer)
        if Role.SWEEPER in wants:
            self.actors.append(Sweeper(self.settings, self.ports.db, self.ports.queue))
        if deliverer is not None:
            self.actors.append(deliverer)
        ports = self.ports
        self.api = Api(
            self.settings, ports.db, ports.queue, self.health, self.stop,
            batches_api=Role.API in wants, notifications=ports.notifications,
        )  # fmt: skip

    def _add_worker(self, deliverer: Deliverer | None) -> None:
        completed_send, completed_recv = anyio.create_memory_object_stream[Completed](
            PROGRESS_BUFFER
        )
        requests_send, requests_recv = anyio.create_memory_object_stream[FinalizeRequest](
            FINALIZE_BUFFER
        )
        executor = Executor(
            load_handler(self.settings.handler),
            timeout_s=self.settings.file_timeout_s,
            max_attempts=self.settings.max_attempts,
            threads=self.settings.concurrency,
        )
        self.channels += [completed_send, completed_recv, requests_send, requests_recv]
        db, queue = self.ports.db, self.ports.queue
        self.consumer = Consumer(self.settings, db, queue, executor, completed_send, self.stop)
        self.actors += [
            self.consumer,
            CompletionDetector(completed_recv, requests_send),
            Finalizer(db, requests_recv, handoff=deliverer),
        ]

    async def serve(self) -> None:
        """Runs until `stop` is set and the drain is over (or cancelled)."""
        metrics.preinitialize()
        log.info("service_started", role=self.role.value, actors=[a.name for a in self.actors])
        try:
            await self._serve()
        finally:
            for channel in self.channels:
                channel.close()
        log.info("service_stopped", role=self.role.value)

    async def _serve(self) -> None:
        async with anyio.create_task_group() as outer:
            if self.api is not None:
                outer.start_soon(supervise, self.api, self.health)
            async with anyio.create_task_group() as inner:
                drained = anyio.Event()
                for actor in self.actors:
                    inner.start_soon(self._run_actor, actor, drained)
                if self.consumer is None:
                    drained.set()
                await self.stop.wait()
                log.info("shutdown_started", drain_timeout_s=self.settings.drain_timeout_s)
                with anyio.move_on_after(self.settings.drain_timeout_s):
                    await drained.wait()
                inner.cancel_scope.cancel()
            if self.api is not None:
                await self.api.shutdown()
            outer.cancel_scope.cancel()

    async def _run_actor(self, actor: Actor, drained: anyio.Event) -> None:
        await supervise(actor, self.health)
        if actor is self.consumer:
            drained.set()


async def require_current_schema(db: Database) -> None:
    missing = await migrations.pending(db)
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise TerminalError(
            f"database schema is not current (missing {names}): run `reconciler migrate`"
        )


async def run_service(settings: Settings, role: Role, stop: anyio.Event) -> None:
    """Connects, checks the schema, and serves the role until `stop` and the drain."""
    async with open_ports(settings, listen=True) as ports:
        await require_current_schema(ports.db)
        await Service(settings, ports, role, stop).serve()
