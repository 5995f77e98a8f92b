"""One sweep pass over a large history, against the same pass over an empty one, and
retention deleting that history.

Two throwaway databases hold the same few unfinished batches, none due for repair, so
every pass does the same work; one of them also holds the history (finalized batches,
their files, run summaries and events, generated in SQL, finalized `history_age_days`
ago). A
pass is timed by the sweeper's own SweepReport, the median of many after a warm-up,
alternating between three sweepers: the empty database with retention on, the history
with retention off (RECONCILER_RETENTION_DAYS=0) and the history with retention on
(`retention_days`, longer than the history's age: the steady state of a database kept
at its retention, where nothing is due yet). Then, unless `drain` is off, a sweeper
with a retention of one day deletes the whole history pass after pass, back to back,
and the passes after it are timed again, before and after a VACUUM (what autovacuum
does soon after such a delete).
"""

from __future__ import annotations

import dataclasses
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from bench.errors import BenchError
from bench.report import note, ratio, spread_ms
from bench.scratch import Scratch, Server, migrate, scratch
from bench.sql import QUERIES as BENCH_QUERIES
from reconciler.actors.sweeper import SWEEP_BATCH_LIMIT, Sweeper
from reconciler.app import open_ports
from reconciler.config import Settings
from reconciler.queries import QUERIES
from reconciler.retention import CHUNK_BATCHES as RETENTION_CHUNK_BATCHES
from reconciler.retention import CHUNK_FILES as RETENTION_CHUNK_FILES
from reconciler.retention import FROM_THE_START, STATEMENTS_PER_PASS

HISTORY_BATCHES: Final = 1_000_000
HISTORY_FILES: Final = 10_000_000
UNFINISHED_BATCHES: Final = 20
UNFINISHED_FILES: Final = 30
PASSES: Final = 20
WARMUP_PASSES: Final = 3
CHUNK_BATCHES: Final = 100_000
HISTORY_AGE_DAYS: Final = 20
RETENTION_DAYS: Final = 30
DRAIN_RETENTION_DAYS: Final = 1
_EXECUTION: Final = re.compile(r"Execution Time: ([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class SweepOptions:
    history_batches: int = HISTORY_BATCHES
    history_files: int = HISTORY_FILES
    unfinished_batches: int = UNFINISHED_BATCHES
    unfinished_files: int = UNFINISHED_FILES
    passes: int = PASSES
    chunk_batches: int = CHUNK_BATCHES
    history_age_days: int = HISTORY_AGE_DAYS
    retention_days: int = RETENTION_DAYS
    drain: bool = True

    def check(self) -> None:
        if self.retention_days <= self.history_age_days:
            raise BenchError("--retention-days must exceed --history-age-days (nothing due)")
        if self.history_age_days <= DRAIN_RETENTION_DAYS:
            raise BenchError(f"--history-age-days must exceed {DRAIN_RETENTION_DAYS}")


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
        "delete_expired_batches": (
            settings.retention_days,
            RETENTION_CHUNK_BATCHES,
            RETENTION_CHUNK_FILES,
            FROM_THE_START,
        ),
    }


async def run(server: Server, options: SweepOptions) -> dict[str, Any]:
    options.check()
    async with scratch(server, "bench_empty") as empty, scratch(server, "bench_hist") as full:
        migrate(empty)
        migrate(full)
        fill_s = await fill_history(full.database_url, options)
        for place in (empty, full):
            await _seed(place.database_url, options)
        days = options.retention_days
        kept = [_settings(empty, days), _settings(full, 0), _settings(full, days)]
        timed = await _time_interleaved(kept, options.passes)
        plans = [await explain_all(kept[0]), await explain_all(kept[2])]
        drained = await drain(full, options) if options.drain else None
    empty_m, off_m, on_m = (Measured(s, r, {}) for s, r in timed)
    return _result(
        options, fill_s, dataclasses.replace(empty_m, plans=plans[0]),
        dataclasses.replace(off_m, plans=plans[1]), on_m, drained,
    )  # fmt: skip


