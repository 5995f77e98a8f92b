"""The sweep's handler: does what the job's payload says and journals every start.

The journal is the ground truth for attempts: which attempt numbers each file's handler
saw, in which process generation, and whether the run ended or was cut off.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import anyio

from reconciler.jobs import FileJob
from tests.faults.injector import CURRENT_GENERATION

OK: Final = "ok"
FAIL_ALWAYS: Final = "fail_always"
FAIL_ONCE: Final = "fail_once"
SLOW: Final = "slow"
FAILURE_MESSAGE: Final = "injected handler failure"


@dataclass(eq=False)
class HandlerRun:
    batch_id: str
    file_id: str
    attempt: int
    generation: int
    ended: bool = False  # False: cancelled mid-run (its process died or stopped)


JOURNAL: list[HandlerRun] = []


def runs_of(batch_ids: set[str]) -> list[HandlerRun]:
    return [run for run in JOURNAL if run.batch_id in batch_ids]


def forget(batch_ids: set[str]) -> None:
    JOURNAL[:] = [run for run in JOURNAL if run.batch_id not in batch_ids]


async def handle(job: FileJob) -> dict[str, Any]:
    """`behaviour` in the payload: ok, fail_always, fail_once (attempt 1) or slow."""
    generation = CURRENT_GENERATION.get()
    if generation is not None and generation.dead:
        # A dead process starts nothing; the harness is cancelling what is left of it.
        await anyio.sleep_forever()
    run = HandlerRun(job.batch_id, job.file_id, job.attempt, generation.number if generation else 0)
    JOURNAL.append(run)
    spec = job.payload if isinstance(job.payload, dict) else {}
    try:
        await _behave(spec, job.attempt)
    finally:
        run.ended = not _cancelled()
    return {"files": 1}


async def _behave(spec: dict[str, Any], attempt: int) -> None:
    behaviour = spec.get("behaviour", OK)
    if behaviour == SLOW:
        await anyio.sleep(float(spec["sleep_s"]))
    elif behaviour == FAIL_ALWAYS or (behaviour == FAIL_ONCE and attempt == 1):
        raise RuntimeError(FAILURE_MESSAGE)


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
