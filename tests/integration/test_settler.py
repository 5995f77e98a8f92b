"""Delivered attempts settled in groups: one statement per group, none lost on a stop."""

from __future__ import annotations

import anyio

from reconciler import delivery, webhooks
from reconciler.actors.delivery import Settler
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.delivery import Attempt, Claimed
from reconciler.finalization import finalize
from tests.helpers import sql, submit, wait_for


async def _claimed(ports: Ports, count: int) -> list[Claimed]:
    """`count` finalized empty batches, each with one webhook delivery, claimed."""
    await webhooks.create(ports.db, "http://127.0.0.1:9/hook")
    for _ in range(count):
        batch = await submit(ports, [])
        await finalize(ports.db, batch.batch_id, "event")
    claimed = await delivery.claim(ports.db, "replica-a", count, 30.0, with_hook=False)
    assert len(claimed) == count
    return claimed


async def _settled(settings: Settings) -> list[tuple[str, int]]:
    """Each delivery's state and its number of logged attempts, in delivery order."""
    rows = await sql(
        settings.database_url or "",
        "SELECT d.state, count(a.attempt) FROM deliveries d"
        " LEFT JOIN delivery_attempts a USING (delivery_id)"
        " GROUP BY d.delivery_id, d.state ORDER BY d.delivery_id",
    )
    return [(row[0], int(row[1])) for row in rows]


async def _commit_times(settings: Settings) -> int:
    """How many transactions last wrote the delivered rows (one per statement)."""
    rows = await sql(
        settings.database_url or "", "SELECT count(DISTINCT xmin::text) FROM deliveries"
    )
    return int(rows[0][0])


def ok(latency_s: float = 0.01) -> Attempt:
    return Attempt(True, latency_s, 200)


async def test_a_full_group_is_settled_at_once_in_one_statement(
    settings: Settings, ports: Ports
) -> None:
    """Three 2xx answers joining one group are recorded together, without the window."""
    claimed = await _claimed(ports, 3)
    settler = Settler(ports.db, window_s=600.0, size=3)
    with anyio.fail_after(30):  # far less than the window: the full group closed it
        async with anyio.create_task_group() as tg:
            for item in claimed:
                tg.start_soon(settler.delivered, item, ok())
    assert await _settled(settings) == [("delivered", 1)] * 3
    assert await _commit_times(settings) == 1


async def test_a_lone_answer_is_settled_when_the_window_closes(
    settings: Settings, ports: Ports
) -> None:
    [claimed] = await _claimed(ports, 1)
    settler = Settler(ports.db, window_s=0.05, size=16)
    with anyio.fail_after(30):
        await settler.delivered(claimed, ok())
    assert await _settled(settings) == [("delivered", 1)]
    assert settler.waiting == 0


async def test_a_delivery_is_recorded_at_its_2xx_not_when_its_group_closes(
    settings: Settings, ports: Ports
) -> None:
    """The window holds back the statement, not the moment recorded: delivered_at (and
    the latency metric's age) is when the 2xx came, half a window before the settling."""
    [claimed] = await _claimed(ports, 1)
    settler = Settler(ports.db, window_s=1.0, size=16)
    url = settings.database_url or ""
    [[before]] = await sql(url, "SELECT clock_timestamp()")
    with anyio.fail_after(30):
        await settler.delivered(claimed, ok())
    [[delivered_at, after]] = await sql(
        url, "SELECT delivered_at, clock_timestamp() FROM deliveries"
    )
    assert (after - before).total_seconds() >= 1.0  # the window passed before the statement
    assert (delivered_at - before).total_seconds() < 0.5


async def test_a_stop_inside_the_window_settles_the_group(settings: Settings, ports: Ports) -> None:
    """Cancelled while its group waits, the settler still records the 2xx it holds."""
    claimed = await _claimed(ports, 2)
    settler = Settler(ports.db, window_s=600.0, size=16)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for item in claimed:
                tg.start_soon(settler.delivered, item, ok())
            await wait_for(lambda: _both_waiting(settler), what="both answers in the group")
            tg.cancel_scope.cancel()
    assert await _settled(settings) == [("delivered", 1)] * 2


async def _both_waiting(settler: Settler) -> bool:
    return settler.waiting == 2
