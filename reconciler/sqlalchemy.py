"""Creates a batch inside the application's own SQLAlchemy transaction.

    async with engine.begin() as conn:               # or an AsyncSession
        await conn.execute(orders.insert().values(...))
        submitted = await reconciler.sqlalchemy.submit(conn, files, batch_id="order-42")
    await client.enqueue(submitted.batch_id)          # optional: the sweeper does it too

The batch and its files are written on the caller's connection by the same reviewed
statements `Client.submit` runs, so they commit or roll back with the caller's rows.
No job is enqueued here: Redis is not part of the transaction, and a job enqueued
before a rollback would name a batch that never existed. The files are written as never
enqueued; after the commit, `Client.enqueue` enqueues them at once, and if nobody calls
it (or the process dies first) the sweeper's next pass enqueues them. `submit_sync`
does the same with a sync `Connection` or `Session`.

Only this module imports SQLAlchemy (the `[sqlalchemy]` extra); the service does not.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import Connection, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from reconciler import batches
from reconciler.batches import FileSpec, NewBatch, Submitted
from reconciler.queries import QUERIES

__all__ = ["FileSpec", "Submitted", "submit", "submit_sync"]

_POSITIONAL: Final = re.compile(r"\$(\d+)")


async def submit(
    connection: AsyncConnection | AsyncSession,
    files: Sequence[FileSpec],
    *,
    batch_id: str | None = None,
    run_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    deadline_s: float | None = None,
) -> Submitted:
    """Writes the batch in the connection's (or session's) current transaction.

    Same id and files again is a no-op (`created` false); other files under the same
    id raise BatchConflict, as `Client.submit` does.
    """
    new = batches.prepare(
        files, batch_id=batch_id, run_id=run_id, metadata=metadata, deadline_s=deadline_s
    )
    return await connection.run_sync(_write, new)


def submit_sync(
    connection: Connection | Session,
    files: Sequence[FileSpec],
    *,
    batch_id: str | None = None,
    run_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    deadline_s: float | None = None,
) -> Submitted:
    """`submit` for a sync application: a `Connection` or an ORM `Session`."""
    new = batches.prepare(
        files, batch_id=batch_id, run_id=run_id, metadata=metadata, deadline_s=deadline_s
    )
    return _write(connection, new)


def _write(connection: Connection | Session, new: NewBatch) -> Submitted:
    (name, args), *rest = new.writes(enqueued=False)
    if _scalar(connection, name, *args) is None:
        return new.existing(_scalar(connection, "batch_digest", new.batch_id))
    for further, more in rest:
        connection.execute(_statement(further), _params(more))
    return Submitted(new.batch_id, True, len(new.files))


def _scalar(connection: Connection | Session, name: str, *args: Any) -> Any:
    return connection.execute(_statement(name), _params(args)).scalar()


def _params(args: Sequence[Any]) -> dict[str, Any]:
    """Binds by position; a dict is a json parameter, sent as its JSON text."""
    return {
        f"p{i}": json.dumps(value) if isinstance(value, dict) else value
        for i, value in enumerate(args, start=1)
    }


@functools.cache
def _statement(name: str) -> TextClause:
    """A statement of queries.sql with each `$n` as the bind `(:pn)`.

    The parentheses keep a cast after it (`$2::text[]`) from reading as part of the
    bind's name; comment lines are left out, so no `$n` in a description becomes a bind.
    """
    lines = [line for line in QUERIES[name].splitlines() if not line.startswith("--")]
    return text(_POSITIONAL.sub(r"(:p\1)", "\n".join(lines)))
