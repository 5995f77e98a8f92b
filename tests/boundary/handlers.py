"""Handlers the boundary tests point RECONCILER_HANDLER at, beside chaos `workload`.

`steady` always succeeds, whatever the payload; `fail_then_stall` fails attempt 1 and
stalls on the first call with attempt 2, so a crash can be timed inside a retry.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.lowlevel

from reconciler.jobs import FileJob
from tests.chaos.handlers import workload

STALL_S: Final = 60.0


async def steady(job: FileJob) -> dict[str, Any]:
    """Succeeds at once; payloads of any shape are accepted."""
    await anyio.lowlevel.checkpoint()
    return {"files": 1}


def _seen_attempt(journal: Path, job: FileJob) -> bool:
    """Whether the journal already holds a call of this file with this attempt."""
    if not journal.exists():
        return False
    wanted = [job.batch_id, job.file_id, str(job.attempt)]
    return any(line.split("\t")[:3] == wanted for line in journal.read_text().splitlines())


async def fail_then_stall(job: FileJob) -> dict[str, Any]:
    """Attempt 1 raises; the first call with attempt 2 stalls; anything else succeeds."""
    spec = job.payload if isinstance(job.payload, dict) else {}
    journal = Path(str(spec["journal"]))
    stall = job.attempt == 2 and not _seen_attempt(journal, job)
    await workload(replace(job, payload={**spec, "fail_rate": 0.0}))  # journals the call
    if job.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")
    if stall:
        await anyio.sleep(STALL_S)
    return {"files": 1}
