"""Scenario 1: three replicas, one SIGKILLed and restarted every second or two, with
batches arriving all along; afterwards every file is counted exactly once."""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import anyio
import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.chaos.harness import (
    SIZE,
    Fleet,
    assert_nothing_lost_or_duplicated,
    audit_fields,
    finalized_twice,
    journal_counts,
    report,
    settled_audit,
    started,
)
from tests.helpers import files, submit

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)


async def _submit_steadily(ports: Ports, journal: Path) -> None:
    """Spreads the batches over the fault window so kills land on work in flight."""
    payload = {"min_s": 0.001, "max_s": 0.05, "fail_rate": 0.05, "journal": str(journal)}
    pause = SIZE.fault_window_s / SIZE.batches
    for n in range(SIZE.batches):
        await submit(ports, files(SIZE.files, payload), batch_id=f"kill-{n:04d}")
        await anyio.sleep(pause)


async def _kill_and_restart(fleet: Fleet, rng: random.Random) -> list[float]:
    """SIGKILLs a random replica every `fault_every_s` (jittered) and restarts it."""
    faults: list[float] = []
    deadline = time.monotonic() + SIZE.fault_window_s
    while time.monotonic() < deadline:
        await anyio.sleep(SIZE.fault_every_s * rng.uniform(0.5, 1.5))
        victim = rng.randrange(SIZE.replicas)
        fleet.kill(victim)
        faults.append(time.time())
        await started(fleet.start(victim))
    return faults


async def test_killing_replicas_loses_and_duplicates_nothing(
    settings: Settings, ports: Ports, fleet: Fleet, tmp_path: Path
) -> None:
    """Random SIGKILLs and restarts: every batch finalized once, every file counted once,
    no job left pending in the consumer group."""
    rng = random.Random()
    journal = tmp_path / "journal.tsv"
    for index in range(SIZE.replicas):
        await started(fleet.start(index))
    began = time.monotonic()
    faults: list[float] = []

    async def killer() -> None:
        faults.extend(await _kill_and_restart(fleet, rng))

    async with anyio.create_task_group() as tg:
        tg.start_soon(killer)
        await _submit_steadily(ports, journal)
    found = await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace,
        SIZE.settle_timeout_s,
    )  # fmt: skip
    twice = finalized_twice(fleet.events())
    runs = journal_counts(journal)
    recovery_s = _recovery_s(found.last_completed_at, faults[-1] if faults else time.time())
    report(
        "replica_killing", faults=f"{len(faults)} x SIGKILL + restart of 1 of {SIZE.replicas}",
        wall_s=round(time.monotonic() - began, 1), recovery_s=recovery_s,
        finalized_twice=len(twice), rerun_files=sum(1 for n in runs.values() if n > 1),
        reclaimed=sum(e["count"] for e in fleet.events("jobs_reclaimed")),
        **audit_fields(found),
    )  # fmt: skip
    assert faults, "at least one replica was killed"
    assert_nothing_lost_or_duplicated(found)
    assert twice == [], "no batch finalized twice"
    assert found.batches == SIZE.batches and found.files == SIZE.batches * SIZE.files


def _recovery_s(last_completed_at: dt.datetime | None, last_fault: float) -> float | None:
    if last_completed_at is None:
        return None
    return round(max(0.0, last_completed_at.timestamp() - last_fault), 2)
