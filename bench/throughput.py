"""End to end: submit batches to a real service, wait until each is finalized.

The clock runs from the first batch created to the last run summary committed, both
read from the database, so the progress poll's period adds nothing to the figure.
With a `receiver`, its URL is subscribed as a webhook before the service starts; the
run then also waits for every delivery and reports their latency: finalization (the
event's `finalized_at`) -> the receiver's 2xx sent, and -> the delivery recorded. With
a `poster` instead, nothing is subscribed: `bench.poster` posts one event to that
receiver per finalization from a process of its own (the floor of a webhook's cost), and
the run waits until the receiver has answered every event.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from bench import cpu, profiling
from bench.errors import BenchError
from bench.poster import posting
from bench.receiver import Receiver
from bench.report import note, percentiles, progress_bar, ratio
from bench.scratch import Scratch, Server, migrate, scratch
from bench.service import SWEEP_INTERVAL_S, ServiceProcess, handler_spec, running, service_env
from bench.sql import QUERIES
from reconciler import webhooks
from reconciler.client import Client, FileSpec
from reconciler.config import Settings
from reconciler.database import Database

POLL_INTERVAL_S: Final = 0.1
HELPERS: Final = ("receiver", "poster")  # the processes besides ours a run may have
SUBMITTERS: Final = 8


@dataclass(frozen=True, slots=True)
class ThroughputOptions:
    batches: int
    files: int
    handler: str = "noop"
    concurrency: int | None = None
    replicas: int = 1
    submitters: int = SUBMITTERS
    timeout_s: float = 600.0
    log_dir: Path = Path(".")
    profile: Path | None = None
    profile_format: str = "raw"
    profile_native: bool = False
    profile_rate_hz: int = profiling.SAMPLE_RATE_HZ
    receiver: Receiver | None = None  # subscribed to batch.finalized before the run
    poster: Receiver | None = None  # posted to by bench.poster, one event a finalization


@dataclass(frozen=True, slots=True)
class Observed:
    """What the harness saw from outside while the service worked."""

    submit_s: float
    observed_wall_s: float
    peak_rss_mb: list[float]
    service_cpu_s: list[float]
    service_sys_s: list[float]
    cpu: dict[str, float | None]
    finalized_log_events: int
    polls: int


def planned(options: ThroughputOptions) -> list[tuple[str, list[FileSpec]]]:
    """Batch ids and files: `bench-000001` with files `file-000001`, ..."""
    return [
        (
            f"bench-{b:06d}",
            [FileSpec(f"file-{f:06d}", f"bench://{b}/{f}") for f in range(options.files)],
        )
        for b in range(options.batches)
    ]


async def run(server: Server, options: ThroughputOptions) -> dict[str, Any]:
    """One throughput run in a throwaway database; returns the JSON figures."""
    async with scratch(server) as place:
        migrate(place)
        if options.receiver is not None:
            await subscribe(place.database_url, options.receiver.url)
        observed = await _drive(place, options)
        return await _figures(place.database_url, options, observed)


async def _drive(place: Scratch, options: ThroughputOptions) -> Observed:
    env = service_env(place, options.handler, options.concurrency, SWEEP_INTERVAL_S)
    with running(env, options.log_dir, options.replicas) as services, ExitStack() as stack:
        note(f"service pid(s) {[s.pid for s in services]}, logs in {options.log_dir}")
        others = {}
        if (receiver := options.receiver or options.poster) is not None:
            others["receiver"] = receiver.pid
        if options.poster is not None:
            others["poster"] = stack.enter_context(posting(place.database_url, options.poster.url))
        meter = await cpu.CpuMeter.start(place.database_url, place.redis_url, others)
        started_cpu = [s.cpu_s() for s in services]
        began = time.perf_counter()
        with profiling.record(
            services[0].pid, options.profile, options.profile_format,
            options.profile_native, options.profile_rate_hz,
        ):  # fmt: skip
            submit_s, polls = await _submit_and_wait(place, options, services, meter)
        wall = time.perf_counter() - began
        used = meter.usage()
        if options.receiver is not None:
            await wait_delivered(place.database_url, options)
        if options.poster is not None:
            await wait_posted(place.database_url, options.poster, options.timeout_s)
        rss = [round(s.peak_rss_mb(), 1) for s in services]
        ended = [s.cpu_s() for s in services]
    events = sum(_finalized_events(s) for s in services)
    pairs = list(zip(started_cpu, ended, strict=True))
    spent = [round(sum(end) - sum(start), 3) for start, end in pairs]
    sys_spent = [round(end[1] - start[1], 3) for start, end in pairs]
    return Observed(submit_s, wall, rss, spent, sys_spent, used, events, polls)


async def _submit_and_wait(
    place: Scratch, options: ThroughputOptions, services: list[ServiceProcess], meter: cpu.CpuMeter
) -> tuple[float, int]:
    """Submits while watching progress; returns how long submitting took, and polls."""
    took: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_submit_all, place, options, took)
        polls = await _wait_finalized(place.database_url, options, services, meter)
    return took[0], polls


async def _submit_all(place: Scratch, options: ThroughputOptions, took: list[float]) -> None:
    work = planned(options)
    settings = Settings(
        database_url=place.database_url, redis_url=place.redis_url, namespace=place.namespace
    )
    async with Client.open(settings) as client:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for lane in range(options.submitters):
                tg.start_soon(_submit_lane, client, work[lane :: options.submitters])
        took.append(time.perf_counter() - started)


async def _submit_lane(client: Client, work: list[tuple[str, list[FileSpec]]]) -> None:
    for batch_id, files in work:
        await client.submit(files, batch_id=batch_id)


async def _wait_finalized(
    url: str, options: ThroughputOptions, services: list[ServiceProcess], meter: cpu.CpuMeter
) -> int:
    """Polls until every batch is finalized; returns how many polls that took."""
    conn = await asyncpg.connect(url)
    polls = 1
    try:
        with (
            progress_bar("finalized", options.batches) as update,
            anyio.fail_after(options.timeout_s),
        ):
            while (done := await conn.fetchval(QUERIES["finalized_count"])) < options.batches:
                update(done)
                meter.poll()
                for service in services:
                    service.check_alive()
                await anyio.sleep(POLL_INTERVAL_S)
                polls += 1
            update(done)
            return polls
    except TimeoutError:
        raise BenchError(f"not every batch finalized within {options.timeout_s:g} s") from None
    finally:
        await conn.close()


async def subscribe(url: str, webhook_url: str) -> None:
    db = await Database.connect(url, max_size=1)
    try:
        await webhooks.create(db, webhook_url)
    finally:
        await db.close()


async def wait_delivered(url: str, options: ThroughputOptions) -> None:
    """Waits until every batch's event is delivered (after the clock has stopped)."""
    conn = await asyncpg.connect(url)
    try:
        with anyio.fail_after(options.timeout_s):
            while True:
                if await conn.fetchval(QUERIES["delivered_count"]) >= options.batches:
                    return
                await anyio.sleep(POLL_INTERVAL_S)
    except TimeoutError:
        raise BenchError(f"not every event delivered within {options.timeout_s:g} s") from None
    finally:
        await conn.close()


