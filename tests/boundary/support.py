"""What the boundary tests share: replicas by role, handler journals, rows, Redis peeks.

Every helper looks from the outside (Postgres rows, Redis keys, journals, process
logs), so the tests hold whatever the service does inside.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, NamedTuple

import anyio
import redis.asyncio as aioredis

from reconciler.app import Ports, open_ports
from reconciler.config import Settings
from tests.acceptance.processes import ServiceProcess
from tests.chaos.harness import read_events, wait_for_event
from tests.helpers import sql, wait_for

SETTINGS: Final = {
    "RECONCILER_HANDLER": "tests.chaos.handlers:workload",
    "RECONCILER_CONCURRENCY": "4",
    "RECONCILER_VISIBILITY_TIMEOUT_S": "2",
    "RECONCILER_SWEEP_INTERVAL_S": "0.5",
    "RECONCILER_STUCK_GRACE_S": "1",
    "RECONCILER_FILE_TIMEOUT_S": "30",
    "RECONCILER_MAX_ATTEMPTS": "3",
    "RECONCILER_DRAIN_TIMEOUT_S": "5",
    "RECONCILER_STATS_INTERVAL_S": "0.5",
}
STEADY: Final = "tests.boundary.handlers:steady"
EXIT_TIMEOUT_S: Final = 20.0
SETTLE_TIMEOUT_S: Final = 30.0


def work(journal: Path, seconds: float) -> dict[str, Any]:
    """A `workload` payload: runs `seconds`, never fails, journals every call."""
    return {"min_s": seconds, "max_s": seconds, "fail_rate": 0.0, "journal": str(journal)}


# -- processes -------------------------------------------------------------------------


@dataclass
class Replicas:
    """`reconciler run` processes by role; each start writes its own log."""

    env: dict[str, str]
    log_dir: Path
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(self, role: str = "all", env: dict[str, str] | None = None) -> ServiceProcess:
        log = self.log_dir / f"run-{len(self.processes)}-{role}.log"
        process = ServiceProcess(env or self.env, log, "--role", role)
        self.processes.append(process)
        return process

    async def up(self, role: str = "all", env: dict[str, str] | None = None) -> ServiceProcess:
        """Starts one and waits until it serves (and, with a worker, reads jobs)."""
        process = self.start(role, env)
        await wait_for_event(process, "service_started")
        if role in ("all", "worker"):
            await wait_for_event(process, "consumer_started")
        return process

    def close(self) -> None:
        for process in self.processes:
            process.close()


async def stop(process: ServiceProcess, signum: signal.Signals) -> int:
    """Sends the signal and returns the exit code."""
    process.signal(signum)
    return await anyio.to_thread.run_sync(process.wait, EXIT_TIMEOUT_S)


def events(process: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in read_events(process.log_path) if e.get("event") == name]


def consumer_of(process: ServiceProcess) -> str:
    found = events(process, "consumer_started")
    assert found, f"{process.log_path.name} started no consumer"
    return str(found[-1]["consumer"])


# -- the handler journal ---------------------------------------------------------------


class Call(NamedTuple):
    batch_id: str
    file_id: str
    attempt: int
    pid: int


def calls(journal: Path) -> list[Call]:
    """Every handler call, in the order they were journaled."""
    if not journal.exists():
        return []
    rows = [line.split("\t") for line in journal.read_text().splitlines() if line]
    return [Call(b, f, int(a), int(p)) for b, f, a, p in rows]


async def journal_grows(journal: Path, beyond: int, timeout_s: float = 20.0) -> list[Call]:
    """Waits until the handler has been called more than `beyond` times."""

    async def grown() -> list[Call] | None:
        found = calls(journal)
        return found if len(found) > beyond else None

    return await wait_for(grown, timeout_s=timeout_s, what=f"handler call #{beyond + 1}")


# -- Postgres --------------------------------------------------------------------------


async def files_of(database_url: str, batch_id: str) -> dict[str, dict[str, Any]]:
    """Each file's status, attempts and error, by file id."""
    rows = await sql(
        database_url,
        "SELECT file_id, status, attempts, error FROM batch_files WHERE batch_id = $1",
        batch_id,
    )
    return {r["file_id"]: dict(r) for r in rows}


async def settled(database_url: str, batch_id: str, timeout_s: float = SETTLE_TIMEOUT_S) -> str:
    """Waits until the batch is finalized; returns its status."""

    async def status() -> str | None:
        rows = await sql(database_url, "SELECT status FROM batches WHERE batch_id = $1", batch_id)
        return None if not rows or rows[0][0] == "processing" else str(rows[0][0])

    try:
        return await wait_for(status, timeout_s=timeout_s, what=f"batch {batch_id} finalized")
    except AssertionError as exc:
        files = await files_of(database_url, batch_id)
        raise AssertionError(f"{exc}; its files: {sorted(files.values(), key=str)}") from None


async def age_pending(database_url: str) -> None:
    """Makes every pending file look enqueued an hour ago (past any grace period)."""
    await sql(
        database_url,
        "UPDATE batch_files SET enqueued_at = now() - interval '1 hour' WHERE status = 'pending'",
    )


# -- Redis -----------------------------------------------------------------------------


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def stream_jobs(url: str, namespace: str) -> list[bytes]:
    """The `job` field of every entry on the job stream, in stream order."""
    async with redis_client(url) as client:
        entries: Any = await client.xrange(f"{namespace}:jobs")
    return [fields[b"job"] for _, fields in entries if b"job" in fields]


def job_file_ids(jobs: list[bytes]) -> list[str]:
    return [str(json.loads(job)["file_id"]) for job in jobs]


async def drop_namespace(url: str, namespace: str) -> None:
    """Deletes every key of the namespace: Redis lost the jobs."""
    async with redis_client(url) as client:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)


async def consumers(url: str, namespace: str) -> list[str]:
    """The consumer names the group holds."""
    async with redis_client(url) as client:
        found = await client.xinfo_consumers(f"{namespace}:jobs", f"{namespace}:workers")
    return sorted(c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in found)


@asynccontextmanager
async def ports_on(settings: Settings, redis_url: str) -> AsyncIterator[Ports]:
    """The service's ports for this test's database and another Redis."""
    async with open_ports(replace(settings, redis_url=redis_url), listen=True) as ports:
        await ports.queue.ensure_group()
        yield ports
