"""A real `reconciler run` killed between finalizing a batch and delivering its event."""

from __future__ import annotations

import signal
from pathlib import Path

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import service_process, with_env
from tests.delivery_support import all_settled, settled, subscribe
from tests.helpers import files, sql, submit, wait_for
from tests.receiver import Answer, always, receiving

FAST_DELIVERY = {
    "RECONCILER_DELIVERY_BACKOFF_S": "0.05",
    "RECONCILER_DELIVERY_POLL_INTERVAL_S": "0.05",
    "RECONCILER_DELIVERY_TIMEOUT_S": "30",
}


async def test_sigkill_before_the_acknowledgement_is_delivered_after_restart(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL while the receiver holds the first delivery: the restart delivers it, once."""
    env = with_env(service_env, **FAST_DELIVERY)
    with receiving(lambda n: Answer(hold=n == 1)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        batch = await submit(ports, files(2, {"sleep_s": 0.01}))
        with service_process(env, tmp_path / "first.log") as first:
            await wait_for(lambda: _seen(receiver.ids(), 1), timeout_s=30, what="first try")
            first.signal(signal.SIGKILL)
            first.wait(10)
        assert await settled(settings, batch.batch_id, "pending"), "finalized, not delivered"
        # The dead process's lease would hold the row for a while: move time instead.
        await sql(settings.database_url or "", "UPDATE deliveries SET next_attempt_at = now()")
        with service_process(env, tmp_path / "second.log"):
            await wait_for(lambda: settled(settings, batch.batch_id, "delivered"), what="sent")
    [event_id] = set(receiver.ids())
    assert receiver.acknowledged == {event_id: 1}
    assert receiver.received[0].payload["data"]["batch_id"] == batch.batch_id


async def test_two_replicas_deliver_each_event_once(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Two healthy `reconciler run` processes on one outbox: every event arrives once."""
    env = with_env(service_env, **{**FAST_DELIVERY, "RECONCILER_DELIVERY_POLL_INTERVAL_S": "0.01"})
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        with (
            service_process(env, tmp_path / "a.log", "--role", "worker") as a,
            service_process(env, tmp_path / "b.log", "--role", "sweeper") as b,
        ):
            for replica in (a, b):
                replica.wait_for_event("service_started")
            for _ in range(30):
                await submit(ports, [])
            await wait_for(lambda: all_settled(settings, "delivered", 30), what="30 delivered")
    assert len(receiver.ids()) == 30 == len(set(receiver.ids()))
    assert sorted(receiver.acknowledged.values()) == [1] * 30
    replicas = await sql(
        settings.database_url or "", "SELECT DISTINCT replica FROM delivery_attempts"
    )
    assert len(replicas) == 2, "both processes delivered"


async def _seen(ids: list[str], count: int) -> bool:
    return len(ids) >= count
