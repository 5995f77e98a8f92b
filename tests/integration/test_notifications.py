"""LISTEN/NOTIFY wake-ups: waiters and the delivery actor react to a commit at once.

Latencies are measured from the finalizing commit (`finalize` returned) to the
waiter's return or the receiver's arrival time, and printed (`pytest -s` shows them);
the bounds asserted are generous, but far below every polling interval involved.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import anyio

from reconciler.actors.delivery import Deliverer
from reconciler.app import Ports, open_ports
from reconciler.client import Client
from reconciler.config import Settings
from reconciler.finalization import Outcome, finalize
from reconciler.notifications import Kind, Notifications
from tests.acceptance.processes import reconciler_command, with_env
from tests.delivery_support import subscribe
from tests.helpers import files, record, sql, submit, wait_for
from tests.receiver import always, receiving

ROUNDS = 5
WAIT_BOUND_S = 0.3  # Client.wait's own re-check is 1 s: only a notification is faster
CLI_BOUND_S = 0.6  # the CLI also closes its pool and Redis client before printing
DELIVERY_POLL_S = 30.0
STOP_BOUND_S = 1.0  # the connect timeout is 5 s


async def ready_batch(ports: Ports, count: int = 2) -> str:
    """A batch whose files are all recorded, so the next `finalize` finalizes it."""
    batch = await submit(ports, files(count))
    await record(ports, batch.batch_id, [f.file_id for f in files(count)])
    return batch.batch_id


async def finalized_at(ports: Ports, batch_id: str) -> float:
    result = await finalize(ports.db, batch_id, "event")
    assert result.outcome is Outcome.FINALIZED
    return time.perf_counter()


async def watched(ports: Ports, batch_id: str, kind: Kind = Kind.FINALIZED) -> bool:
    return ports.notifications.watchers(kind, batch_id) > 0


async def listening(ports: Ports) -> bool:
    return ports.notifications.live


async def one_wait(ports: Ports, client: Client) -> float:
    """Seconds from the start of the finalizing transaction to `wait` returning: an
    upper bound on commit -> return (the waiter may return before `finalize` does).
    """
    batch_id = await ready_batch(ports)
    returned: list[float] = []

    async def waiter() -> None:
        await client.wait(batch_id, timeout_s=10.0)
        returned.append(time.perf_counter())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_for(lambda: watched(ports, batch_id), what="the waiter to watch")
        started = time.perf_counter()
        await finalized_at(ports, batch_id)
    return returned[0] - started


async def test_client_wait_returns_within_100_ms_of_the_finalizing_commit(
    settings: Settings, ports: Ports
) -> None:
    """Client.wait is woken by the finalization's NOTIFY, not by a polling interval."""
    await wait_for(lambda: listening(ports), what="the listener")
    client = Client(settings, ports)
    latencies = [await one_wait(ports, client) for _ in range(ROUNDS)]
    print(f"finalize started -> Client.wait returned: max {max(latencies) * 1000:.1f} ms, "
          f"median {statistics.median(latencies) * 1000:.1f} ms")  # fmt: skip
    assert max(latencies) < WAIT_BOUND_S, latencies


async def test_without_listen_wait_falls_back_to_polling(settings: Settings) -> None:
    """Ports opened without LISTEN (as through PgBouncer in transaction mode): no
    listening connection, and wait still returns, by polling.
    """
    async with open_ports(settings) as ports:
        assert not ports.notifications.live
        client = Client(settings, ports)
        assert await one_wait(ports, client) < WAIT_BOUND_S  # its poll is 0.1 s
        listeners = await sql(
            settings.database_url or "",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'LISTEN%'",
        )
    assert listeners[0][0] == 0


async def test_submit_wait_returns_at_finalization(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """`reconciler submit --wait` prints the summary right after the finalizing commit."""
    (tmp_path / "a.txt").write_text("a\n")
    env = with_env(service_env, RECONCILER_LOG_FORMAT="console")
    command = reconciler_command("submit", str(tmp_path), "--batch-id", "cli", "--wait")
    async with await anyio.open_process(command, env=env) as process:
        assert process.stdout is not None
        created = await process.stdout.receive()
        assert b"batch cli created" in created
        await wait_for(lambda: _cli_listening(settings), what="the CLI to listen")
        await record(ports, "cli", [str(tmp_path / "a.txt")])
        committed = await finalized_at(ports, "cli")
        with anyio.fail_after(10):
            summary = await process.stdout.receive()
            latency_s = time.perf_counter() - committed
            summary += b"".join([chunk async for chunk in process.stdout])
        assert await process.wait() == 0
    print(f"submit --wait printed the summary {latency_s * 1000:.1f} ms after commit")
    assert b"completed" in summary and latency_s < CLI_BOUND_S


async def _cli_listening(settings: Settings) -> bool:
    # This test's ports listen too: the CLI's connection is the second one.
    rows = await sql(
        settings.database_url or "",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%'",
    )
    return int(rows[0][0]) >= 2


async def test_the_delivery_actor_is_woken_by_finalization(
    settings: Settings, ports: Ports
) -> None:
    """A webhook is attempted right after finalization, not after the 30 s poll."""
    slow_poll = replace(settings, delivery_poll_interval_s=DELIVERY_POLL_S)
    latencies: list[float] = []
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        async with anyio.create_task_group() as tg:
            tg.start_soon(Deliverer(slow_poll, ports.db, ports.notifications).run)
            await wait_for(lambda: listening(ports), what="the listener")
            await wait_for(lambda: watched_all(ports), what="the deliverer to watch")
            for n in range(1, 2 * ROUNDS + 1):
                committed = await finalized_at(ports, await ready_batch(ports, 1))
                await wait_for(partial(_received, receiver.received, n), timeout_s=5.0)
                latencies.append(receiver.received[-1].at - committed)
            tg.cancel_scope.cancel()
    print(f"finalization -> webhook received: max {max(latencies) * 1000:.1f} ms, "
          f"median {statistics.median(latencies) * 1000:.1f} ms")  # fmt: skip
    assert max(latencies) < 1.0, latencies


async def watched_all(ports: Ports) -> bool:
    return ports.notifications.watchers(Kind.FINALIZED) > 0


async def _received(received: Sequence[object], count: int) -> bool:
    return len(received) >= count


async def test_stopping_during_a_connect_that_hangs_closes_it_at_once() -> None:
    """A listener stopped mid-handshake (Postgres accepts, never answers) closes its
    socket and returns at once, rather than after the connect timeout.
    """
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as hole:
        hole.setblocking(False)
        notifications = Notifications(f"postgresql://nobody@127.0.0.1:{hole.getsockname()[1]}/x")
        async with notifications.running():
            conn = await wait_for(lambda: _accepted(hole), what="the listener to connect")
            conn.setblocking(False)
            received = await loop.sock_recv(conn, 1024)  # its SSL or startup request
            stopping = time.perf_counter()
        with conn, anyio.fail_after(5 * STOP_BOUND_S):
            while await loop.sock_recv(conn, 1024):  # until the listener's end is closed
                pass
        closed_after_s = time.perf_counter() - stopping
    assert received
    assert closed_after_s < STOP_BOUND_S


async def _accepted(server: socket.socket) -> socket.socket | None:
    try:
        return server.accept()[0]
    except BlockingIOError:
        return None
