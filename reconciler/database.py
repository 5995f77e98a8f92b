"""The Postgres port: a pool, named queries from `queries.sql`, translated errors.

Nothing outside this module sees asyncpg: records come back as read-only mappings and
driver exceptions become RetryableError or TerminalError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from reconciler.errors import InvalidData, RetryableError, TerminalError
from reconciler.queries import QUERIES

Row = Mapping[str, Any]
POOL_MIN_SIZE: Final = 1
POOL_MAX_SIZE: Final = 10
CONNECT_TIMEOUT_S: Final = 5.0
COMMAND_TIMEOUT_S: Final = 30.0
# Class 08 (connection), 40 (serialization, deadlock), 53 (resources), 57 (shutdown).
_RETRYABLE_CLASSES: Final = ("08", "40", "53", "57")
# Class 22 (data exception), 23 (integrity), 54 (limit exceeded): the value is at fault.
_INVALID_DATA_CLASSES: Final = ("22", "23", "54")


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _RETRYABLE_CLASSES
    return isinstance(
        exc, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError
    )


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turns driver exceptions into the service's own, without connection details."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise _kind(exc)(f"postgres: {type(exc).__name__}: {exc}") from exc
    except UnicodeEncodeError as exc:
        raise InvalidData(f"postgres: text is not valid UTF-8: {exc.reason}") from exc


def _kind(exc: BaseException) -> type[TerminalError | RetryableError]:
    if _is_retryable(exc):
        return RetryableError
    if isinstance(exc, asyncpg.PostgresError):
        if str(exc.sqlstate or "")[:2] in _INVALID_DATA_CLASSES:
            return InvalidData
    return TerminalError


async def _init_connection(conn: asyncpg.Connection) -> None:
    # The hot statements join a few hundred unnest()ed keys to batch_files by primary
    # key. With disk-era page costs Postgres picks full scans that grow with the table;
    # with cached-page costs it uses the index. Plans are cached (plan_cache_mode is
    # left at its default, auto): a generic plan reads an unnest() as a few rows, so it
    # joins by the primary key too, and planning finalize_batch and record_outcomes
    # anew on every execution cost about a quarter of Postgres's CPU per file.
    await conn.execute(QUERIES["session_settings"])
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset runs RESET ALL and more on every release: a round trip
    # per pooled statement, and it would undo the planner settings above. Nothing
    # here leaves session state behind (only transaction-level locks, no LISTEN, no
    # cursors), and stray transactions are still rolled back by the pool itself.
    return None


class Session:
    """Named queries on one connection, usually inside a transaction."""

    def __init__(self, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        self._conn = conn

    async def fetch(self, name: str, *args: Any) -> list[Row]:
        async with translated():
            return cast(list[Row], await self._conn.fetch(QUERIES[name], *args))

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        async with translated():
            return cast(Row | None, await self._conn.fetchrow(QUERIES[name], *args))

    async def fetchval(self, name: str, *args: Any) -> Any:
        async with translated():
            return await self._conn.fetchval(QUERIES[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        async with translated():
            return await self._conn.execute(QUERIES[name], *args)

    async def execute_script(self, sql: str) -> None:
        """Runs reviewed DDL text (migrations), which takes no parameters."""
        async with translated():
            await self._conn.execute(sql)


class Database:
    """A pool of connections to the service's database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, url: str, *, max_size: int = POOL_MAX_SIZE) -> Database:
        async with translated():
            pool = await asyncpg.create_pool(
                url,
                min_size=POOL_MIN_SIZE,
                max_size=max_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                init=_init_connection,
                reset=_keep_session,
            )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One pooled connection, no transaction (each statement commits)."""
        async with translated(), self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
            yield Session(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """One pooled connection inside a transaction, committed on normal exit."""
        async with translated(), self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
            async with conn.transaction():
                yield Session(conn)

    async def fetch(self, name: str, *args: Any) -> list[Row]:
        async with self.session() as session:
            return await session.fetch(name, *args)

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        async with self.session() as session:
            return await session.fetchrow(name, *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        async with self.session() as session:
            return await session.fetchval(name, *args)

    async def execute(self, name: str, *args: Any) -> str:
        async with self.session() as session:
            return await session.execute(name, *args)


def columns(rows: Sequence[Row], *names: str) -> tuple[list[Any], ...]:
    """Transposes rows into one list per column, for unnest() parameters."""
    return tuple([row[name] for row in rows] for name in names)
