"""The Postgres port: a pool, named queries from `queries.sql`, translated errors.

Nothing outside this module sees asyncpg: records come back as read-only mappings and
driver exceptions become RetryableError or TerminalError.

Behind a pooler in transaction mode (`RECONCILER_DATABASE_POOLER=transaction`, PgBouncer's
`pool_mode = transaction`) consecutive transactions of one pooled connection may run on
different server connections, and a server connection serves other clients in between:
the pool then keeps no server-side statement cache and leaves no session state behind
(see `_connection_options`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, cast

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from reconciler.config import DATABASE_POOLER, Pooler
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
    # Client-side only: the codecs of built-in types need no query.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _init_session(conn: asyncpg.Connection) -> None:
    # The hot statements join a few hundred unnest()ed keys to batch_files by primary
    # key. With disk-era page costs Postgres picks full scans that grow with the table;
    # with cached-page costs it uses the index. Plans are cached (plan_cache_mode is
    # left at its default, auto, which plans the API's optional-filter lists for their
    # values; reconciler_finalize forces generic plans for its own statements, schema/0010):
    # a generic plan reads an unnest() as a few rows, so it joins by the primary key too.
    # Forcing custom plans everywhere cost about a quarter of Postgres's CPU per file.
    await conn.execute(QUERIES["session_settings"])
    await _init_connection(conn)


async def _init_pooled(conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    # asyncpg asks the catalog for an array type's codec the first time a connection
    # meets it, between two session-level `set_config('jit', ...)` calls. Outside a
    # transaction those three statements may run on three server connections and leave
    # `jit` off on one that other clients get next; inside one they cannot.
    async with conn.transaction():
        await conn.fetchrow(QUERIES["array_codecs"], None, None, None, None)


def _connection_options(pooler: Pooler) -> dict[str, Any]:
    """What differs between a connection of its own and a transaction-pooled one."""
    if pooler != "transaction":
        # Directly or through session pooling the server connection is ours for the
        # pooled connection's life (PgBouncer runs DISCARD ALL when it closes).
        return {"init": _init_session}
    # No named statements: the next transaction may run on a server connection that
    # has another client's `__asyncpg_stmt_N__`, or lacks ours. With the cache off,
    # asyncpg parses each statement unnamed again right before its Bind, so the pooler
    # cannot split Parse from Execute; an unnamed statement is planned with its actual
    # parameters every time, which is what `plan_cache_mode` is set for above.
    # No session settings either: they would stay on the server connection for its next
    # client. `random_page_cost` belongs in the role or database settings there
    # (docs/deploy.md).
    return {"init": _init_pooled, "statement_cache_size": 0}


async def _keep_session(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset runs RESET ALL and more on every release: a round trip
    # per pooled statement, and it would undo the planner settings above. Nothing
    # here leaves session state behind (only transaction-level locks, no LISTEN, no
    # cursors), and stray transactions are still rolled back by the pool itself; the one
    # asyncpg cannot see (a cancelled prepare's) is closed by `_dropped_if_interrupted`.
    # Behind a transaction pooler a reset would run on whichever server connection is free.
    return None


@contextmanager
def _dropped_if_interrupted(conn: PoolConnectionProxy[asyncpg.Record]) -> Iterator[None]:
    """Closes the connection when a cancellation (or any BaseException that is not an
    Exception) ends its use, instead of handing it back to the pool.

    asyncpg prepares a statement with Parse, Describe and Flush, not Sync, and sends
    Bind, Execute and Sync once the description is back. A cancellation landing between
    the two leaves the server inside an implicit transaction, holding the locks the
    parse took, while asyncpg believes the connection idle; `_keep_session` sends
    nothing on release, so the pool kept that connection, and its locks, until it was
    next used. A TRUNCATE or a migration's ALTER waited for them meanwhile (the fault
    sweep hung on it). A closed connection ends the server's transaction at once and
    the pool opens another when it needs one. An Exception (a failed statement) leaves
    the protocol in step, and the connection is kept.
    """
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            conn.terminate()
        raise


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
    async def connect(
        cls, url: str, *, max_size: int = POOL_MAX_SIZE, pooler: Pooler = DATABASE_POOLER
    ) -> Database:
        async with translated():
            pool = await asyncpg.create_pool(
                url,
                min_size=POOL_MIN_SIZE,
                max_size=max_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                reset=_keep_session,
                **_connection_options(pooler),
            )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One pooled connection, no transaction (each statement commits)."""
        async with translated(), self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
            with _dropped_if_interrupted(conn):
                yield Session(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """One pooled connection inside a transaction, committed on normal exit."""
        async with translated(), self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
            with _dropped_if_interrupted(conn):
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


class Listening:
    """A dedicated connection LISTENing on channels; `lost` is set when it drops."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.lost = anyio.Event()
        self.backend_pid = conn.get_server_pid()

    async def until_lost(self, check_interval_s: float) -> None:
        """Returns once the connection is gone; a check each interval finds a silent drop."""
        while not self.lost.is_set():
            with anyio.move_on_after(check_interval_s):
                await self.lost.wait()
            if not self.lost.is_set():
                async with translated():
                    await self._conn.fetchval(QUERIES["ping"], timeout=CONNECT_TIMEOUT_S)


@asynccontextmanager
async def listening(
    url: str, channels: Sequence[str], on_notify: Callable[[str, str], None]
) -> AsyncIterator[Listening]:
    """A connection of its own (LISTEN is session state: never a pooled one)."""
    # Not shielded: asyncpg closes its socket when cancelled mid-handshake, and a stop
    # must not wait for the connect timeout while Postgres is unreachable.
    async with translated():
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        handle = Listening(conn)
        conn.add_termination_listener(lambda _: handle.lost.set())
        async with translated():
            for channel in channels:
                await conn.add_listener(channel, lambda _c, _p, ch, data: on_notify(ch, data))
        yield handle
    finally:
        conn.terminate()


def columns(rows: Sequence[Row], *names: str) -> tuple[list[Any], ...]:
    """Transposes rows into one list per column, for unnest() parameters."""
    return tuple([row[name] for row in rows] for name in names)


def nulls_folded(column: list[Any]) -> list[Any] | None:
    """A column of NULLs only, as one NULL array: a multi-argument unnest() pads it back
    to NULLs, and asyncpg need not encode each element (two ABC checks per element)."""
    return None if column.count(None) == len(column) else column
