"""Applies the versioned SQL files of `schema/` in order, once each.

All of it runs in one transaction under a transaction-level advisory lock, so any
number of replicas may run `reconciler migrate` at once: one applies, the others wait
and then find nothing to do.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Final

from reconciler.database import Database, Session

# An arbitrary constant shared by every replica: the key of the migration lock.
MIGRATION_LOCK_KEY: Final = 0x7265636F6E63  # "reconc"
_FILE_RE: Final = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def _shipped() -> tuple[Migration, ...]:
    # Read once: /readyz asks whether the schema is current on every probe.
    found = []
    for entry in files("reconciler.schema").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


def available() -> list[Migration]:
    """The migrations shipped with this version, in order."""
    return list(_shipped())


async def migrate(db: Database) -> list[Migration]:
    """Applies what is missing; returns what this call applied."""
    async with db.transaction() as session:
        await session.execute("migration_lock", MIGRATION_LOCK_KEY)
        await session.execute("create_migrations_table")
        done = await _applied(session)
        todo = [m for m in available() if m.version not in done]
        for migration in todo:
            await session.execute_script(migration.sql)
            await session.execute("record_migration", migration.version, migration.name)
    return todo


async def pending(db: Database) -> list[Migration]:
    """Migrations not applied yet; empty means the schema is current."""
    async with db.session() as session:
        exists = await session.fetchval("migrations_table_exists")
        done = await _applied(session) if exists else set()
    return [m for m in available() if m.version not in done]


async def _applied(session: Session) -> set[int]:
    return {row["version"] for row in await session.fetch("applied_migrations")}
