"""`post`: the service's CPU per webhook POST, without Postgres or Redis in the way.

One process posts signed `batch.finalized` events (a 50-file run summary as data) to the
benchmark's receiver (a process of its own), a few at a time as the delivery actor does,
through the same `WebhookSender`, and reports the CPU time it spent per POST in each
round. A check that every POST was answered 2xx guards the figure.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import anyio

from bench.receiver import receiving
from reconciler.delivery import Claimed, Event, Sink
from reconciler.sinks import WebhookSender, http_client
from reconciler.webhooks import new_secret

WARMUP: Final = 50
POSTS: Final = 2000
CONCURRENCY: Final = 4  # POSTs in flight, as a few delivery slots in use
ROUNDS: Final = 3
STAMP: Final = "2026-12-02T17:08:28.128347+00:00"
SUMMARY: Final[dict[str, Any]] = {
    "batch_id": "bench-000123", "run_id": "run-1", "status": "completed",
    "finalized_by": "event", "total_files": 50, "files_succeeded": 50, "files_failed": 0,
    "created_at": STAMP, "first_file_started_at": STAMP, "last_file_completed_at": STAMP,
    "completed_at": STAMP, "errors": [], "totals": {"attempt": 50}, "metadata": {},
    "processing_seconds": {
        "count": 50, "sum": 0.01, "mean": 0.0002, "p50": 0.0001, "p95": 0.0003, "max": 0.001,
    },
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PostOptions:
    posts: int = POSTS
    concurrency: int = CONCURRENCY
    rounds: int = ROUNDS
    timeout_s: float = 10.0


async def run(options: PostOptions) -> dict[str, Any]:
    with receiving() as receiver:
        secret = new_secret()
        async with http_client() as http:
            sender = WebhookSender(http, options.timeout_s)

            def claimed(n: int) -> Claimed:
                event_id = f"evt_{uuid.uuid4().hex}"
                event = Event(event_id, "batch.finalized", "bench-000123", STAMP, SUMMARY)
                return Claimed(n, Sink.WEBHOOK, 1, event, "bench", "wh_bench", receiver.url, secret)

            answered = [await _posted(sender, [claimed(n) for n in range(WARMUP)], 1)]
            per_post = []
            for _ in range(options.rounds):
                items = [claimed(n) for n in range(options.posts)]
                started = time.process_time()
                answered.append(await _posted(sender, items, options.concurrency))
                per_post.append((time.process_time() - started) / options.posts * 1e6)
    delivered = sum(answered)
    wanted = WARMUP + options.rounds * options.posts
    return {
        "benchmark": "post",
        "posts": options.posts,
        "concurrency": options.concurrency,
        "cpu_us_per_post": [round(v, 1) for v in per_post],
        "cpu_us_per_post_median": round(statistics.median(per_post), 1),
        "checks": {"delivered": delivered, "wanted": wanted, "ok": delivered == wanted},
    }


async def _posted(sender: WebhookSender, items: list[Claimed], concurrency: int) -> int:
    """Posts every item, `concurrency` at a time; how many were answered 2xx."""
    limiter = anyio.Semaphore(concurrency)
    delivered = 0

    async def one(item: Claimed) -> None:
        nonlocal delivered
        async with limiter:
            attempt = await sender.send(item)
        delivered += attempt.delivered  # after the await: no other task's count is lost

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
    return delivered
