"""How the console's templates write times, durations and states."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from urllib.parse import quote

import jinja2

FINAL_STATES = {"completed": "ok", "completed_with_errors": "warn", "processing": "run"}


def when(value: str | dt.datetime | None) -> str:
    """An ISO time as `2026-01-31 12:34:56Z`, to the second, in UTC."""
    if value is None:
        return ""
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: float | None) -> str:
    """A duration as people read it: 850 ms, 12.3 s, 4 min 05 s, 3 h 20 min."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def tone(status: str | None) -> str:
    """The CSS class of a status; the status is always written out beside the colour."""
    return {
        **FINAL_STATES,
        "succeeded": "ok",
        "failed": "bad",
        "pending": "idle",
        "delivered": "ok",
        "dead": "bad",
        "cancelled": "idle",
    }.get(status or "", "idle")


def done(progress: dict[str, Any]) -> int:
    return int(progress["files_succeeded"]) + int(progress["files_failed"])


def urlquote(value: str) -> str:
    """One path segment: a batch id may hold any character but NUL."""
    return quote(value, safe="")


def batch_path(batch_id: str) -> str:
    return f"/ui/batches/{urlquote(batch_id)}"


def compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def register(env: jinja2.Environment) -> None:
    env.filters.update(
        {
            "when": when,
            "duration": duration,
            "tone": tone,
            "done": done,
            "batch_path": batch_path,
            "compact_json": compact_json,
            "urlquote": urlquote,
        }
    )
