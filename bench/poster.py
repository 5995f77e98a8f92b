"""A process that only posts: one signed event to the receiver per finalization heard.

It is the floor of what a webhook can cost on this host. No webhook is subscribed, so
the service writes no delivery and makes no attempt; this process LISTENs on the
finalizations' channel and, for each one, posts a `batch.finalized` event of the same
size (a 50-file run summary) through the service's own `WebhookSender`, at most as many
at once as the delivery actor makes. The POST's system calls, the loopback's TCP work
and the receiver's are then spent as a delivery would spend them, and nothing else is:
no row written, no lease, no log line. `webhook --floor` runs it as a third side.

Run as `python -m bench.poster DATABASE_URL RECEIVER_URL`; it prints `ready` once it
listens, and stops on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import anyio
import asyncpg

from bench.post import STAMP, SUMMARY
from bench.receiver import helper
from reconciler.actors.delivery import DELIVERY_CONCURRENCY
from reconciler.delivery import FINALIZED_TYPE, Claimed, Event, Sink
from reconciler.sinks import WebhookSender, http_client
from reconciler.webhooks import new_secret

CHANNEL: Final = "reconciler_finalized"
TIMEOUT_S: Final = 10.0


@contextmanager
def posting(database_url: str, receiver_url: str) -> Iterator[int]:
    """A poster process for the block; yields its pid."""
    with helper("bench.poster", database_url, receiver_url) as (pid, line):
        if line != "ready":
            raise RuntimeError(f"the poster did not start: {line!r}")
        yield pid


async def _post_each(database_url: str, receiver_url: str) -> None:
    secret = new_secret()
    send, heard = anyio.create_memory_object_stream[str](max_buffer_size=1 << 20)

    def on_finalized(payload: object) -> None:
        send.send_nowait(json.loads(str(payload))["event_id"])

    conn = await asyncpg.connect(database_url)
    await conn.add_listener(CHANNEL, lambda _c, _p, _ch, payload: on_finalized(payload))
    limiter = anyio.Semaphore(DELIVERY_CONCURRENCY)
    async with http_client() as http, anyio.create_task_group() as tg:
        sender = WebhookSender(http, TIMEOUT_S)

        async def post(event_id: str) -> None:
            event = Event(event_id, FINALIZED_TYPE, "bench", STAMP, SUMMARY)
            claimed = Claimed(
                0, Sink.WEBHOOK, 1, event, "poster", "wh_poster", receiver_url, secret
            )
            try:
                await sender.send(claimed)
            finally:
                limiter.release()

        async def stop() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()

        tg.start_soon(stop)
        print("ready", flush=True)
        async with heard:
            async for event_id in heard:
                await limiter.acquire()
                tg.start_soon(post, event_id)


def main(argv: list[str]) -> None:
    database_url, receiver_url = argv
    options: dict[str, Any] = {"use_uvloop": True}  # as the service runs
    anyio.run(_post_each, database_url, receiver_url, backend_options=options)


if __name__ == "__main__":
    main(sys.argv[1:])
