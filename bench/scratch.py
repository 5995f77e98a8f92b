"""Throwaway places to benchmark in: a fresh database and a fresh Redis namespace.

The server comes from RECONCILER_DATABASE_URL / RECONCILER_REDIS_URL, else the local
standard ports; a run only ever writes to `bench_<random>` and `bench-<random>:*`,
both removed at the end, so it never touches anyone's data.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from bench.errors import BenchError

LOCAL_DATABASE_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
MIGRATE_TIMEOUT_S: Final = 120.0
REDIS_DELETE_CHUNK: Final = 1000
_SETTING_NAME: Final = re.compile(r"^[a-z_][a-z0-9_.]*$")


@dataclass(frozen=True, slots=True)
class Server:
    """Where to benchmark: an admin database URL, a Redis URL, and Postgres settings
    to give the throwaway databases (`ALTER DATABASE ... SET`), to try tuning
    without changing the service."""

    admin_url: str
    redis_url: str
    pg_settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Server:
        return cls(
            environ.get("RECONCILER_DATABASE_URL") or LOCAL_DATABASE_URL,
            environ.get("RECONCILER_REDIS_URL") or LOCAL_REDIS_URL,
        )


@dataclass(frozen=True, slots=True)
class Scratch:
    """One throwaway database and namespace on the server."""

    database_url: str
    redis_url: str
    namespace: str

    def service_env(self, **extra: str) -> dict[str, str]:
        """Environment for a `reconciler` process: caller's RECONCILER_* tuning kept."""
        env = dict(os.environ)
        env.update(
            RECONCILER_DATABASE_URL=self.database_url,
            RECONCILER_REDIS_URL=self.redis_url,
            RECONCILER_NAMESPACE=self.namespace,
        )
        env.update(extra)
        return env


def pg_setting(text: str) -> tuple[str, str]:
    """`name=value` as a Postgres setting name and value."""
    key, sep, value = text.partition("=")
    if not sep or not _SETTING_NAME.match(key):
        raise ValueError(f"expected name=value with a Postgres setting name, got {text!r}")
    return key, value


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def random_suffix() -> str:
    return secrets.token_hex(5)


@asynccontextmanager
async def scratch(server: Server, label: str = "bench") -> AsyncIterator[Scratch]:
    """Creates a fresh database and namespace; drops both on exit."""
    suffix = random_suffix()
    name = f"{label}_{suffix}"
    await _admin(server.admin_url, f'CREATE DATABASE "{name}"')
    try:
        for key, value in server.pg_settings:
            await _admin(server.admin_url, f'ALTER DATABASE "{name}" SET {key} = {_literal(value)}')
        yield Scratch(with_database(server.admin_url, name), server.redis_url, f"bench-{suffix}")
    finally:
        await _admin(server.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await delete_namespace(server.redis_url, f"bench-{suffix}")


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def delete_namespace(url: str, namespace: str) -> None:
    """Deletes every key under `namespace:` (also a BullMQ prefix's keys)."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        for start in range(0, len(keys), REDIS_DELETE_CHUNK):
            await client.delete(*keys[start : start + REDIS_DELETE_CHUNK])
    finally:
        await client.aclose()


def reconciler_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", *args]


def migrate(place: Scratch) -> None:
    """Runs `reconciler migrate` against the scratch database, as an operator would."""
    done = subprocess.run(
        reconciler_command("migrate"), env=place.service_env(), capture_output=True,
        text=True, timeout=MIGRATE_TIMEOUT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"reconciler migrate failed ({done.returncode}): {done.stderr[-2000:]}")
