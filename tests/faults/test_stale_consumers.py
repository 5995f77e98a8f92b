"""When the sweep counts a stopped generation's consumer as left behind.

Counted in sweeps that could have removed it, so a loaded machine (slow sweeps, a
generation that stops before it sweeps) does not make one, and a consumer the sweeps
really skip is still caught.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from tests.faults.scenario import VISIBILITY_TIMEOUT_S, prunable_since, swept_since

Events = list[MutableMapping[str, Any]]


def sweep(finished_at: float, duration_s: float, generation: int = 2) -> dict[str, Any]:
    return {
        "event": "sweep_finished",
        "at": finished_at,
        "duration_ms": duration_s * 1000,
        "generation": generation,
    }


def test_idle_past_the_timeout_counts_from_when_it_went_quiet() -> None:
    since = prunable_since(1500, read_at=10.0, events=[])
    assert since == 10.0 - 1.5 + VISIBILITY_TIMEOUT_S


def test_a_reclaim_that_emptied_it_later_postpones_it() -> None:
    events: Events = [{"event": "jobs_reclaimed", "at": 9.8}]
    assert prunable_since(5000, read_at=10.0, events=events) == 9.8


def test_a_sweep_started_after_it_was_removable_catches_it() -> None:
    assert swept_since([sweep(finished_at=12.0, duration_s=1.5)], since=10.0)


def test_a_sweep_started_before_it_was_removable_does_not() -> None:
    # A slow sweep that finished late but began before the consumer was removable.
    assert not swept_since([sweep(finished_at=12.0, duration_s=2.5)], since=10.0)


def test_no_sweep_at_all_does_not() -> None:
    assert not swept_since([], since=0.0)


def test_a_sweep_whose_consumer_repair_failed_does_not() -> None:
    failed = {
        "event": "sweep_repair_failed",
        "repair": "consumers_removed",
        "at": 11.5,
        "generation": 2,
    }
    assert not swept_since([failed, sweep(finished_at=12.0, duration_s=1.0)], since=10.0)
    # The failure of another generation's sweep excuses nothing.
    other = dict(failed, generation=3)
    assert swept_since([other, sweep(finished_at=12.0, duration_s=1.0)], since=10.0)


def test_a_sweep_that_finished_after_the_listing_was_asked_for_does_not() -> None:
    # Redis answered the listing before this sweep removed the consumer; the sweep
    # logged its removal on the shared loop before the harness read the reply.
    late = sweep(finished_at=12.0, duration_s=0.01)
    assert not swept_since([late], since=10.0, before=11.99)
    assert swept_since([late], since=10.0, before=12.0)
