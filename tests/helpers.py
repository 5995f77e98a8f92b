"""Test helpers: run the service in-process, wait on conditions, make batches."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

from reconciler import batches
from reconciler.app import Ports, Role, Service
from reconciler.batches import FileSpec, Submitted
from reconciler.config import Settings

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 20.0


@asynccontextmanager
async def running(
    settings: Settings, ports: Ports, role: Role = Role.ALL
) -> AsyncIterator[Service]:
    """The service's actors for `role`, running in this process until the block ends."""
    service = Service(settings, ports, role)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.serve)
        if service.api is not None:
            with anyio.fail_after(DEFAULT_TIMEOUT_S):
                await service.api.started.wait()
        try:
            yield service
        finally:
            service.stop.set()


async def wait_for(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "",
) -> T:
    """Polls `probe` until it returns something truthy; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or probe}")
        await anyio.sleep(0.02)


def files(count: int, payload: Any = None, prefix: str = "f") -> list[FileSpec]:
    return [FileSpec(f"{prefix}{i:05d}", f"mem://{prefix}{i}", payload) for i in range(count)]


async def submit(ports: Ports, specs: list[FileSpec], **kwargs: Any) -> Submitted:
    return await batches.submit(ports.db, ports.queue, specs, **kwargs)


async def summary_of(ports: Ports, batch_id: str) -> dict[str, Any] | None:
    return await batches.summary(ports.db, batch_id)


async def sql(database_url: str, query: str, *args: Any) -> list[Any]:
    """Runs one parameterized statement directly, to set up or age state in tests."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def record(ports: Ports, batch_id: str, file_ids: list[str], ok: bool = True) -> list[Any]:
    """Records outcomes the way the consumer does, without finalizing anything."""
    n = len(file_ids)
    return await ports.db.fetch(
        "record_outcomes", [batch_id] * n, file_ids, [ok] * n, [None] * n,
        [None if ok else "boom"] * n, [0.01] * n, [1] * n,
    )  # fmt: skip


async def start_as(
    ports: Ports, settings: Settings, worker: str, batch_id: str, file_id: str, attempt: int = 1
) -> str:
    """Records a file's attempt as started by `worker`, as the consumer's recorder does."""
    lease_s = settings.visibility_timeout_s
    args = ([batch_id], [file_id], [attempt], worker, lease_s)
    return await ports.db.execute("record_starts", *args)


async def age_pending_job(ports: Ports, consumer: str, job_id: str, idle_ms: int) -> None:
    """Sets a pending job's idle time, as if its consumer had been silent that long."""
    queue = ports.queue
    await queue._redis.xclaim(
        queue.stream, queue.group, consumer, 0, [job_id], idle=idle_ms, justid=True
    )


async def finalized(settings: Settings, batch_id: str) -> bool:
    """Whether the batch has left `processing`, read straight from its row."""
    rows = await sql(
        settings.database_url or "",
        "SELECT status <> 'processing' FROM batches WHERE batch_id = $1",
        batch_id,
    )
    return bool(rows and rows[0][0])


@asynccontextmanager
async def lock_held(ports: Ports, batch_id: str) -> AsyncIterator[None]:
    """Holds the batch's finalization lock in a transaction of its own, as another
    replica's finalizer would, for the block."""
    async with ports.db.transaction() as tx:
        await tx.fetchval("lock_batch", batch_id)
        yield