def _result(
    options: SweepOptions,
    fill_s: float,
    empty: Measured,
    full: Measured,
    kept: Measured,
    drained: dict[str, Any] | None,
) -> dict[str, Any]:
    empty_ms, history_ms = spread_ms(empty.durations_s), spread_ms(full.durations_s)
    retention_ms = spread_ms(kept.durations_s)
    repairs = {"empty": empty.repairs, "history": full.repairs, "retention": kept.repairs}
    ok = not (empty.repairs or full.repairs or kept.repairs)
    return {
        "benchmark": "sweep",
        "history_batches": options.history_batches,
        "history_files": options.history_files,
        "history_age_days": options.history_age_days,
        "retention_days": options.retention_days,
        "unfinished_batches": options.unfinished_batches,
        "unfinished_files": options.unfinished_files,
        "passes": options.passes,
        "fill_s": round(fill_s, 1),
        "empty_ms": empty_ms,
        "history_ms": history_ms,
        "history_retention_ms": retention_ms,
        "ratio": ratio(history_ms["median"], empty_ms["median"]),
        "retention_ratio": ratio(retention_ms["median"], history_ms["median"]),
        "deletion": drained,
        "plans": {"empty": empty.plans, "history": full.plans},
        "checks": {
            "repairs": repairs,
            "deletion": None if drained is None else drained["checks"],
            "ok": ok and (drained is None or drained["checks"]["ok"]),
        },
    }


async def drain(place: Scratch, options: SweepOptions) -> dict[str, Any]:
    """Retention of one day: passes back to back until the whole history is deleted,
    then `passes` more timed over the emptied table, before and after a VACUUM."""
    # Only retention is due: the seeded pending files have no job on the stream, and
    # would come due for the re-enqueue pass once the visibility timeout has passed.
    settings = dataclasses.replace(
        _settings(place, DRAIN_RETENTION_DAYS), visibility_timeout_s=86_400.0
    )
    conn = await asyncpg.connect(place.database_url)
    try:
        args = sweeper_parameters(settings)["delete_expired_batches"]
        plan = await explain(conn, "delete_expired_batches", args)
    finally:
        await conn.close()
    pass_s: list[float] = []
    deleted, other = 0, dict[str, int]()
    async with open_ports(settings) as ports:
        await ports.queue.take_recovery()
        sweeper = Sweeper(settings, ports.db, ports.queue)
        started = time.perf_counter()
        while True:
            report = await sweeper.sweep_once()
            gone = report.repairs.pop("retention_deleted", 0)
            _tally(report.repairs, other)
            if not gone:
                break
            deleted += gone
            pass_s.append(report.duration_s)
            if len(pass_s) % 20 == 0:
                note(f"retention: {deleted:,} of {options.history_batches:,} batches deleted "
                     f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        drain_s = sum(pass_s)
    after = await _time_interleaved([settings], options.passes)
    note("retention: VACUUM (ANALYZE)")
    await _vacuum(place.database_url)
    vacuumed = await _time_interleaved([settings], options.passes)
    left = await _history_left(place.database_url)
    open_files = options.unfinished_files * options.unfinished_batches
    files = options.history_files - (left["file_rows"] - open_files)
    bound = RETENTION_CHUNK_BATCHES * STATEMENTS_PER_PASS
    return {
        "batches": deleted,
        "files": files,
        "passes": len(pass_s),
        "seconds": round(drain_s, 1),
        "batches_per_s": round(deleted / drain_s) if drain_s else None,
        "files_per_s": round(files / drain_s) if drain_s else None,
        "per_pass_bound": bound,
        "deleting_pass_ms": spread_ms(pass_s) if pass_s else None,
        "after_ms": spread_ms(after[0][0]),
        "after_vacuum_ms": spread_ms(vacuumed[0][0]),
        "plan": plan,
        "checks": {
            "history_left": left["batches"],
            "unfinalized": left["unfinalized"],
            "other_repairs": other,
            "ok": left["batches"] == 0
            and deleted == options.history_batches
            and left["unfinalized"] == options.unfinished_batches
            and not other
            and not after[0][1]
            and not vacuumed[0][1],
        },
    }


async def _vacuum(url: str) -> None:
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        await conn.execute(BENCH_QUERIES["vacuum_analyze"])
    finally:
        await conn.close()


async def _history_left(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        row = await conn.fetchrow(BENCH_QUERIES["history_left"])
    finally:
        await conn.close()
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}


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
        age = options.history_age_days
        await conn.execute(BENCH_QUERIES["fill_batches"], low, high, per_batch, extra, age)
        await conn.execute(BENCH_QUERIES["fill_files"], low, high, per_batch, extra, age)
        await conn.execute(BENCH_QUERIES["fill_summaries"], low, high)
        await conn.execute(BENCH_QUERIES["fill_events"], low, high)


def _settings(place: Scratch, retention_days: int) -> Settings:
    return Settings(
        database_url=place.database_url,
        redis_url=place.redis_url,
        namespace=place.namespace,
        retention_days=retention_days,
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


async def explain_all(settings: Settings) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return {
            name: await explain(conn, name, args)
            for name, args in sweeper_parameters(settings).items()
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
