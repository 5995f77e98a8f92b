"""Submitting one large batch: rows created and every job enqueued, timed from outside."""

from __future__ import annotations

import statistics
import time
from typing import Any, Final

import asyncpg

from bench.report import note, ratio
from bench.scratch import Scratch, Server, migrate, scratch
from bench.sql import QUERIES
from reconciler.client import Client, FileSpec
from reconciler.config import Settings
from reconciler.queue import JobQueue

FILES: Final = 10_000
REPEAT: Final = 3


def batch(files: int, run: int) -> list[FileSpec]:
    return [FileSpec(f"file-{i:06d}", f"bench://submit/{run}/{i}") for i in range(files)]


async def run(server: Server, files: int, repeat: int) -> dict[str, Any]:
    async with scratch(server) as place:
        migrate(place)
        timings = await _submit_each(place, files, repeat)
        enqueued, stream = await _counted(place)
    median = statistics.median(timings)
    return {
        "benchmark": "submit",
        "files": files,
        "repeat": repeat,
        "seconds": [round(t, 3) for t in timings],
        "median_s": round(median, 3),
        "files_per_s": ratio(files, median),
        "checks": _checks(files * repeat, enqueued, stream),
    }


async def _submit_each(place: Scratch, files: int, repeat: int) -> list[float]:
    settings = Settings(
        database_url=place.database_url, redis_url=place.redis_url, namespace=place.namespace
    )
    timings = []
    async with Client.open(settings) as client:
        for index in range(repeat):
            specs = batch(files, index)
            started = time.perf_counter()
            await client.submit(specs, batch_id=f"submit-{index}")
            timings.append(time.perf_counter() - started)
            note(f"submitted {files} files in {timings[-1]:.3f} s")
    return timings


async def _counted(place: Scratch) -> tuple[int, int]:
    """Files with a job id in Postgres, and jobs on the stream in Redis."""
    conn = await asyncpg.connect(place.database_url)
    try:
        enqueued = int(await conn.fetchval(QUERIES["jobs_enqueued"]))
    finally:
        await conn.close()
    queue = JobQueue.connect(place.redis_url, place.namespace)
    try:
        return enqueued, await queue.length()
    finally:
        await queue.close()


def _checks(expected: int, enqueued: int, stream: int) -> dict[str, Any]:
    return {
        "files_pending": enqueued,
        "jobs_on_stream": stream,
        "ok": enqueued == expected and stream == expected,
    }
