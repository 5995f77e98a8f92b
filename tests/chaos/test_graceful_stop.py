"""Scenario 5: SIGTERM mid-batch finishes the files in flight within the drain deadline
and hands back only the unfinished ones, which the next replica redelivers; the handler
journal shows no file run twice."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Final

import anyio
import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import ServiceProcess, with_env
from tests.chaos.harness import (
    SIZE,
    Fleet,
    assert_nothing_lost_or_duplicated,
    audit_fields,
    journal_counts,
    report,
    settled_audit,
    started,
    wait_for_event,
)
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
BATCHES: Final = 3
EXIT_MARGIN_S: Final = 3.0
RECLAIMER_CONCURRENCY: Final = 64


async def _in_flight(settings: Settings, at_least: int) -> bool:
    rows = await sql(
        settings.database_url or "", "SELECT count(*) FROM batch_files WHERE status = 'processing'"
    )
    return int(rows[0][0]) >= at_least


async def _stop(process: ServiceProcess) -> tuple[int, float]:
    """SIGTERM; returns the exit code and how long the process took to exit."""
    began = time.monotonic()
    process.signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(process.wait, 60.0)
    return code, time.monotonic() - began


async def _drain_then_restart(
    settings: Settings, ports: Ports, fleet: Fleet, journal: Path, work_s: float, batches: int
) -> tuple[int, float, int, int]:
    """Returns exit code, exit seconds, jobs released and jobs reclaimed after restart."""
    payload = {"min_s": work_s, "max_s": work_s, "fail_rate": 0.0, "journal": str(journal)}
    for n in range(batches):
        await submit(ports, files(SIZE.files, payload), batch_id=f"drain-{n}")
    first = fleet.start(0)
    await started(first)
    await wait_for(lambda: _in_flight(settings, 4), what="four files in flight")
    code, took_s = await _stop(first)
    released = int((await wait_for_event(first, "jobs_released", 5))["count"])
    # XAUTOCLAIM takes `concurrency` jobs per claim pass (every 5 s): a wide second
    # replica takes the released ones back in one or two passes.
    second = fleet.start(1, with_env(fleet.env, RECONCILER_CONCURRENCY=str(RECLAIMER_CONCURRENCY)))
    await started(second)
    await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace, 40
    )
    reclaimed = sum(int(e["count"]) for e in fleet.events("jobs_reclaimed"))
    return code, took_s, released, reclaimed


async def test_sigterm_finishes_in_flight_files_and_redelivers_only_the_rest(
    settings: Settings, ports: Ports, fleet: Fleet, tmp_path: Path
) -> None:
    """Files in flight at SIGTERM finish within the drain deadline; the jobs released are
    exactly the ones redelivered; no file runs twice."""
    fleet.env = with_env(fleet.env, RECONCILER_DRAIN_TIMEOUT_S="10")
    journal = tmp_path / "journal.tsv"
    code, took_s, released, reclaimed = await _drain_then_restart(
        settings, ports, fleet, journal, 0.5, BATCHES
    )
    found = await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace, 5
    )
    runs = journal_counts(journal)
    report(
        "graceful_stop", faults="SIGTERM mid-batch, drain deadline 10 s, files of 0.5 s",
        exit_s=round(took_s, 2), released=released, redelivered=reclaimed,
        ran_twice=sum(1 for n in runs.values() if n > 1), **audit_fields(found),
    )  # fmt: skip
    assert code == 0 and took_s <= 10 + EXIT_MARGIN_S
    assert released > 0, "some claimed jobs had not started: they were handed back"
    assert reclaimed == released, "exactly the released jobs were redelivered"
    assert [key for key, n in runs.items() if n > 1] == [], "no file ran twice"
    assert len(runs) == found.files
    assert_nothing_lost_or_duplicated(found)


async def test_sigterm_past_the_drain_deadline_hands_back_unfinished_files(
    settings: Settings, ports: Ports, fleet: Fleet, tmp_path: Path
) -> None:
    """Files longer than the 1 s drain deadline: the process exits at the deadline and
    only the files that had not finished are redelivered."""
    fleet.env = with_env(fleet.env, RECONCILER_DRAIN_TIMEOUT_S="1")
    journal = tmp_path / "journal.tsv"
    code, took_s, released, reclaimed = await _drain_then_restart(
        settings, ports, fleet, journal, 2.0, 1
    )
    found = await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace, 5
    )
    runs = journal_counts(journal)
    report(
        "graceful_stop_deadline", faults="SIGTERM mid-batch, drain deadline 1 s, files of 2 s",
        exit_s=round(took_s, 2), released=released, redelivered=reclaimed,
        ran_twice=sum(1 for n in runs.values() if n > 1), **audit_fields(found),
    )  # fmt: skip
    assert code == 0 and took_s <= 1 + EXIT_MARGIN_S
    assert reclaimed == released
    assert sum(1 for n in runs.values() if n > 1) <= 4, "only the cut-off files ran twice"
    assert_nothing_lost_or_duplicated(found)


async def test_sigterm_exits_even_after_a_sync_handler_hung(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """A sync handler blocked forever (timed out, thread abandoned): SIGTERM still ends
    the process within the drain deadline."""
    fleet.env = with_env(
        fleet.env, RECONCILER_HANDLER="tests.chaos.handlers:sync_misbehave",
        RECONCILER_FILE_TIMEOUT_S="0.5", RECONCILER_MAX_ATTEMPTS="1",
        RECONCILER_DRAIN_TIMEOUT_S="2",
    )  # fmt: skip
    await submit(ports, files(1, {"do": "hang"}), batch_id="hung")
    process = fleet.start(0)
    await started(process)
    await wait_for_event(process, "batch_finalized", 20)
    process.signal(signal.SIGTERM)
    await wait_for_event(process, "service_stopped", 10)
    code = await anyio.to_thread.run_sync(_exit_code, process, 2 + EXIT_MARGIN_S)
    assert code == 0


def _exit_code(process: ServiceProcess, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while process.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.proc.poll()
