"""Batch use cases shared by the HTTP API, the CLI and the Python client.

Submitting writes the batch and its files in one transaction, then enqueues one job
per file. A crash between the two loses nothing: files stay pending with no job and
the sweeper re-enqueues them. A batch written in an application's own transaction
(`reconciler.sqlalchemy`) is written the same way with no jobs; `enqueue_committed`
enqueues them after its commit, or the sweeper's next pass does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import structlog

from reconciler import jobs, requeue
from reconciler.database import Database, Row, nulls_folded
from reconciler.errors import BatchConflict, BatchNotFound, InvalidBatch
from reconciler.finalization import Trigger, finalize
from reconciler.queue import JobQueue

log = structlog.get_logger("reconciler.batches")
T = TypeVar("T")

CHUNK_FILES: Final = 2000
BLOCKING_FILES_SHOWN: Final = 100


@dataclass(frozen=True, slots=True)
class FileSpec:
    file_id: str
    uri: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Submitted:
    batch_id: str
    created: bool
    total_files: int


def new_batch_id() -> str:
    return f"batch-{uuid.uuid4().hex[:16]}"


def files_digest(files: Sequence[FileSpec]) -> str:
    """Identifies a set of files regardless of order, for idempotent resubmission."""
    digest = hashlib.sha256()
    for spec in sorted(files, key=lambda f: f.file_id):
        # json.dumps([file_id, uri, payload], sort_keys=True), built from its parts.
        payload = "null" if spec.payload is None else json.dumps(spec.payload, sort_keys=True)
        line = f"[{jobs.quote(spec.file_id)}, {jobs.quote(spec.uri)}, {payload}]"
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def encode_jobs(batch_id: str, files: Sequence[FileSpec]) -> list[dict[str, str]]:
    """Each file's job, encoded once; refuses the whole batch if a worker could not take one."""
    seen: set[str] = set()
    entries: list[dict[str, str]] = []
    for spec in files:
        if not spec.file_id or not spec.uri:
            raise InvalidBatch("every file needs a non-empty file_id and uri")
        if not (jobs.storable(spec.file_id) and jobs.storable(spec.uri)):
            raise InvalidBatch(f"file_id or uri of {spec.file_id!r} has a NUL or is not UTF-8")
        if spec.file_id in seen:
            raise InvalidBatch(f"duplicate file_id {spec.file_id!r}")
        seen.add(spec.file_id)
        entries.append(_job(batch_id, spec))
    return entries


def _job(batch_id: str, spec: FileSpec) -> dict[str, str]:
    try:
        entry = jobs.encode(batch_id, spec.file_id, spec.uri, spec.payload)
    except (TypeError, ValueError) as exc:
        raise InvalidBatch(f"payload of {spec.file_id!r} is not JSON: {exc}") from None
    text = entry[jobs.JOB_FIELD]
    if "\\u0000" in text:
        raise InvalidBatch(f"payload of {spec.file_id!r} has a NUL character")
    size = len(text)  # ASCII: json.dumps escapes everything else
    if size > jobs.MAX_JOB_BYTES:
        raise InvalidBatch(
            f"file {spec.file_id!r}: its job is {size} bytes, more than {jobs.MAX_JOB_BYTES}"
            " (keep payloads small; pass large data by uri)"
        )
    return entry


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK_FILES):
        yield items[start : start + CHUNK_FILES]


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A batch checked and ready to write: its jobs encoded, its statements' parameters."""

    batch_id: str
    run_id: str
    metadata: dict[str, Any]
    digest: str
    deadline_s: float | None
    files: Sequence[FileSpec]
    entries: list[dict[str, str]]

    def writes(self, *, enqueued: bool) -> list[tuple[str, tuple[Any, ...]]]:
        """The statements that write the batch, with their parameters, in order: the
        batch with its first chunk of files (`insert_batch_with_files`, returning the id,
        or nothing when the id is taken), then `insert_files` for each further chunk.
        `enqueued=False` leaves the files' `enqueued_at` NULL (no job yet)."""
        batch = (self.batch_id, self.run_id, self.metadata, self.digest, len(self.files))
        # A batch without files is still one statement (with empty arrays).
        chunks = [self._files(c, enqueued) for c in list(_chunks(self.files)) or [[]]]
        first = ("insert_batch_with_files", (*batch, self.deadline_s, *chunks[0]))
        return [first, *(("insert_files", (self.batch_id, *c)) for c in chunks[1:])]

    @staticmethod
    def _files(chunk: Sequence[FileSpec], enqueued: bool) -> tuple[Any, ...]:
        return (
            [f.file_id for f in chunk],
            [f.uri for f in chunk],
            nulls_folded(
                [None if f.payload is None else jobs.payload_text(f.payload) for f in chunk]
            ),
            enqueued,
        )

    def existing(self, digest: str | None) -> Submitted:
        """The answer when the id is taken: a no-op for the same files, else a conflict."""
        if digest != self.digest:
            raise BatchConflict(f"batch {self.batch_id!r} exists with different files")
        return Submitted(self.batch_id, False, len(self.files))


def prepare(
    files: Sequence[FileSpec],
    *,
    batch_id: str | None = None,
    run_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    deadline_s: float | None = None,
) -> NewBatch:
    """Checks a batch before anything is written; raises InvalidBatch."""
    batch_id = batch_id or new_batch_id()
    if not jobs.storable(batch_id):
        raise InvalidBatch("batch_id has a NUL or is not UTF-8")
    entries = encode_jobs(batch_id, files)
    return NewBatch(
        batch_id,
        run_id or batch_id,
        metadata or {},
        files_digest(files),
        deadline_s,
        files,
        entries,
    )


