"""The sweep: a clean run counts the port calls, then every call fails once per mode.

Runs go through a few lanes concurrently in one event loop; each lane owns a database
(truncated between runs) and each run its own Redis namespace. The result holds every
run's record and violation, and renders the summary the test prints and reports.
"""

from __future__ import annotations

import json
import os
import random
import time
import traceback
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Final

import anyio
from structlog.testing import capture_logs

from tests.faults.injector import FaultPlan, Mode
from tests.faults.invariants import Violation, check
from tests.faults.scenario import Lane, RunRecord, RunSpec, execute, open_lane, route_event
from tests.services import Endpoints

LONG: Final = os.environ.get("RECONCILER_FAULTS_LONG") == "1"
LANES: Final = int(os.environ.get("RECONCILER_FAULTS_LANES", "8"))
REPORT_ENV: Final = "RECONCILER_FAULTS_REPORT"
SEED: Final = int(os.environ.get("RECONCILER_FAULTS_SEED", "20240611"))
SHOWN_VIOLATIONS: Final = 20
# Clean runs that count the calls, the median one kept: a clean run the host stalls makes
# more periodic calls (a sweeper pass every 0.2 s) and once counted 292 calls where runs
# count 109-114, which made the sweep 2.7 times longer (it outlived its timeout in CI).
CLEAN_RUNS: Final = 3


@dataclass
class SweepResult:
    form: str
    calls: int
    clean: RunRecord
    records: list[RunRecord] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # runs the harness itself failed
    wall_s: float = 0.0

    def violations(self) -> list[Violation]:
        return [v for r in [self.clean, *self.records] for v in check(r)]

    def faulted_methods(self) -> set[str]:
        return {name for r in self.records for _, name in r.plan.injected}

    def runs_per_mode(self) -> dict[str, int]:
        return dict(Counter(r.spec.mode for r in self.records))


@contextmanager
def captured_logs() -> Iterator[None]:
    """Every structlog event, filed under the run whose task logged it."""
    with capture_logs(processors=[route_event]):
        yield


@asynccontextmanager
async def open_lanes(services: Endpoints, template: str, count: int) -> AsyncIterator[list[Lane]]:
    async with AsyncExitStack() as stack:
        lanes = [
            await stack.enter_async_context(
                open_lane(services.database_url, services.redis_url, template)
            )
            for _ in range(count)
        ]
        yield lanes


async def run_one(lane: Lane, spec: RunSpec) -> RunRecord:
    mode = None if spec.mode == "clean" else Mode(spec.mode)
    return await execute(lane, spec, FaultPlan(mode, spec.points, spec.method))


def sweep_specs(calls: int, long: bool, seed: int = SEED) -> list[RunSpec]:
    """Every N in 1..calls in each mode; the long form adds a seeded later N2 to each."""
    rng = random.Random(seed)
    specs: list[RunSpec] = []
    # Crash runs take longest: start them first so the lanes finish together.
    for mode in (Mode.CRASH, Mode.LOST, Mode.ERROR):
        for n in range(1, calls + 1):
            points = {n, rng.randint(n + 1, calls + n)} if long else {n}
            specs.append(RunSpec(mode.value, frozenset(points)))
    return specs


def missed_specs(result: SweepResult) -> list[RunSpec]:
    """A run per mode failing the first call of each method the clean run made but no
    positional run failed: the calls of one run interleave differently from the clean
    run's (timers, the sweeper's passes), so a call made once near the end, such as the
    stop's `JobQueue.release`, may sit at no N of a faulted run."""
    missed = sorted({name for _, name in result.clean.plan.log} - result.faulted_methods())
    return [RunSpec(mode.value, method=name) for name in missed for mode in Mode]


async def run_specs(lanes: list[Lane], specs: list[RunSpec], result: SweepResult) -> None:
    todo = deque(specs)

    async def drain(lane: Lane) -> None:
        while todo:
            spec = todo.popleft()
            try:
                result.records.append(await run_one(lane, spec))
            except Exception:  # the harness failed, not the service: show it, go on
                result.crashes.append(f"[{spec.label()}] {traceback.format_exc(limit=8)}")

    async with anyio.create_task_group() as tg:
        for lane in lanes:
            tg.start_soon(drain, lane)


async def sweep(services: Endpoints, template: str) -> SweepResult:
    """The clean runs, then every fault point in every mode, LANES runs at a time."""
    started = time.monotonic()
    with captured_logs():
        async with open_lanes(services, template, LANES) as lanes:
            cleans = sorted(
                [await run_one(lanes[0], RunSpec("clean")) for _ in range(CLEAN_RUNS)],
                key=lambda run: run.plan.calls,
            )
            clean = cleans[len(cleans) // 2]
            others = [run for run in cleans if run is not clean]  # checked like any run
            result = SweepResult("long" if LONG else "short", clean.plan.calls, clean, others)
            await run_specs(lanes, sweep_specs(result.calls, LONG), result)
            await run_specs(lanes, missed_specs(result), result)
    result.wall_s = time.monotonic() - started
    return result


def grouped(violations: list[Violation]) -> list[str]:
    """One line per (invariant, kind): runs per mode, the calls failed at N, an example."""
    runs: dict[tuple[str, str], dict[str, Violation]] = {}
    for v in violations:
        runs.setdefault((v.invariant, v.kind), {}).setdefault(v.run, v)
    lines = []
    for (inv, kind), by_run in sorted(runs.items()):
        modes = Counter(run.split(" ")[0].strip("[]") for run in by_run)
        calls = Counter(_call_at_n(run) for run in by_run)
        example = next(iter(by_run.values()))
        lines.append(
            f"{inv} {kind}: {len(by_run)} runs ({_counts(modes)}); at N: {_counts(calls)}; "
            f"e.g. {example.run} {example.detail}"
        )
    return lines


def _call_at_n(run: str) -> str:
    """The port method named in a run label such as `[lost N=[12] 12: Database.fetch]`."""
    return run.rstrip("]").rsplit(": ", 1)[1] if ": " in run else "-"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.most_common())


def summary_line(result: SweepResult, violations: list[Violation]) -> str:
    per_mode = ", ".join(f"{m} {n}" for m, n in sorted(result.runs_per_mode().items()))
    failing = len({v.run for v in violations})
    return (
        f"fault sweep ({result.form}): C={result.calls} calls; runs: {per_mode}; "
        f"{failing} runs with violations, {len(violations)} violations; "
        f"{len(result.crashes)} harness errors; wall {result.wall_s:.1f} s"
    )


def report(result: SweepResult, violations: list[Violation]) -> None:
    """Appends the sweep's numbers as one JSON line to $RECONCILER_FAULTS_REPORT."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    line = {
        "form": result.form,
        "calls": result.calls,
        "runs_per_mode": result.runs_per_mode(),
        "wall_s": round(result.wall_s, 1),
        "lanes": LANES,
        "violations": len(violations),
        "runs_with_violations": len({v.run for v in violations}),
        "by_kind": dict(Counter(f"{v.invariant} {v.kind}" for v in violations)),
        "harness_errors": len(result.crashes),
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line, sort_keys=True) + "\n")
