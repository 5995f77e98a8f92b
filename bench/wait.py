"""`wait`: how soon `Client.wait` returns after a real service finalizes a batch.

Each round submits a one-file batch whose file takes `work_s` (the `simulate` handler),
so the waiter is already waiting when the service finalizes it; the latency is the
waiter's return (wall clock) minus the run summary's `completed_at` (the same host's
clock, set inside the finalizing transaction: an upper bound on commit -> return).
With `listen=False` the client opens its ports without LISTEN, as behind PgBouncer in
transaction mode, and falls back to polling. With `webhook`, a local receiver is
subscribed too, and the delivery latency (finalization -> its 2xx) of these one-batch-
at-a-time rounds is reported: the latency of a service that is not saturated.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg

from bench import throughput
from bench.receiver import receiving
from bench.report import note
from bench.scratch import Server, migrate, scratch
from bench.service import SWEEP_INTERVAL_S, running, service_env
from bench.sql import QUERIES
from reconciler.app import open_ports
from reconciler.client import Client, FileSpec
from reconciler.config import Settings

ROUNDS: Final = 30
WORK_S: Final = 0.2
MAX_P99_MS: Final = 100.0


@dataclass(frozen=True, slots=True)
class WaitOptions:
    rounds: int = ROUNDS
    work_s: float = WORK_S
    listen: bool = True
    log_dir: Path = Path(".")
    webhook: bool = False


async def run(server: Server, options: WaitOptions) -> dict[str, Any]:
    async with scratch(server) as place:
        migrate(place)
        env = service_env(place, "simulate", None, SWEEP_INTERVAL_S)
        settings = Settings(
            database_url=place.database_url, redis_url=place.redis_url, namespace=place.namespace
        )
        with receiving() as receiver:
            if options.webhook:
                await throughput.subscribe(place.database_url, receiver.url)
            with running(env, options.log_dir):
                latencies = await _rounds(settings, options)
                if options.webhook:
                    batches = throughput.ThroughputOptions(batches=options.rounds, files=1)
                    await throughput.wait_delivered(place.database_url, batches)
            subscribed = receiver if options.webhook else None
            delivery = await throughput.answered_ms(place.database_url, subscribed)
    return {**figures_of(options, latencies), "delivery_latency_ms": delivery}


async def _rounds(settings: Settings, options: WaitOptions) -> list[float]:
    latencies: list[float] = []
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with open_ports(settings, listen=options.listen) as ports:
            client = Client(settings, ports)
            for index in range(options.rounds):
                batch_id = f"wait-{index:04d}"
                spec = FileSpec("f", f"bench://wait/{index}", {"sleep_s": options.work_s})
                await client.submit([spec], batch_id=batch_id)
                await client.wait(batch_id, timeout_s=60.0)
                returned = time.time()
                completed = await conn.fetchval(QUERIES["completed_epoch"], batch_id)
                latencies.append(1000 * (returned - float(completed)))
        note(f"{options.rounds} waits, median {statistics.median(latencies):.1f} ms")
    finally:
        await conn.close()
    return latencies


def figures_of(options: WaitOptions, latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "benchmark": "wait",
        "listen": options.listen,
        "rounds": options.rounds,
        "latency_ms": {
            "p50": round(statistics.median(ordered), 1),
            "p99": round(p99, 1),
            "min": round(ordered[0], 1),
            "max": round(ordered[-1], 1),
        },
        "checks": {"ok": len(latencies) == options.rounds, "p99_within_100_ms": p99 <= MAX_P99_MS},
    }
