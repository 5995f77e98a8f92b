"""One sweep pass over a large history, against the same pass over an empty one.

Two throwaway databases hold the same few unfinished batches, none due for repair, so
every pass does the same work; one of them also holds the history (finalized batches,
their files and run summaries, generated in SQL). A pass is timed by the sweeper's own
SweepReport, the median of many after a warm-up, alternating between the databases.
"""

from __future__ import annotations

import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from bench.report import note, ratio, spread_ms
from bench.scratch import Scratch, Server, migrate, scratch
from bench.sql import QUERIES as BENCH_QUERIES
from reconciler.actors.sweeper import SWEEP_BATCH_LIMIT, Sweeper
from reconciler.app import open_ports
from reconciler.config import Settings
from reconciler.queries import QUERIES

HISTORY_BATCHES: Final = 1_000_000
HISTORY_FILES: Final = 10_000_000
UNFINISHED_BATCHES: Final = 20
UNFINISHED_FILES: Final = 30
PASSES: Final = 20
WARMUP_PASSES: Final = 3
CHUNK_BATCHES: Final = 100_000
_EXECUTION: Final = re.compile(r"Execution Time: ([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class SweepOptions:
    history_batches: int = HISTORY_BATCHES
    history_files: int = HISTORY_FILES
    unfinished_batches: int = UNFINISHED_BATCHES
    unfinished_files: int = UNFINISHED_FILES
    passes: int = PASSES
    chunk_batches: int = CHUNK_BATCHES


@dataclass(frozen=True, slots=True)
class Measured:
    durations_s: list[float]
    repairs: dict[str, int]
    plans: dict[str, dict[str, Any]]


def sweeper_parameters(settings: Settings) -> dict[str, tuple[Any, ...]]:
    """Each query of a sweep pass with the arguments Sweeper passes it."""
    requeue_grace_s = max(settings.visibility_timeout_s, settings.stuck_grace_s)
    return {
        "expired_leases": (settings.max_attempts, SWEEP_BATCH_LIMIT),
        "exhausted_leases": (settings.max_attempts, SWEEP_BATCH_LIMIT),
        "claim_unqueued_files": (requeue_grace_s, SWEEP_BATCH_LIMIT),
        "deadline_batches": (SWEEP_BATCH_LIMIT,),
        "stuck_batches": (settings.stuck_grace_s, SWEEP_BATCH_LIMIT),
    }


async def run(server: Server, options: SweepOptions) -> dict[str, Any]:
    async with scratch(server, "bench_empty") as empty, scratch(server, "bench_hist") as full:
        migrate(empty)
        migrate(full)
        fill_s = await fill_history(full.database_url, options)
        for place in (empty, full):
            await _seed(place.database_url, options)
        timed = await _time_interleaved([_settings(empty), _settings(full)], options.passes)
        plans = [await explain_all(place) for place in (empty, full)]
    (empty_s, empty_repairs), (full_s, full_repairs) = timed
    return _result(
        options, fill_s,
        Measured(empty_s, empty_repairs, plans[0]), Measured(full_s, full_repairs, plans[1]),
    )  # fmt: skip


def _result(
    options: SweepOptions, fill_s: float, empty: Measured, full: Measured
) -> dict[str, Any]:
    empty_ms, history_ms = spread_ms(empty.durations_s), spread_ms(full.durations_s)
    repairs = {"empty": empty.repairs, "history": full.repairs}
    return {
        "benchmark": "sweep",
        "history_batches": options.history_batches,
        "history_files": options.history_files,
        "unfinished_batches": options.unfinished_batches,
        "unfinished_files": options.unfinished_files,
        "passes": options.passes,
        "fill_s": round(fill_s, 1),
        "empty_ms": empty_ms,
        "history_ms": history_ms,
        "ratio": ratio(history_ms["median"], empty_ms["median"]),
        "plans": {"empty": empty.plans, "history": full.plans},
        "checks": {"repairs": repairs, "ok": not (empty.repairs or full.repairs)},
    }


async def fill_history(url: str, options: SweepOptions) -> float:
    """Finalized batches, files and summaries, chunk by chunk; then VACUUM ANALYZE."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        for low in range(1, options.history_batches + 1, options.chunk_batches):
            high = min(options.history_batches, low + options.chunk_batches - 1)
            await _fill_chunk(conn, low, high, options)
            note(f"history: {high:,} of {options.history_batches:,} batches "
                 f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        note("history: VACUUM (ANALYZE)")
        await conn.execute(BENCH_QUERIES["vacuum_analyze"])
    finally:
        await conn.close()
    return time.perf_counter() - started


async def _fill_chunk(conn: asyncpg.Connection, low: int, high: int, options: SweepOptions) -> None:
    per_batch, extra = divmod(options.history_files, options.history_batches)
    async with conn.transaction():
        await conn.execute(BENCH_QUERIES["fill_batches"], low, high, per_batch, extra)
        await conn.execute(BENCH_QUERIES["fill_files"], low, high, per_batch, extra)
        await conn.execute(BENCH_QUERIES["fill_summaries"], low, high)


def _settings(place: Scratch) -> Settings:
    return Settings(
        database_url=place.database_url, redis_url=place.redis_url, namespace=place.namespace
    )


async def _seed(url: str, options: SweepOptions) -> None:
    """The same unfinished batches in each database, none due for repair."""
    count, files = options.unfinished_batches, options.unfinished_files
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(BENCH_QUERIES["seed_unfinished_batches"], count, files)
            await conn.execute(BENCH_QUERIES["seed_unfinished_files"], count, files)
        await conn.execute(BENCH_QUERIES["analyze"])
    finally:
        await conn.close()


async def _time_interleaved(
    every: list[Settings], passes: int
) -> list[tuple[list[float], dict[str, int]]]:
    """Passes alternate between the databases, so noise on a shared host hits both."""
    results: list[tuple[list[float], dict[str, int]]] = [([], {}) for _ in every]
    async with AsyncExitStack() as stack:
        sweepers = []
        for settings in every:
            ports = await stack.enter_async_context(open_ports(settings))
            # The seeded files stand for jobs waiting on an intact stream: what is timed
            # is the steady pass, not the one-off recovery after Redis lost its data.
            await ports.queue.take_recovery()
            sweepers.append(Sweeper(settings, ports.db, ports.queue))
        for index in range(WARMUP_PASSES + passes):
            for sweeper, (durations, repairs) in zip(sweepers, results, strict=True):
                report = await sweeper.sweep_once()
                _tally(report.repairs, repairs)
                if index >= WARMUP_PASSES:
                    durations.append(report.duration_s)
    return results


def _tally(found: dict[str, int], total: dict[str, int]) -> None:
    for kind, count in found.items():
        total[kind] = total.get(kind, 0) + count


async def explain_all(place: Scratch) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(place.database_url)
    try:
        return {
            name: await explain(conn, name, args)
            for name, args in sweeper_parameters(_settings(place)).items()
        }
    finally:
        await conn.close()


async def explain(conn: asyncpg.Connection, name: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of one service query, rolled back: it may write."""
    tx = conn.transaction()
    await tx.start()
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS)\n" + QUERIES[name], *args)
    finally:
        await tx.rollback()
    plan = [row[0] for row in rows]
    found = _EXECUTION.search("\n".join(plan))
    note(f"plan of {name}:\n" + "\n".join(plan))
    return {"execution_ms": float(found.group(1)) if found else None, "plan": plan}
