"""The HTTP API's request and response models, with the rules bodies must follow.

FastAPI validates requests against these and publishes them in the OpenAPI document;
values Postgres could not store (NUL, lone surrogates, NaN) are refused here with a
422 naming where they are.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_FILES_PER_BATCH: Final = 100_000
MAX_JSON_DEPTH: Final = 32  # nesting of the whole body; deeper cannot be stored safely
ID_MAX_CHARS: Final = 256  # the batches.batch_id CHECK constraint
FILE_ID_MAX_CHARS: Final = 1024  # the batch_files.file_id CHECK constraint
FILE_ID_MAX_BYTES: Final = 1024  # with a 256-character batch_id, fits a btree index row
URI_MAX_CHARS: Final = 4096
NO_NUL: Final = r"^[^\x00]+$"
BATCH_ID: Final = r"^[^\x00/]+$"  # a '/' could never be addressed in a URL path
REASON_MAX_CHARS: Final = 2000  # the operator_actions.reason CHECK constraint
REASON: Final = r"^[^\x00]*\S[^\x00]*$"  # some text that is not only blanks
Trigger = Literal["event", "sweep", "demand", "deadline", "operator"]


class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    file_id: str = Field(min_length=1, max_length=FILE_ID_MAX_CHARS, pattern=NO_NUL)
    uri: str = Field(min_length=1, max_length=URI_MAX_CHARS, pattern=NO_NUL)
    payload: Any = None

    @field_validator("file_id")
    @classmethod
    def _indexable(cls, file_id: str) -> str:
        # The (batch_id, file_id) primary key caps an index row at ~2.7 kB: count bytes.
        size = len(file_id.encode())
        if size > FILE_ID_MAX_BYTES:
            raise ValueError(f"file_id is {size} bytes in UTF-8, at most {FILE_ID_MAX_BYTES}")
        return file_id


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    batch_id: str | None = Field(
        default=None, min_length=1, max_length=ID_MAX_CHARS, pattern=BATCH_ID
    )
    run_id: str | None = Field(default=None, min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL)
    metadata: dict[str, Any] | None = None
    deadline_s: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)
    files: list[FileIn] = Field(max_length=MAX_FILES_PER_BATCH)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        problem = _unstorable(data)
        if problem:
            raise ValueError(str(problem))
        return data

    @model_validator(mode="after")
    def _unique_file_ids(self) -> BatchIn:
        seen: set[str] = set()
        for spec in self.files:
            if spec.file_id in seen:
                raise ValueError(f"duplicate file_id {spec.file_id!r}")
            seen.add(spec.file_id)
        return self


@dataclass(slots=True)
class _Unstorable:
    reason: str
    path: list[str | int]

    def __str__(self) -> str:
        where = "body" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)
        return f"{where}: {self.reason}"


def _unstorable(value: Any, depth: int = 0) -> _Unstorable | None:
    """Why Postgres could not store this JSON value (and where), or None when it can."""
    if depth > MAX_JSON_DEPTH:
        return _Unstorable(f"nested deeper than {MAX_JSON_DEPTH} levels", [])
    if isinstance(value, str):
        return _unstorable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return _Unstorable("numbers must be finite", [])
    items: Any = enumerate(value) if isinstance(value, list) else ()
    if isinstance(value, dict):
        bad_key = next((p for p in map(_unstorable_text, value) if p), None)
        if bad_key is not None:
            return _Unstorable(f"a key: {bad_key.reason}", [])
        items = value.items()
    for key, item in items:
        problem = _unstorable(item, depth + 1)
        if problem:
            problem.path.insert(0, key)
            return problem
    return None


def _unstorable_text(text: str) -> _Unstorable | None:
    if "\x00" in text:
        return _Unstorable("the NUL character cannot be stored", [])
    try:
        text.encode()
    except UnicodeEncodeError:
        return _Unstorable("not valid Unicode (lone surrogate)", [])
    return None


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


class Progress(BaseModel):
    batch_id: str
    run_id: str
    status: Literal["processing", "completed", "completed_with_errors"]
    total_files: int
    files_pending: int
    files_processing: int
    files_succeeded: int
    files_failed: int
    created_at: dt.datetime
    last_file_completed_at: dt.datetime | None
    completed_at: dt.datetime | None
    finalized_by: Trigger | None
    deadline_at: dt.datetime | None = None
    metadata: dict[str, Any] | None = None
    parent_batch_id: str | None = Field(
        default=None, description="The batch whose failed files this one runs again."
    )


class Summary(BaseModel):
    batch_id: str
    run_id: str
    status: Literal["completed", "completed_with_errors"]
    finalized_by: Trigger
    total_files: int
    files_succeeded: int
    files_failed: int
    created_at: dt.datetime
    first_file_started_at: dt.datetime | None
    last_file_completed_at: dt.datetime | None
    completed_at: dt.datetime
    processing_seconds: dict[str, Any]
    errors: list[dict[str, Any]]
    totals: dict[str, Any]
    metadata: dict[str, Any]


class Condition(BaseModel):
    name: str
    holds: bool
    detail: str


class Explanation(BaseModel):
    batch_id: str
    status: str
    finalized_by: str | None
    verdict: str
    conditions: list[Condition]
    blocking_files: list[dict[str, Any]]


class Page(BaseModel):
    items: list[Progress]
    next_before: dt.datetime | None = Field(description="Pass as `before` for the next page.")


class HealthBody(BaseModel):
    status: Literal["ok", "failing"]
    actors: dict[str, bool]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048, pattern=NO_NUL)
    events: list[Literal["batch.finalized"]] | None = Field(default=None, min_length=1)
    secret: str | None = Field(
        default=None, max_length=256, description="`whsec_` and base64; generated when absent."
    )


class Webhook(BaseModel):
    webhook_id: str
    url: str
    events: list[str]
    created_at: dt.datetime
    enabled: bool = Field(description="False once the receiver answered 410 Gone.")
    disabled_at: dt.datetime | None
    paused_until: dt.datetime | None = Field(description="Held after a 429 or Retry-After.")


class WebhookCreated(BaseModel):
    webhook_id: str
    url: str
    events: list[str]
    created_at: dt.datetime
    secret: str = Field(description="The signing secret: shown here only, never again.")


class WebhookList(BaseModel):
    items: list[Webhook]


class DeliveryAttempt(BaseModel):
    event_id: str
    sink: Literal["webhook", "hook"]
    webhook_id: str | None
    hook: str | None = Field(description="RECONCILER_ON_FINALIZED, for the hook's attempts.")
    attempt: int
    outcome: Literal["delivered", "failed", "dead"]
    delivered: bool
    status_code: int | None
    error: str | None
    latency_s: float
    replica: str
    at: dt.datetime


class DeliveryState(BaseModel):
    event_id: str
    sink: Literal["webhook", "hook"]
    webhook_id: str | None
    hook: str | None
    state: Literal["pending", "delivered", "dead", "cancelled"]
    attempts: int
    delivered_at: dt.datetime | None
    next_attempt_at: dt.datetime | None


class Deliveries(BaseModel):
    batch_id: str
    attempts: list[DeliveryAttempt]
    deliveries: list[DeliveryState]


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(
        min_length=1,
        max_length=REASON_MAX_CHARS,
        pattern=REASON,
        description="Why: kept in the batch's audit.",
    )


class RetryIn(CancelIn):
    batch_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        pattern=BATCH_ID,
        description="The new batch's id; repeating the retry with it creates nothing more.",
    )


class AuditEntry(BaseModel):
    action: Literal["cancel", "retry_failed"]
    reason: str
    actor: str = Field(description="The API token's name, or the CLI's --actor.")
    detail: dict[str, Any]
    at: dt.datetime


class Audit(BaseModel):
    batch_id: str
    items: list[AuditEntry]


class DeadLetter(BaseModel):
    id: str = Field(description="The dead-letter stream entry's id.")
    at: dt.datetime
    reason: str
    batch_id: str | None
    file_id: str | None
    original_id: str | None
    job: str = Field(description="The original job's text, cut to its first characters.")
    job_chars: int = Field(description="The original job's full length.")


class DeadLetters(BaseModel):
    items: list[DeadLetter]
    next: str | None = Field(description="Pass as `after` for the next page; null at the end.")
