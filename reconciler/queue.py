"""The Redis port: the job stream, its consumer group and the dead-letter stream.

Acknowledged entries are deleted from the stream at once, so the stream holds only
jobs not yet done. Beside it, the set `{ns}:queued` names every file that has a job
on the stream, written in the same MULTI as the job and removed with its XACK, so
the sweeper asks "is this file's job still there?" with one SMISMEMBER and Postgres
never stores stream ids. The key `{ns}:intact` exists from the first sweep on; when
it is gone, Redis lost the namespace's data and the sweeper re-enqueues at once.
Driver exceptions become the service's own here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from reconciler import resp
from reconciler.errors import MisconfiguredDependency, RetryableError, TerminalError

DEAD_LETTER_MAX_LEN: Final = 100_000
SOCKET_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5.0
HEALTH_CHECK_INTERVAL_S: Final = 15
AUTH_HINT: Final = (
    "redis: authentication failed ({}): check the user name and password in"
    " RECONCILER_REDIS_URL (redis://user:password@host:port/db)"
)
TLS_HINT: Final = (
    "redis: {} over TLS: RECONCILER_REDIS_URL is rediss:// but the server did not answer"
    " the TLS handshake, so it most likely does not speak TLS on that port; use redis://"
    " for a plain port, or the port where the server listens for TLS"
)
# Server states that pass: out of memory, loading, failing over, a replica read-only.
_RETRYABLE_REPLIES: Final = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
)

# Acknowledges an entry and, only if it was still pending, copies it to the dead-letter
# stream: a retried call after a lost reply writes no second dead letter.
# KEYS: stream, dead stream, queued set. ARGV: group, id, member or '', maxlen, fields.
_DEAD_LETTER_LUA: Final = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('SREM', KEYS[3], ARGV[3]) end
return acked
"""

# Appends jobs and marks their files queued, in one atomic step and one round trip
# (a MULTI of one XADD per job costs a reply to parse per job, and more to pack).
# KEYS: stream, queued set. ARGV: number of jobs, then per job its number of field/value
# pairs and the pairs, then the members. Returns the new entries' ids.
_ENQUEUE_LUA: Final = """
local ids = {}
local i = 2
for e = 1, tonumber(ARGV[1]) do
  local pairs_end = i + 2 * tonumber(ARGV[i])
  ids[e] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, pairs_end))
  i = pairs_end + 1
end
for j = i, #ARGV, 1000 do
  redis.call('SADD', KEYS[2], unpack(ARGV, j, math.min(j + 999, #ARGV)))
end
return ids
"""

