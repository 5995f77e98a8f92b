"""Finds the Postgres and Redis the suite talks to, and isolates every test in them.

Order: the URLs in RECONCILER_TEST_DATABASE_URL / RECONCILER_TEST_REDIS_URL, then the
local servers on their standard ports when they answer, then embedded servers started
for the run. Each test gets its own database, cloned from a migrated template, and
its own Redis namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

LOCAL_DATABASE_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
PROBE_TIMEOUT_S: Final = 1.0


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    redis_url: str
    source: str
    pids: tuple[int, ...] = ()


def answers(url: str) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 0), PROBE_TIMEOUT_S
        ):
            return True
    except OSError:
        return False


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def choose() -> str:
    """Which services this run will use: configured, local or embedded."""
    db_url = os.environ.get("RECONCILER_TEST_DATABASE_URL")
    redis_url = os.environ.get("RECONCILER_TEST_REDIS_URL")
    if db_url and redis_url:
        return "configured"
    if not db_url and not redis_url and answers(LOCAL_DATABASE_URL) and answers(LOCAL_REDIS_URL):
        return "local"
    return "embedded"


@contextlib.contextmanager
def endpoints() -> Iterator[Endpoints]:
    """Yields the services for this test run, starting embedded ones if needed."""
    db_url = os.environ.get("RECONCILER_TEST_DATABASE_URL")
    redis_url = os.environ.get("RECONCILER_TEST_REDIS_URL")
    source = choose()
    if source == "configured" and db_url and redis_url:
        yield Endpoints(db_url, redis_url, source)
    elif source == "local":
        yield Endpoints(LOCAL_DATABASE_URL, LOCAL_REDIS_URL, source)
    else:
        with _embedded(db_url, redis_url) as found:
            yield found


@contextlib.contextmanager
def _embedded(db_url: str | None, redis_url: str | None) -> Iterator[Endpoints]:
    from reconciler.embedded import embedded_postgres, embedded_redis

    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reconciler-test-")))
        pids: list[int] = []
        if not db_url:
            postgres = stack.enter_context(embedded_postgres(root))
            db_url, pids = postgres.url, [*pids, postgres.pid]
        if not redis_url:
            redis = stack.enter_context(embedded_redis(root))
            redis_url, pids = redis.url, [*pids, redis.pid]
        yield Endpoints(db_url, redis_url, "embedded", tuple(pids))
