"""The Python API: submit batches and follow them to their run summary.

async with Client.open(Settings(database_url=..., redis_url=...)) as client:
    submitted = await client.submit([FileSpec("a", "/data/a.csv")])
    summary = await client.wait(submitted.batch_id)

To create a batch inside the application's own SQLAlchemy transaction, see
`reconciler.sqlalchemy` (then `client.enqueue(batch_id)` after the commit).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reconciler import batches
from reconciler.app import Ports, open_ports
from reconciler.batches import FileSpec, Submitted
from reconciler.config import Settings
from reconciler.errors import UsageError, WaitTimeout
from reconciler.notifications import Notifications

POLL_INTERVAL_S: Final = 0.1  # without LISTEN (PgBouncer in transaction mode)
RECHECK_S: Final = 1.0  # with LISTEN: the safety-net re-read between notifications

__all__ = ["Client", "FileSpec", "Submitted", "files_from_paths"]


def files_from_paths(paths: Iterable[Path]) -> list[FileSpec]:
    """One FileSpec per file under the given files and folders, id = absolute path."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if not p.is_dir()))
        elif path.exists() or path.is_symlink():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    unique = dict.fromkeys(p.absolute() for p in found)
    return [FileSpec(str(p), str(p)) for p in unique]


class Client:
    def __init__(self, settings: Settings, ports: Ports) -> None:
        self._settings = settings
        self._ports = ports

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Client]:
        async with open_ports(settings, listen=True, on_demand=True) as ports:
            yield cls(settings, ports)

    async def submit(
        self,
        files: Sequence[FileSpec],
        *,
        batch_id: str | None = None,
        run_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        deadline_s: float | None = None,
    ) -> Submitted:
        return await batches.submit(
            self._ports.db, self._ports.queue, files, batch_id=batch_id, run_id=run_id,
            metadata=metadata, deadline_s=deadline_s,
        )  # fmt: skip

    async def enqueue(self, batch_id: str) -> int:
        """Enqueues a batch written in the application's own transaction, after commit.

        See `reconciler.sqlalchemy`. Returns how many jobs it enqueued: 0 again for a
        batch already enqueued. Raises BatchNotFound if the batch was never committed.
        """
        return await batches.enqueue_committed(self._ports.db, self._ports.queue, batch_id)

    async def progress(self, batch_id: str) -> dict[str, Any]:
        return await batches.progress(self._ports.db, batch_id)

    async def summary(self, batch_id: str) -> dict[str, Any] | None:
        return await batches.summary(self._ports.db, batch_id)

    async def wait(
        self, batch_id: str, *, timeout_s: float = 600.0, progress: bool = False
    ) -> dict[str, Any]:
        """Waits until the run summary exists; shows a progress bar if asked.

        Woken by Postgres notifications the moment a batch moves; it re-reads the state
        on every wake-up, and each second anyway (every 0.1 s without LISTEN).
        """
        with anyio.move_on_after(timeout_s):
            if progress:
                return await self._wait_with_bar(batch_id)
            return await self._wait_quietly(batch_id)
        state = await self.progress(batch_id)
        raise WaitTimeout(
            f"batch {batch_id} not finalized after {timeout_s:g} s: "
            f"{state['files_succeeded'] + state['files_failed']}/{state['total_files']} files done"
        )

    async def _wait_quietly(self, batch_id: str) -> dict[str, Any]:
        with self._notifications.watch(batch_id) as watch:
            while (found := await self.summary(batch_id)) is None:
                await self.progress(batch_id)  # raises BatchNotFound for an unknown id
                await watch.wait(self._recheck_s)
        return found

    async def _wait_with_bar(self, batch_id: str) -> dict[str, Any]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())  # fmt: skip
        with (
            self._notifications.watch(batch_id) as watch,
            Progress(*columns, console=Console(stderr=True)) as bar,
        ):
            state = await self.progress(batch_id)
            task = bar.add_task(batch_id, total=state["total_files"], failed=0)
            while (found := await self.summary(batch_id)) is None:
                state = await self.progress(batch_id)
                done = state["files_succeeded"] + state["files_failed"]
                bar.update(task, completed=done, failed=state["files_failed"])
                await watch.wait(self._recheck_s)
            bar.update(task, completed=found["total_files"], failed=found["files_failed"])
        return found

    @property
    def _notifications(self) -> Notifications:
        return self._ports.notifications

    @property
    def _recheck_s(self) -> float:
        return self._notifications.interval(RECHECK_S, POLL_INTERVAL_S)
