"""The handler the browser tests point RECONCILER_HANDLER at.

`gated` waits until the payload's `release` file exists, then fails with the
payload's `error` if it has one, else succeeds: a test decides when each file
finishes, and how. It is synchronous (the service runs it in a worker thread).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from reconciler.jobs import FileJob

POLL_S: Final = 0.02


def gated(job: FileJob) -> dict[str, Any]:
    spec = job.payload if isinstance(job.payload, dict) else {}
    release = Path(str(spec["release"]))
    while not release.exists():
        time.sleep(POLL_S)
    if spec.get("error"):
        raise RuntimeError(str(spec["error"]))
    return {"bytes": 10}
