"""The harness's CPU meter finds the backends of its own database, and only those."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from bench.cpu import CpuMeter


async def test_backends_of_the_run_database_are_counted_and_others_not(
    database_url: str,
) -> None:
    database = urlsplit(database_url).path.lstrip("/")
    meter = CpuMeter(database, None)  # started before the backend exists, as in a run
    other = CpuMeter(f"{database}_other", None)
    conn = await asyncpg.connect(database_url)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        meter.poll()
        other.poll()
        meter.poll()  # a remembered title: still counted
    finally:
        await conn.close()
    assert pid in meter.backend_pids
    assert pid not in other.backend_pids
    assert meter.usage()["postgres_s"] is not None
