"""The harness's CPU meter finds the backends of its own database, and only those."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from bench.cpu import CpuMeter, host_times


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


def test_stolen_time_is_neither_busy_nor_idle() -> None:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal guest...;
    busy is everything but idle, iowait and steal, and steal is reported on its own."""
    stat = "cpu  100 10 50 700 40 5 5 90 20 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n"
    busy, steal, total = host_times(stat, 10)
    assert (busy, steal, total) == (17.0, 9.0, 100.0)
