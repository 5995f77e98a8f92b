"""Retention's cursor: each statement starts where the last chunk ended, and every
RESCAN_S from the start, which picks up a batch skipped because it was held."""

from __future__ import annotations

from typing import Final

import asyncpg

from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.retention import Retention
from tests.helpers import sql

# Finalized batches old-1..old-$1 of no files, completed 40 days ago, a second apart.
_OLD: Final = """
INSERT INTO batches (batch_id, run_id, status, files_digest, total_files, created_at,
                     completed_at, finalized_by)
SELECT 'old-' || g, 'r', 'completed', 'd', 0, t, t, 'event'
FROM (SELECT g, now() - interval '40 days' + g * interval '1 second' AS t
      FROM generate_series(1, $1::integer) g) s
"""


async def _left(url: str) -> list[str]:
    rows = await sql(url, "SELECT batch_id FROM batches ORDER BY batch_id")
    return [r[0] for r in rows]


async def test_a_held_batch_is_skipped_then_found_by_the_next_rescan(
    settings: Settings, ports: Ports
) -> None:
    """The oldest batch, locked by another transaction, is skipped without waiting; the
    cursor then starts past it, and only a scan from the start deletes it."""
    url = settings.database_url or ""
    await sql(url, _OLD, 3)
    holder = await asyncpg.connect(url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM batches WHERE batch_id = 'old-1' FOR UPDATE")
            cursor = Retention(ports.db, 30, rescan_s=3600)
            assert (await cursor.delete_expired()).batches == 2
    finally:
        await holder.close()
    assert await _left(url) == ["old-1"]
    assert (await cursor.delete_expired()).batches == 0  # starts after old-3
    assert await _left(url) == ["old-1"]
    rescanning = Retention(ports.db, 30, rescan_s=0)
    assert (await rescanning.delete_expired()).batches == 1
    assert await _left(url) == []


async def test_chunks_follow_one_another_within_a_pass(settings: Settings, ports: Ports) -> None:
    """Chunks of 2, at most 3 statements a pass: 6 batches a pass, in age order."""
    url = settings.database_url or ""
    await sql(url, _OLD, 8)
    retention = Retention(ports.db, 30, chunk_batches=2, statements=3)
    first = await retention.delete_expired()
    assert (first.batches, first.statements) == (6, 3)
    assert await _left(url) == ["old-7", "old-8"]
    second = await retention.delete_expired()
    assert (second.batches, second.statements) == (2, 2)
    assert await _left(url) == []
