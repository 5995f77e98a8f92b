"""The original design note's operator SQL, read out of the note itself, runs verbatim.

The note lives beside the repository (`../shared/seed/*.txt`); its "Verify Database"
and "Check Stuck Batches (Manual)" sections hold the queries operators paste. They
name the batch 'YOUR_BATCH_ID', so the test creates a batch with exactly that id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.finalization import finalize
from tests.helpers import files, record, sql, submit

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("Verify Database", "Check Stuck Batches (Manual)")
_FENCE = re.compile(r"```sql\n(.*?)```", re.DOTALL)


def _note() -> str:
    for path in sorted((REPO.parent / "shared" / "seed").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if all(section in text for section in SECTIONS):
            return text
    pytest.skip(f"the design note is not in {REPO.parent / 'shared' / 'seed'}: nothing to check")


def _statements(note: str, section: str) -> list[str]:
    """Every SQL statement in the section's fenced blocks, as written."""
    start = note.index(section)
    end = note.find("\n#", start + len(section))
    blocks = _FENCE.findall(note[start : end if end > 0 else None])
    assert blocks, f"no SQL block under {section!r}"
    found = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in found if s and not all(line.startswith("--") for line in s.splitlines())]


async def _batches(ports: Ports, settings: Settings) -> None:
    """A finalized batch named as the note names it, a stuck one and a running one."""
    done = await submit(ports, files(3), batch_id="YOUR_BATCH_ID", run_id="run-note")
    await record(ports, done.batch_id, ["f00000", "f00001"])
    await record(ports, done.batch_id, ["f00002"], ok=False)
    await finalize(ports.db, done.batch_id, "event")
    stuck = await submit(ports, files(2), batch_id="stuck-batch")
    await record(ports, stuck.batch_id, ["f00000", "f00001"])
    await sql(
        settings.database_url or "",
        "UPDATE batches SET last_file_completed_at = now() - interval '1 hour' WHERE batch_id = $1",
        stuck.batch_id,
    )
    await submit(ports, files(2), batch_id="running-batch")


async def test_verify_database_queries_run_verbatim(ports: Ports, settings: Settings) -> None:
    """Each "Verify Database" query runs unchanged and answers the finalized batch's truth."""
    await _batches(ports, settings)
    url = settings.database_url or ""
    status, summaries, view = _statements(_note(), SECTIONS[0])
    [row] = await sql(url, status)
    assert (row["batch_id"], row["status"]) == ("YOUR_BATCH_ID", "completed_with_errors")
    assert row["completed_at"] is not None
    [summary] = await sql(url, summaries)
    assert (summary["run_id"], summary["status"]) == ("run-note", "completed_with_errors")
    assert (summary["total_files"], summary["success_files"]) == (3, 2)
    [progress] = await sql(url, view)
    assert (progress["files_success"], progress["files_failed"]) == (2, 1)


async def test_stuck_batches_query_runs_verbatim(ports: Ports, settings: Settings) -> None:
    """The manual stuck-batch query runs unchanged and finds exactly the stuck batch."""
    await _batches(ports, settings)
    [query] = _statements(_note(), SECTIONS[1])
    rows = await sql(settings.database_url or "", query)
    assert [(r["batch_id"], r["status"], r["files_success"]) for r in rows] == [
        ("stuck-batch", "processing", 2)
    ]
    assert rows[0]["seconds_since_last_file"] >= 3600