async def submit(
    db: Database,
    queue: JobQueue,
    files: Sequence[FileSpec],
    *,
    batch_id: str | None = None,
    run_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    deadline_s: float | None = None,
) -> Submitted:
    """Creates the batch and enqueues its files; same id and files again is a no-op."""
    new = prepare(files, batch_id=batch_id, run_id=run_id, metadata=metadata, deadline_s=deadline_s)
    if not await _write(db, new):
        return new.existing(await db.fetchval("batch_digest", new.batch_id))
    await _enqueue(queue, new)
    log.info("batch_submitted", batch_id=new.batch_id, total_files=len(files))
    if not files:
        await finalize(db, new.batch_id, Trigger.EVENT)
    return Submitted(new.batch_id, True, len(files))


async def _write(db: Database, new: NewBatch) -> bool:
    """Writes the batch and its files, atomically; False when its id was taken."""
    (name, args), *rest = new.writes(enqueued=True)
    if not rest:  # one statement, one round trip: the common case
        return await db.fetchval(name, *args) is not None
    async with db.transaction() as tx:
        if await tx.fetchval(name, *args) is None:
            return False
        for further, more in rest:
            await tx.execute(further, *more)
    return True


async def _enqueue(queue: JobQueue, new: NewBatch) -> None:
    for chunk, encoded in zip(_chunks(new.files), _chunks(new.entries), strict=True):
        await queue.enqueue(encoded, [jobs.member(new.batch_id, f.file_id) for f in chunk])


async def enqueue_committed(db: Database, queue: JobQueue, batch_id: str) -> int:
    """Enqueues the files of a batch written, with no jobs, in its caller's transaction.

    Call it after that transaction commits. It claims the files still unqueued and
    enqueues those not on the stream, as the sweeper's next pass would if nobody called
    it, so a second call, or a race with the sweeper, enqueues nothing twice.
    """
    total = await db.fetchval("batch_total_files", batch_id)
    if total is None:
        raise BatchNotFound(f"no batch {batch_id!r} (rolled back, or not committed yet)")
    if total == 0:
        await finalize(db, batch_id, Trigger.EVENT)
        return 0
    enqueued, after = 0, ""
    while rows := await db.fetch("claim_batch_unqueued_files", batch_id, after, CHUNK_FILES):
        enqueued += len(await requeue.enqueue_missing(queue, rows))
        after = max(r["file_id"] for r in rows)
    if enqueued:
        log.info("batch_enqueued", batch_id=batch_id, files=enqueued)
    return enqueued


async def progress(db: Database, batch_id: str) -> dict[str, Any]:
    row = await db.fetchrow("get_progress", batch_id)
    if row is None:
        raise BatchNotFound(f"no batch {batch_id!r}")
    return jsonable(row)


async def summary(db: Database, batch_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow("get_summary", batch_id)
    return None if row is None else jsonable(row)


async def stuck(db: Database, grace_s: float, limit: int = 1000) -> list[dict[str, Any]]:
    return [jsonable(r) for r in await db.fetch("stuck_batches", grace_s, limit)]


async def page(
    db: Database,
    *,
    status: str | None,
    stuck_only: bool,
    grace_s: float,
    before: dt.datetime | None,
    limit: int,
) -> list[dict[str, Any]]:
    # No run id or id prefix filter; (before, '') as the keyset: created before `before`.
    filters = (status, stuck_only, grace_s, None, None)
    rows = await db.fetch("list_batches", *filters, before, "", limit)
    return [jsonable(r) for r in rows]


async def explain(db: Database, batch_id: str, grace_s: float) -> dict[str, Any]:
    """Every finalization condition, whether it holds, and the files that block it."""
    batch = await progress(db, batch_id)
    blocking = await db.fetch("blocking_files", batch_id, BLOCKING_FILES_SHOWN)
    conditions = _conditions(batch, grace_s)
    return {
        "batch_id": batch_id,
        "status": batch["status"],
        "finalized_by": batch["finalized_by"],
        "verdict": _verdict(batch, conditions),
        "conditions": conditions,
        "blocking_files": [jsonable(r) for r in blocking],
    }


def _conditions(batch: dict[str, Any], grace_s: float) -> list[dict[str, Any]]:
    done = batch["files_succeeded"] + batch["files_failed"]
    last = batch["last_file_completed_at"] or batch["created_at"]
    age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(last)).total_seconds()
    return [
        _cond("not_finalized", batch["status"] == "processing", f"status is {batch['status']}"),
        _cond("no_files_pending", batch["files_pending"] == 0, f"{batch['files_pending']} pending"),
        _cond(
            "no_files_processing",
            batch["files_processing"] == 0,
            f"{batch['files_processing']} processing",
        ),
        _cond(
            "every_file_terminal",
            done == batch["total_files"],
            f"{done} of {batch['total_files']} files succeeded or failed",
        ),
        _cond(
            "sweep_grace_elapsed",
            age >= grace_s,
            f"last file completed {age:.1f} s ago; the sweeper waits {grace_s:g} s",
        ),
    ]


def _cond(name: str, holds: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "holds": holds, "detail": detail}


def _verdict(batch: dict[str, Any], conditions: list[dict[str, Any]]) -> str:
    if batch["status"] != "processing":
        return f"finalized ({batch['status']}) by {batch['finalized_by']}"
    if all(c["holds"] for c in conditions[1:4]):
        return "complete but not finalized: the next event, sweep or summary request finalizes it"
    waiting = batch["files_pending"] + batch["files_processing"]
    return f"waiting for {waiting} file(s) to finish"


def jsonable(row: Row) -> dict[str, Any]:
    return {key: _plain(value) for key, value in row.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if hasattr(value, "__float__") and not isinstance(value, int | float | bool):
        return float(value)
    return value
