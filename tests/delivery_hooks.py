"""Python hooks for RECONCILER_ON_FINALIZED in the tests: they record their calls."""

from __future__ import annotations

import threading
from collections import Counter

from reconciler.delivery import Event

CALLS: Counter[str] = Counter()
FAILURES_LEFT = [0]
_lock = threading.Lock()


def reset(failures: int = 0) -> None:
    with _lock:
        CALLS.clear()
        FAILURES_LEFT[0] = failures


def record(event: Event) -> None:
    """A sync hook (run in a thread): counts the call, raises while failures are left."""
    with _lock:
        CALLS[event.event_id] += 1
        failing = FAILURES_LEFT[0] > 0
        FAILURES_LEFT[0] -= failing
    if failing:
        raise RuntimeError(f"not ready for {event.batch_id}")


async def record_async(event: Event) -> None:
    """The same, as a coroutine on the service's loop."""
    record(event)
