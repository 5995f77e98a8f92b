"""Fixtures shared by the suite: real Postgres and Redis, isolated per test."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import asyncpg
import pytest
import redis as sync_redis

from reconciler import migrations
from reconciler.app import Ports, open_ports
from reconciler.config import Settings
from reconciler.database import Database
from tests.services import Endpoints, choose, endpoints, unique_name, with_database


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: Any) -> None:
    # Every coroutine test runs on anyio's asyncio backend; marking before anyio's own
    # hook sees the function keeps parametrize ids and request.param intact.
    if inspect.iscoroutinefunction(obj) and name.startswith("test"):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def services() -> Iterator[Endpoints]:
    with endpoints() as found:
        yield found


def pytest_report_header() -> str:
    return f"reconciler services: {choose()} (see tests/services.py)"


@pytest.fixture(scope="session")
def template_database(services: Endpoints) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    name = unique_name("reconciler_tmpl")
    anyio.run(_create_template, services.database_url, name)
    yield name
    anyio.run(_drop_database, services.database_url, name)


async def _create_template(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    db = await Database.connect(with_database(admin_url, name), max_size=2)
    try:
        await migrations.migrate(db)
    finally:
        await db.close()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(services: Endpoints, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name = unique_name("reconciler_test")
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    yield with_database(services.database_url, name)
    await _drop_database(services.database_url, name)


@pytest.fixture
def namespace(services: Endpoints) -> Iterator[str]:
    """A Redis key prefix for this test alone; its keys are deleted afterwards."""
    name = unique_name("t")
    yield name
    client = sync_redis.Redis.from_url(services.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings(database_url: str, services: Endpoints, namespace: str) -> Settings:
    """Service settings for one test: its own database and namespace, port 0."""
    return Settings(
        database_url=database_url,
        redis_url=services.redis_url,
        namespace=namespace,
        http_host="127.0.0.1",
        http_port=0,
        handler="reconciler.handlers:simulate",
        concurrency=4,
        sweep_interval_s=3600.0,
        stuck_grace_s=0.0,
        visibility_timeout_s=60.0,
        max_attempts=3,
        file_timeout_s=5.0,
        drain_timeout_s=5.0,
        stats_interval_s=0.2,
    )


@pytest.fixture
async def ports(settings: Settings) -> AsyncIterator[Ports]:
    async with open_ports(settings, listen=True) as opened:
        await opened.queue.ensure_group()
        yield opened


@pytest.fixture
def service_env(settings: Settings) -> dict[str, str]:
    """Environment for a real `reconciler` process using this test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(
        RECONCILER_DATABASE_URL=settings.database_url or "",
        RECONCILER_REDIS_URL=settings.redis_url or "",
        RECONCILER_NAMESPACE=settings.namespace,
        RECONCILER_HTTP_HOST="127.0.0.1",
        RECONCILER_HTTP_PORT="0",
        RECONCILER_HANDLER=settings.handler,
        RECONCILER_LOG_FORMAT="json",
        RECONCILER_STATS_INTERVAL_S="0.2",
    )
    return env
