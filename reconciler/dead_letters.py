"""The dead-letter stream as operators read it: each entry's reason and its job, cut short.

A job can be up to `jobs.MAX_JOB_BYTES` and a garbage entry anything at all, so a
listing shows only the first characters of each and says how long it really was.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from reconciler import jobs
from reconciler.queue import Delivery, JobQueue

JOB_SHOWN_CHARS: Final = 300
FIELD_SHOWN_CHARS: Final = 1000
PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
# Fields the dead-letter call adds beside the original job's own.
_ADDED: Final = frozenset((b"reason", b"original_id", b"stream"))


async def listed(
    queue: JobQueue, limit: int = PAGE_SIZE, after: str | None = None
) -> dict[str, Any]:
    """A page of dead letters, oldest first, and the cursor of the next page."""
    entries = await queue.dead_letters(count=limit, after=after)
    items = [describe(entry) for entry in entries]
    return {"items": items, "next": entries[-1].id if len(entries) == limit else None}


def describe(entry: Delivery) -> dict[str, Any]:
    """One entry: when and why it was dead-lettered, which file, the start of its job."""
    fields = entry.fields
    job = _job_text(fields)
    ids = jobs.identify(fields)
    return {
        "id": entry.id,
        "at": _entry_time(entry.id),
        "reason": _text(fields.get(b"reason"), FIELD_SHOWN_CHARS) or "unknown",
        "batch_id": ids[0] if ids else None,
        "file_id": ids[1] if ids else None,
        "original_id": _text(fields.get(b"original_id"), FIELD_SHOWN_CHARS),
        "job": _cut(job, JOB_SHOWN_CHARS),
        "job_chars": len(job),
    }


def _job_text(fields: dict[bytes, bytes]) -> str:
    """The original entry: its job field, or every field it had when it had none."""
    job = fields.get(jobs.JOB_FIELD.encode())
    if job is not None:
        return job.decode(errors="replace")
    own = {_decoded(k): _decoded(v) for k, v in fields.items() if k not in _ADDED}
    return repr(own)


def _decoded(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _entry_time(entry_id: str) -> str:
    millis = int(entry_id.split("-", 1)[0])
    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC).isoformat()


def _text(raw: bytes | None, limit: int) -> str | None:
    return None if raw is None else _cut(raw.decode(errors="replace"), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
