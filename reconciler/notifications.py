"""Wake-ups from Postgres: one LISTENing connection per process, fanned out to watchers.

`record_outcomes` and `reconciler_finalize` NOTIFY at commit. A notification only says
"look again": every watcher re-reads the database after waking (and on its own slow
timer), so one missed across a reconnect costs nothing but the re-read that every
reconnect forces. Without LISTEN (PgBouncer in transaction mode) nothing ever wakes a
watcher early and each falls back to polling at the interval its caller chose.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final

import anyio
import structlog

from reconciler import database
from reconciler.errors import ReconcilerError

log = structlog.get_logger("reconciler.notifications")

RECONNECT_DELAY_S: Final = 0.1
RECONNECT_MAX_DELAY_S: Final = 5.0
CHECK_INTERVAL_S: Final = 5.0  # how often an idle listening connection is pinged


class Kind(enum.StrEnum):
    PROGRESS = "progress"
    FINALIZED = "finalized"


ALL_KINDS: Final = tuple(Kind)
CHANNELS: Final = {f"reconciler_{kind}": kind for kind in Kind}


Accept = Callable[[dict[str, Any]], bool]


class Watch:
    """One waiter's wake-up flag; with `collect`, what the notifications said too: the
    latest progress per batch, and the finalized events announced since the last take.
    """

    def __init__(self, collect: bool = False, accept: Accept | None = None) -> None:
        self._woken = anyio.Event()
        self._collect = collect
        self._accept = accept
        self.progress: dict[str, dict[str, Any]] = {}
        self.finalized: set[str] = set()

    def wake(self, kind: Kind | None = None, payload: dict[str, Any] | None = None) -> None:
        if payload is not None and self._accept is not None and not self._accept(payload):
            return
        if self._collect and payload is not None:
            if kind is Kind.PROGRESS:
                self.progress[str(payload.get("batch_id"))] = payload
            elif kind is Kind.FINALIZED:
                self.finalized.add(str(payload.get("event_id")))
        self._woken.set()

    async def wait(self, timeout_s: float) -> bool:
        """Waits for a wake-up for at most `timeout_s`; True if one came."""
        with anyio.move_on_after(timeout_s):
            await self._woken.wait()
        woken = self._woken.is_set()
        if woken:
            self._woken = anyio.Event()
        return woken

    def take_progress(self) -> list[dict[str, Any]]:
        taken, self.progress = list(self.progress.values()), {}
        return taken


Key = tuple[Kind, str | None]


class Notifications:
    """The process's listener; `url=None` means no LISTEN at all (polling only)."""

    def __init__(self, url: str | None = None, *, on_demand: bool = False) -> None:
        self._url = url
        self._on_demand = on_demand  # LISTEN only from the first watch on
        self._wanted: anyio.Event | None = None
        self._watches: dict[Key, set[Watch]] = {}
        self.backend_pid: int | None = None  # of the listening connection, while up

    @property
    def live(self) -> bool:
        """Whether a notification can wake a watcher right now."""
        return self.backend_pid is not None

    def interval(self, live_s: float, polling_s: float) -> float:
        """A watcher's re-check timer: a slow safety net when live, the poll otherwise."""
        return live_s if self._url is not None else polling_s

    def watchers(self, kind: Kind, batch_id: str | None = None) -> int:
        """How many watches wait on this kind for the batch (None: for every batch)."""
        return len(self._watches.get((kind, batch_id), ()))

    @contextmanager
    def watch(
        self,
        batch_id: str | None = None,
        kinds: tuple[Kind, ...] = ALL_KINDS,
        collect: bool = False,
        accept: Accept | None = None,
    ) -> Iterator[Watch]:
        """A watch on one batch (or every batch): enter it before reading the state.

        With `accept`, a notification whose payload it refuses does not wake the watch
        (an unreadable one, or a reconnect, always does).
        """
        watch = Watch(collect, accept)
        keys = [(kind, batch_id) for kind in kinds]
        for key in keys:
            self._watches.setdefault(key, set()).add(watch)
        if self._wanted is not None:
            self._wanted.set()
        try:
            yield watch
        finally:
            for key in keys:
                self._watches[key].discard(watch)
                if not self._watches[key]:
                    del self._watches[key]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Notifications]:
        """Keeps the listening connection up (reconnecting) until the block ends."""
        if self._url is None:
            yield self
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen_when_watched, self._url)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _listen_when_watched(self, url: str) -> None:
        """On demand, waits for the first watch; the first LISTEN then wakes it to re-read."""
        if self._on_demand and not self._watches:
            self._wanted = anyio.Event()
            await self._wanted.wait()
        await self._listen_forever(url)

    async def _listen_forever(self, url: str) -> None:
        delay = RECONNECT_DELAY_S
        while True:
            try:
                await self._listen_once(url)
                delay = RECONNECT_DELAY_S
            except ReconcilerError as exc:
                log.warning("listen_failed", error=str(exc), retry_in_s=delay)
            finally:
                self.backend_pid = None
            await anyio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _listen_once(self, url: str) -> None:
        async with database.listening(url, list(CHANNELS), self._dispatch) as conn:
            self.backend_pid = conn.backend_pid
            log.info("listening", channels=list(CHANNELS))
            # Anything may have happened while no one listened: everyone re-reads.
            self._wake_all()
            await conn.until_lost(CHECK_INTERVAL_S)
        log.warning("listen_connection_lost")

    def _dispatch(self, channel: str, data: str) -> None:
        kind = CHANNELS.get(channel)
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if kind is None or not isinstance(payload, dict):
            self._wake_all()  # unreadable: waking everyone is always safe
            return
        batch_id = str(payload.get("batch_id"))
        for key in ((kind, batch_id), (kind, None)):
            for watch in list(self._watches.get(key, ())):
                watch.wake(kind, payload)

    def _wake_all(self) -> None:
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.wake()