# Removes the group's consumers with nothing pending, idle at least ARGV[2] ms (and
# named ARGV[3], unless it is ''). Checked and removed in one step: a consumer that
# reads between a check and a removal would otherwise lose its pending entries.
_PRUNE_LUA: Final = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end
local removed = {}
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2])
     and (ARGV[3] == '' or info['name'] == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"""


# Not frozen: one is made per file, and a frozen dataclass's __init__ costs 4x.
@dataclass(slots=True)
class Delivery:
    """One stream entry handed to this consumer."""

    id: str
    fields: dict[bytes, bytes]


@asynccontextmanager
async def translated(tls: bool = False) -> AsyncIterator[None]:
    """Turns redis exceptions into the service's own, without connection details.

    `tls`: the URL is rediss://, so a connect that times out names TLS as the likely cause.
    """
    try:
        yield
    except redis_errors.AuthenticationError as exc:
        raise MisconfiguredDependency(AUTH_HINT.format(exc), "authentication") from exc
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        if tls and _connect_timed_out(exc):
            raise MisconfiguredDependency(TLS_HINT.format(exc), "tls") from exc
        raise RetryableError(f"redis: {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        # uvloop reports a write to a connection the peer already reset this way.
        if "handler is closed" not in str(exc):
            raise
        raise RetryableError(f"redis: connection closed: {exc}") from exc
    except _RETRYABLE_REPLIES as exc:
        raise RetryableError(f"redis: {type(exc).__name__}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise TerminalError(f"redis: {type(exc).__name__}: {exc}") from exc


def _connect_timed_out(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.TimeoutError | TimeoutError) and "connect" in str(exc)


def _is_missing_group(exc: redis_errors.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class JobQueue:
    """Jobs for one namespace: `{ns}:jobs`, group `{ns}:workers`, `{ns}:dead`."""

    def __init__(self, client: aioredis.Redis, namespace: str, tls: bool = False) -> None:
        self._redis = client
        self._tls = tls
        self.stream = f"{namespace}:jobs"
        self.group = f"{namespace}:workers"
        self.dead = f"{namespace}:dead"
        self.queued = f"{namespace}:queued"
        self.intact = f"{namespace}:intact"
        self._dead_letter = client.register_script(_DEAD_LETTER_LUA)
        self._prune = client.register_script(_PRUNE_LUA)
        self._enqueue = client.register_script(_ENQUEUE_LUA)

    @classmethod
    def connect(cls, url: str, namespace: str) -> JobQueue:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
        )
        resp.in_c(client)
        return cls(client, namespace, tls=url.startswith("rediss:"))

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        async with translated(self._tls):
            await self._redis.ping()

    async def ensure_group(self) -> None:
        """Creates the stream and group if missing (first start, or Redis lost them)."""
        async with translated(self._tls):
            try:
                await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, entries: Sequence[dict[str, str]], members: Sequence[str]) -> list[str]:
        """Appends jobs and marks their files queued, atomically; returns the stream ids."""
        args: list[str | int] = [len(entries)]
        for fields in entries:
            args.append(len(fields))
            for pair in fields.items():
                args.extend(pair)
        args.extend(members)
        async with translated(self._tls):
            ids = await self._enqueue(keys=[self.stream, self.queued], args=args)
        return [i.decode() for i in ids]

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New jobs for this consumer, waiting up to block_ms for the first."""
        reply = await self._group_call(
            self._redis.xreadgroup,
            self.group, consumer, {self.stream: ">"}, count=count, block=block_ms,
        )  # fmt: skip
        if not reply:
            return []
        return [Delivery(i.decode(), f) for i, f in reply[0][1] if f is not None]

    async def claim_idle(
        self, consumer: str, min_idle_ms: int, count: int, cursor: str
    ) -> tuple[str, list[Delivery]]:
        """Takes over jobs left idle by a stopped consumer; returns the next cursor."""
        reply = await self._group_call(
            self._redis.xautoclaim,
            self.stream, self.group, consumer, min_idle_ms, start_id=cursor, count=count,
        )  # fmt: skip
        if not reply:
            return "0-0", []
        next_cursor, messages = reply[0], reply[1]
        found = [Delivery(i.decode(), f) for i, f in messages if f is not None]
        return next_cursor.decode(), found

    async def renew(self, consumer: str, ids: Sequence[str]) -> None:
        """Resets the idle time of these jobs, held by this consumer: its Redis lease."""
        if ids:
            await self._group_call(
                self._redis.xclaim, self.stream, self.group, consumer, 0, list(ids), justid=True
            )

    async def release(self, consumer: str, max_count: int, idle_ms: int) -> int:
        """Marks this consumer's pending jobs idle for `idle_ms`: others claim them now."""
        pending = await self._group_call(
            self._redis.xpending_range,
            self.stream, self.group, "-", "+", max_count, consumername=consumer,
        )  # fmt: skip
        ids = [entry["message_id"] for entry in pending or []]
        if ids:
            await self._group_call(
                self._redis.xclaim, self.stream, self.group, consumer, 0, ids,
                idle=idle_ms, justid=True,
            )  # fmt: skip
        return len(ids)

    async def ack(self, ids: Sequence[str], members: Sequence[str]) -> None:
        """Acknowledges and deletes done jobs, and unmarks their files, in one round trip."""
        if not ids:
            return
        async with translated(self._tls):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            if members:
                pipe.srem(self.queued, *members)
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: str, member: str | None) -> None:
        """Moves a job to the dead-letter stream with its reason; its file is no longer queued."""
        fields: dict[bytes, bytes | str] = dict(delivery.fields)
        fields.update({b"reason": reason, b"original_id": delivery.id, b"stream": self.stream})
        pairs: list[bytes | str | int] = [item for pair in fields.items() for item in pair]
        keys = [self.stream, self.dead, self.queued]
        args = [self.group, delivery.id, member or "", DEAD_LETTER_MAX_LEN, *pairs]
        await self._group_call(self._dead_letter, keys=keys, args=args)

    async def prune_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        """Removes consumers idle this long with nothing pending; returns their names."""
        args: list[str | int] = [self.group, min_idle_ms, only or ""]
        async with translated(self._tls):
            removed: list[bytes] = await self._prune(keys=[self.stream], args=args)
        return [name.decode() for name in removed]

    async def take_recovery(self) -> bool:
        """True for one caller after Redis lost the namespace (or on first use)."""
        async with translated(self._tls):
            return bool(await self._redis.set(self.intact, "1", nx=True))

    async def missing(self, members: Sequence[str]) -> set[str]:
        """Which of these files have no job on the stream (all, if the stream is gone)."""
        if not members:
            return set()
        async with translated(self._tls):
            pipe = self._redis.pipeline(transaction=True)
            pipe.exists(self.stream)
            pipe.smismember(self.queued, list(members))
            exists, flags = await pipe.execute()
        if not exists:
            return set(members)
        return {m for m, queued in zip(members, flags, strict=True) if not queued}

    async def length(self) -> int:
        """Jobs on the stream: waiting plus in flight (done ones are deleted)."""
        async with translated(self._tls):
            return int(await self._redis.xlen(self.stream))

    async def dead_letters(self, count: int = 100, after: str | None = None) -> list[Delivery]:
        """Dead letters oldest first, at most `count`, only those after entry `after`."""
        start = "-" if after is None else f"({after}"
        async with translated(self._tls):
            reply: Any = await self._redis.xrange(self.dead, min=start, count=count)
        return [Delivery(i.decode(), f) for i, f in reply]

    async def dead_letter_count(self) -> int:
        """How many entries the dead-letter stream holds."""
        async with translated(self._tls):
            return int(await self._redis.xlen(self.dead))

    async def _group_call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls a group command; recreates the group once if Redis lost it."""
        async with translated(self._tls):
            try:
                return await method(*args, **kwargs)
            except redis_errors.ResponseError as exc:
                if not _is_missing_group(exc):
                    raise
        await self.ensure_group()
        return None
