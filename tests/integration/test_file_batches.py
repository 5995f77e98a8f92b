"""A file belongs to a batch that exists (schema/0012): checked per statement, not per row."""

from __future__ import annotations

import asyncpg
import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.helpers import files, sql, submit


async def _files_of(settings: Settings, batch_id: str) -> int:
    rows = await sql(
        settings.database_url or "",
        "SELECT count(*) FROM batch_files WHERE batch_id = $1",
        batch_id,
    )
    return int(rows[0][0])


async def test_files_without_their_batch_are_refused_and_none_is_written(
    settings: Settings, ports: Ports
) -> None:
    """One statement of files for an existing batch and a missing one fails whole."""
    kept = await submit(ports, files(1))
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="missing"):
        await sql(
            settings.database_url or "",
            "INSERT INTO batch_files (batch_id, file_id, uri)"
            " SELECT unnest($1::text[]), unnest($2::text[]), 'mem://x'",
            [kept.batch_id, "missing"],
            ["extra-1", "extra-2"],
        )
    assert await _files_of(settings, kept.batch_id) == 1
    assert await _files_of(settings, "missing") == 0


async def test_deleting_batches_deletes_their_files_only(settings: Settings, ports: Ports) -> None:
    """One statement deleting two batches takes their files; a third batch keeps its own."""
    first, second, third = [(await submit(ports, files(3))).batch_id for _ in range(3)]
    await sql(
        settings.database_url or "",
        "DELETE FROM batches WHERE batch_id = ANY ($1::text[])",
        [first, second],
    )
    counts = [await _files_of(settings, b) for b in (first, second, third)]
    assert counts == [0, 0, 3]


async def test_a_file_cannot_move_to_another_batch(settings: Settings, ports: Ports) -> None:
    """Even to a batch that exists: a file's batch_id never changes."""
    one, other = [(await submit(ports, files(1))).batch_id for _ in range(2)]
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="never changes"):
        await sql(
            settings.database_url or "",
            "UPDATE batch_files SET batch_id = $1 WHERE batch_id = $2",
            other,
            one,
        )
    assert [await _files_of(settings, b) for b in (one, other)] == [1, 1]
