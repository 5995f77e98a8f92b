"""A session cut short by a cancellation leaves no transaction open on the server.

asyncpg prepares a statement (Parse, Describe, Flush) and then binds and executes it
(Bind, Execute, Sync). A cancellation landing between the two used to hand the pooled
connection back while the server sat inside an implicit transaction holding the parse's
locks, until that connection was next used: a TRUNCATE waited for it (the fault sweep
hung there). The connection class below makes the cancellation land exactly there, on a
real connection to the real server.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from reconciler import database
from reconciler.database import Database
from reconciler.errors import InvalidData
from reconciler.queries import QUERIES

# A statement that takes a lock on `batch_files` when it is parsed.
STATEMENT = "claim_unqueued_files"
LOCK_DEADLINE = "5s"  # how long the check may wait for a lock a closing backend gives up


def _cancelling_after_parse(query: str, scope: anyio.CancelScope) -> type[asyncpg.Connection]:
    """A connection class that cancels `scope` once `query` is prepared, before its Bind."""
    armed = [True]

    class CancelledAfterParse(asyncpg.Connection):
        async def _get_statement(self, text: str, *args: Any, **kwargs: Any) -> Any:
            # asyncpg's stubs leave out this private method: every statement passes here.
            statement = await super()._get_statement(text, *args, **kwargs)  # type: ignore[misc]
            if text == query and armed[0]:
                armed[0] = False
                scope.cancel()
                await anyio.lowlevel.checkpoint()  # the cancellation lands here
            return statement

    return CancelledAfterParse


async def _lock_taken(database_url: str) -> bool:
    """Whether another connection can lock `batch_files` exclusively within the deadline."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", LOCK_DEADLINE)
            try:
                await conn.execute("LOCK TABLE batch_files IN ACCESS EXCLUSIVE MODE")
            except asyncpg.LockNotAvailableError:
                return False
        return True
    finally:
        await conn.close()


async def _open(
    database_url: str, connection_class: type[asyncpg.Connection]
) -> tuple[Database, asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=1,
        reset=database._keep_session,
        connection_class=connection_class,
    )
    return Database(pool), pool


@pytest.mark.parametrize("inside", ["session", "transaction"])
async def test_a_cancellation_between_parse_and_bind_leaves_no_lock_behind(
    database_url: str, inside: str
) -> None:
    """The cancelled statement's connection is closed, not pooled with the parse's locks;
    the pool serves the next statement on a new one. (Inside a transaction asyncpg's
    rollback on the way out ends the server's transaction too; both must hold.)"""
    scope = anyio.CancelScope()
    db, _ = await _open(database_url, _cancelling_after_parse(QUERIES[STATEMENT], scope))
    try:
        with scope:
            async with getattr(db, inside)() as session:
                await session.fetch(STATEMENT, 60.0, 10)
        assert scope.cancelled_caught, "the cancellation landed inside the statement"
        assert await _lock_taken(database_url), "no backend holds batch_files"
        assert await db.fetch(STATEMENT, 60.0, 10) == []
    finally:
        await db.close()


async def _server_pid(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return int(conn.get_server_pid())


async def test_a_failed_statement_keeps_its_connection(database_url: str) -> None:
    """An error the server answered leaves the protocol in step: the connection stays."""
    db, pool = await _open(database_url, asyncpg.Connection)
    try:
        before = await _server_pid(pool)
        with pytest.raises(InvalidData):
            async with db.session() as session:  # a negative file count breaks a CHECK
                await session.fetch("insert_batch", "b-1", "r-1", "{}", "d", -1, 60.0)
        assert await _server_pid(pool) == before
    finally:
        await db.close()