async def wait_posted(url: str, receiver: Receiver, timeout_s: float) -> None:
    """Waits until the receiver has answered the poster's POST of every event."""
    conn = await asyncpg.connect(url)
    try:
        events = {row["event_id"] for row in await conn.fetch(QUERIES["event_ids"])}
    finally:
        await conn.close()
    try:
        with anyio.fail_after(timeout_s):
            while True:  # polling another process: there is nothing to wait on
                if events <= set(receiver.acknowledged):
                    return
                await anyio.sleep(POLL_INTERVAL_S)
    except TimeoutError:
        raise BenchError(f"not every event posted within {timeout_s:g} s") from None


def _finalized_events(service: ServiceProcess) -> int:
    return sum(1 for event in service.events() if event.get("event") == "batch_finalized")


async def _figures(url: str, options: ThroughputOptions, seen: Observed) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        totals = dict(await conn.fetchrow(QUERIES["run_totals"]) or {})
        latency = await conn.fetch(QUERIES["latency_by_trigger"])
        wall_s = float(await conn.fetchval(QUERIES["run_wall_s"]) or 0.0)
        scans = {row["table"]: _plain(row) for row in await conn.fetch(QUERIES["table_scans"])}
        activity = _plain(await conn.fetchrow(QUERIES["database_activity"]) or {})
        delivery = dict(await conn.fetchrow(QUERIES["delivery_latency"]) or {})
    finally:
        await conn.close()
    files = options.batches * options.files
    return {
        "benchmark": "throughput",
        "handler": handler_spec(options.handler),
        "replicas": options.replicas,
        "concurrency": options.concurrency,
        "batches": options.batches,
        "files": files,
        "files_per_s": ratio(files, wall_s),
        "wall_s": round(wall_s, 3),
        "observed_wall_s": round(seen.observed_wall_s, 3),
        "submit_s": round(seen.submit_s, 3),
        "submit_files_per_s": ratio(files, seen.submit_s),
        "finalize_latency_ms": {row["trigger"]: _latency(row) for row in latency},
        "peak_rss_mb": max(seen.peak_rss_mb),
        "peak_rss_mb_per_replica": seen.peak_rss_mb,
        "service_cpu_s": seen.service_cpu_s,
        "service_sys_s": seen.service_sys_s,
        "cpu": {**seen.cpu, "others_s": _others_s(seen)},
        "cpu_us_per_file": _per_file_us(seen, files),
        "table_scans": scans,
        "database_activity": {**activity, "harness_polls": seen.polls},
        "per_file": _per_file(activity, seen.polls, files),
        "webhook": options.receiver is not None,
        "delivery_latency_ms": await answered_ms(url, options.receiver),
        "delivery_recorded_ms": _latency(delivery) if delivery.get("n") else None,
        "checks": checks(totals, options, seen.finalized_log_events, int(delivery.get("n") or 0)),
        "logs": str(options.log_dir),
    }


