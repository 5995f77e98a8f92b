"""Migrations: idempotent, and safe when many replicas run them at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from reconciler import migrations
from reconciler.database import Database
from tests.services import Endpoints, unique_name, with_database


@pytest.fixture
async def empty_database(services: Endpoints) -> AsyncIterator[str]:
    name = unique_name("reconciler_empty")
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(services.database_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_applying_twice_applies_nothing_the_second_time(empty_database: str) -> None:
    """The second run finds the schema current and changes nothing."""
    db = await Database.connect(empty_database, max_size=2)
    try:
        first = await migrations.migrate(db)
        second = await migrations.migrate(db)
        assert [m.version for m in first] == [m.version for m in migrations.available()]
        assert second == [] and await migrations.pending(db) == []
    finally:
        await db.close()


async def test_concurrent_migrations_apply_once(empty_database: str) -> None:
    """Five replicas migrating at once all succeed and the schema is applied once."""
    applied: list[int] = []

    async def replica() -> None:
        db = await Database.connect(empty_database, max_size=1)
        try:
            applied.append(len(await migrations.migrate(db)))
        finally:
            await db.close()

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(replica)
    assert sorted(applied) == [0, 0, 0, 0, len(migrations.available())]


async def test_pending_lists_everything_on_an_empty_database(empty_database: str) -> None:
    """Before `migrate`, every shipped migration is pending (readiness reports it)."""
    db = await Database.connect(empty_database, max_size=1)
    try:
        assert await migrations.pending(db) == migrations.available()
    finally:
        await db.close()
