"""The handler the operator acceptance tests point RECONCILER_HANDLER at.

`held` journals each call, then waits until the payload's `release` file exists, so
a test decides when an in-flight file's outcome arrives. It is synchronous (the
service runs it in a worker thread), so its file checks block nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from reconciler.jobs import FileJob

POLL_S: Final = 0.02


def held(job: FileJob) -> dict[str, Any]:
    """Journals the call, waits for the release file, then succeeds."""
    spec = job.payload if isinstance(job.payload, dict) else {}
    with Path(str(spec["journal"])).open("a") as journal:
        journal.write(f"{job.batch_id}\t{job.file_id}\n")
    release = Path(str(spec["release"]))
    while not release.exists():
        time.sleep(POLL_S)
    return {"files": 1}