async def answered_ms(url: str, receiver: Receiver | None) -> dict[str, float | int] | None:
    """Finalization -> the receiver's 2xx, per delivered event it answered, in ms."""
    if receiver is None:
        return None
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(QUERIES["delivered_events"])
    finally:
        await conn.close()
    answered = receiver.answered_at
    return percentiles(
        [
            1000 * (answered[r["event_id"]] - r["finalized_s"])
            for r in rows
            if r["event_id"] in answered
        ]
    )


def _others_s(seen: Observed) -> float | None:
    """Busy core-seconds of the host not spent by the service, servers or harness."""
    parts = [seen.cpu["postgres_s"], seen.cpu["redis_s"], seen.cpu["harness_s"]]
    parts += [seen.cpu.get(f"{name}_s") or 0.0 for name in HELPERS]
    busy = seen.cpu["host_busy_s"]
    if busy is None or any(part is None for part in parts):
        return None
    return round(busy - sum(p or 0.0 for p in parts) - sum(seen.service_cpu_s), 3)


def _per_file_us(seen: Observed, files: int) -> dict[str, float | None]:
    """CPU microseconds per file by program: steadier than files/s on a shared host."""
    spent = {
        "service": sum(seen.service_cpu_s),
        "postgres": seen.cpu["postgres_s"],
        "redis": seen.cpu["redis_s"],
        "harness": seen.cpu["harness_s"],
    }
    for name in HELPERS:  # a run with a webhook receiver, or a poster
        if seen.cpu.get(f"{name}_s") is not None:
            spent[name] = seen.cpu[f"{name}_s"]
    return {k: None if v is None else round(1e6 * v / files, 1) for k, v in spent.items()}


def _per_file(activity: dict[str, int], polls: int, files: int) -> dict[str, float]:
    """Commits and row updates per file; the harness's polls are taken out."""
    return {
        "commits": round((activity.get("xact_commit", 0) - polls) / files, 3),
        "rows_updated": round(activity.get("tup_updated", 0) / files, 3),
        "rows_inserted": round(activity.get("tup_inserted", 0) / files, 3),
    }


def _plain(row: Any) -> dict[str, int]:
    return {key: int(value or 0) for key, value in row.items() if key != "table"}


def _latency(row: Any) -> dict[str, float | int]:
    return {
        "p50": round(row["p50"], 3),
        "p99": round(row["p99"], 3),
        "max": round(row["max"], 3),
        "n": int(row["n"]),
    }


def checks(
    totals: dict[str, Any], options: ThroughputOptions, log_events: int, delivered: int = 0
) -> dict[str, Any]:
    """Every batch finalized exactly once, with every file counted once (and, with a
    webhook, every batch's event delivered once)."""
    files = options.batches * options.files
    found = {key: int(value) for key, value in totals.items()}
    found["finalized_log_events"] = log_events
    found["delivered"] = delivered
    wanted_deliveries = options.batches if options.receiver is not None else 0
    found["ok"] = (
        found["batches"] == options.batches
        and found["summaries"] == options.batches
        and found["unfinalized"] == 0
        and found["summary_files"] == files
        and found["summary_files_done"] == files
        and found["files_unfinished"] == 0
        and delivered == wanted_deliveries
    )
    return found
