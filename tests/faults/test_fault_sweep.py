"""The fault-point sweep: every port call of a small scenario fails once, in each mode.

Three clean runs count the calls (C, the median); then each N in 1..C fails in
`error`, `lost` and `crash` mode, and every run must leave the invariants of
tests/faults/invariants.py holding. RECONCILER_FAULTS_LONG=1 adds a second, later fault
to every run.
"""

from __future__ import annotations

from typing import Final

import pytest

from tests.faults.injector import WRAPPERS, port_methods
from tests.faults.invariants import Violation
from tests.faults.scenario import MAX_ATTEMPTS, RunSpec, special_file
from tests.faults.sweep import (
    LONG,
    SHOWN_VIOLATIONS,
    grouped,
    open_lanes,
    report,
    run_one,
    summary_line,
    sweep,
)
from tests.services import Endpoints

# The port methods the actors and submission call on the scenario's normal path: each
# must be the failing call of at least one run.
ACTOR_METHODS: Final = frozenset(
    {
        "Database.fetch",
        "Database.fetchrow",
        "Database.execute",
        "JobQueue.ensure_group",
        "JobQueue.enqueue",
        "JobQueue.read",
        "JobQueue.claim_idle",
        "JobQueue.renew",
        "JobQueue.ack",
        "JobQueue.length",
        "JobQueue.release",
        "JobQueue.prune_consumers",
        "JobQueue.take_recovery",
        "JobQueue.dead_letter",
    }
)
# Called by the actors only after something already went wrong: faulted in the long form.
REPAIR_METHODS: Final = {
    "JobQueue.missing": "the sweeper asks only about files pending past the grace period",
}
# Wrapped like every method, but no actor calls them in this scenario.
OFF_PATH_METHODS: Final = {
    "Database.fetchval": "only the API and Client.enqueue read single values outside a session",
    "Database.session": "only the readiness probe opens a bare session (migrations.pending)",
    "Database.transaction": "finalizing and submitting are one statement each; only operator"
    " actions, submissions past 2,000 files and migrations open a transaction",
    "Session.fetchval": "only an operator's cancel and retry run statements in a transaction",
    "Session.fetchrow": "only an operator's cancel and retry run statements in a transaction",
    "Session.execute": "only operator actions, large submissions and migrations write in one",
    "Session.fetch": "only migrations read rows through a session",
    "Session.execute_script": "only migrations run DDL scripts",
    "JobQueue.ping": "only the readiness probe pings Redis; the scenario sends no requests",
    "JobQueue.dead_letters": "only the API and the console list dead letters",
    "JobQueue.dead_letter_count": "only the web console counts dead letters",
}


def wrapped_methods() -> set[str]:
    return {
        f"{port.__name__}.{name}"
        for port, faulty in WRAPPERS.items()
        for name, _ in port_methods(port)
        if name in vars(faulty)
    }


def test_every_wrapped_method_is_classified_for_coverage() -> None:
    """Each wrapped port method is on the scenario's path, a repair path, or off it."""
    classified = ACTOR_METHODS | set(REPAIR_METHODS) | set(OFF_PATH_METHODS)
    assert classified == wrapped_methods()


@pytest.mark.timeout(60)
async def test_clean_run_calls_every_port_method_the_actors_call(
    services: Endpoints, template_database: str
) -> None:
    """Without faults the scenario reaches every actor port method and all its behaviours."""
    async with open_lanes(services, template_database, 1) as lanes:
        clean = await run_one(lanes[0], RunSpec("clean"))
    called = {name for _, name in clean.plan.log}
    assert ACTOR_METHODS <= called, f"never called: {sorted(ACTOR_METHODS - called)}"
    attempts: dict[str, list[int]] = {}
    for run in clean.journal:
        attempts.setdefault(f"{run.batch_id[-1]}/{run.file_id}", []).append(run.attempt)
    assert attempts[f"A/{special_file('A')}"] == list(range(1, MAX_ATTEMPTS + 1))
    assert attempts[f"B/{special_file('B')}"] == [1, 2]
    assert attempts[f"C/{special_file('C')}"] == [1]
    assert clean.final.batches["C"]["files_failed"] >= 1  # the slow file timed out


def coverage_gaps(faulted: set[str]) -> list[Violation]:
    wanted = ACTOR_METHODS | (set(REPAIR_METHODS) if LONG else set())
    return [
        Violation("COV", "never faulted", "[sweep]", f"{name} was never the failing call")
        for name in sorted(wanted - faulted)
    ]


@pytest.mark.timeout(900 if LONG else 420)
async def test_every_fault_point_leaves_the_invariants_holding(
    services: Endpoints, template_database: str
) -> None:
    """Failing any single port call, in any mode, breaks none of I1-I6."""
    result = await sweep(services, template_database)
    violations = result.violations() + coverage_gaps(result.faulted_methods())
    violations += [Violation("H", "harness error", "[sweep]", c) for c in result.crashes]
    print(summary_line(result, violations))
    report(result, violations)
    shown = "\n".join(str(v) for v in violations[:SHOWN_VIOLATIONS])
    summary = "\n".join(grouped(violations))
    assert not violations, (
        f"{summary_line(result, violations)}\nby kind:\n{summary}\n"
        f"first {SHOWN_VIOLATIONS}:\n{shown}"
    )
