"""The Python hook (RECONCILER_ON_FINALIZED): called once per batch, retried on raising."""

from __future__ import annotations

import pytest

from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests import delivery_hooks
from tests.delivery_support import all_settled, attempts_of, fast, hook_registered
from tests.helpers import running, submit, wait_for


@pytest.mark.parametrize("hook", ["record", "record_async"])
async def test_the_hook_is_called_once_per_finalized_batch(
    settings: Settings, ports: Ports, hook: str
) -> None:
    """Every finalized batch reaches the hook, sync or async, exactly once."""
    delivery_hooks.reset()
    tuned = fast(settings, on_finalized=f"tests.delivery_hooks:{hook}")
    async with running(tuned, ports, Role.WORKER):
        await wait_for(lambda: hook_registered(settings), what="hook registered")
        batches = [await submit(ports, []) for _ in range(3)]
        await wait_for(lambda: all_settled(settings, "delivered", 3), what="3 delivered")
    assert sorted(delivery_hooks.CALLS.values()) == [1, 1, 1]
    for batch in batches:
        [attempt] = await attempts_of(ports, batch.batch_id)
        assert (attempt["sink"], attempt["hook"], attempt["delivered"]) == (
            "hook",
            f"tests.delivery_hooks:{hook}",
            True,
        )


async def test_a_hook_raising_twice_is_called_three_times_and_delivered_once(
    settings: Settings, ports: Ports
) -> None:
    """A hook that raises is retried on the schedule until it returns."""
    delivery_hooks.reset(failures=2)
    tuned = fast(settings, on_finalized="tests.delivery_hooks:record")
    async with running(tuned, ports, Role.WORKER):
        await wait_for(lambda: hook_registered(settings), what="hook registered")
        batch = await submit(ports, [])
        await wait_for(lambda: all_settled(settings, "delivered", 1), what="delivered")
    assert list(delivery_hooks.CALLS.values()) == [3]
    log = await attempts_of(ports, batch.batch_id)
    assert [(a["attempt"], a["outcome"]) for a in log] == [
        (1, "failed"),
        (2, "failed"),
        (3, "delivered"),
    ]
    assert log[0]["error"] == f"RuntimeError: not ready for {batch.batch_id}"
