"""The fault injector itself: what it wraps, and what each mode does to a real call.

These pin the harness so a sweep that finds nothing means the service held, not that
the faults never reached it.
"""

from __future__ import annotations

import pytest

from reconciler.app import Ports
from reconciler.errors import RetryableError
from tests.faults.injector import (
    EXCLUDED,
    WRAPPERS,
    Crash,
    FaultPlan,
    Generation,
    Mode,
    faulty_ports,
    port_methods,
)

ENTRY = {"job": "{}"}


def test_every_public_async_port_method_is_wrapped_or_excluded() -> None:
    """A port method added later is wrapped automatically, or named in EXCLUDED."""
    for port, faulty in WRAPPERS.items():
        for name, _ in port_methods(port):
            wrapped = name in vars(faulty)
            assert wrapped or name in EXCLUDED, f"{port.__name__}.{name} is not wrapped"
            assert not (wrapped and name in EXCLUDED), f"{port.__name__}.{name} is excluded"
    found = {name for port in WRAPPERS for name, _ in port_methods(port)}
    assert set(EXCLUDED) <= found, f"stale exclusions: {set(EXCLUDED) - found}"


def test_port_methods_finds_coroutines_and_context_managers() -> None:
    """Introspection sees both kinds, so neither slips past the wrappers."""
    kinds = dict(port_methods(next(iter(WRAPPERS))))
    assert kinds["fetch"] == "coroutine"
    assert kinds["transaction"] == "context"
    assert kinds["session"] == "context"


async def test_error_mode_fails_before_the_call_reaches_the_server(ports: Ports) -> None:
    """`error`: the Nth call raises RetryableError and the server never sees it."""
    plan = FaultPlan(Mode.ERROR, frozenset({1}))
    faulty = faulty_ports(ports, plan, Generation(1))
    with pytest.raises(RetryableError):
        await faulty.queue.enqueue([ENTRY], ["m"])
    assert await ports.queue.length() == 0
    await faulty.queue.enqueue([ENTRY], ["m"])
    assert await ports.queue.length() == 1
    assert plan.log == [(1, "JobQueue.enqueue"), (2, "JobQueue.enqueue")]
    assert plan.injected == [(1, "JobQueue.enqueue")]


async def test_lost_mode_does_the_call_then_loses_the_reply(ports: Ports) -> None:
    """`lost`: the server did the work, the caller sees RetryableError."""
    plan = FaultPlan(Mode.LOST, frozenset({1}))
    faulty = faulty_ports(ports, plan, Generation(1))
    with pytest.raises(RetryableError):
        await faulty.queue.enqueue([ENTRY], ["m"])
    assert await ports.queue.length() == 1


async def test_crash_mode_kills_the_generation_for_good(ports: Ports) -> None:
    """`crash`: the call happens, then every later call of that generation dies at once."""
    plan, generation = FaultPlan(Mode.CRASH, frozenset({1})), Generation(1)
    faulty = faulty_ports(ports, plan, generation)
    with pytest.raises(Crash):
        await faulty.queue.enqueue([ENTRY], ["m"])
    with pytest.raises(Crash):
        await faulty.queue.enqueue([ENTRY], ["m"])
    assert (plan.crashed, generation.dead, plan.calls) == (True, True, 1)
    assert await ports.queue.length() == 1
    # A new generation around the same real ports works again.
    await faulty_ports(ports, plan, Generation(2)).queue.enqueue([ENTRY], ["m"])
    assert await ports.queue.length() == 2


async def test_a_context_manager_is_a_fault_point_on_entering(ports: Ports) -> None:
    """`transaction()` counts on entry and yields a session whose calls count too."""
    plan = FaultPlan(Mode.ERROR, frozenset({1}))
    faulty = faulty_ports(ports, plan, Generation(1))
    with pytest.raises(RetryableError):
        async with faulty.db.transaction():
            pytest.fail("the body must not run when entering failed")
    async with faulty.db.transaction() as tx:
        assert await tx.fetchval("ping") == 1
    names = [name for _, name in plan.log]
    assert names == ["Database.transaction", "Database.transaction", "Session.fetchval"]


async def test_a_plan_may_fail_the_first_call_of_a_method(ports: Ports) -> None:
    """With `method`, the first call of that port method fails, and only that one."""
    plan = FaultPlan(Mode.ERROR, method="JobQueue.enqueue")
    faulty = faulty_ports(ports, plan, Generation(1))
    await faulty.db.fetchval("ping")
    with pytest.raises(RetryableError):
        await faulty.queue.enqueue([ENTRY], ["m"])
    await faulty.queue.enqueue([ENTRY], ["m"])
    assert plan.injected == [(2, "JobQueue.enqueue")]
