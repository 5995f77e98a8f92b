"""The hot statements reach their rows by key, in the plan a connection caches.

A generic plan is made once per connection and kept, from whatever the statistics said
then (fresh tables, or autovacuum off, say almost nothing). A plan that reads every
unfinalized batch per flush or finalization costs more the longer the backlog, so each
statement here is planned generically on tables never analyzed and must read only the
rows it touches.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.finalization import Trigger, _arguments
from reconciler.queries import QUERIES
from tests.helpers import files, record, submit

OPEN_BATCHES = 60
UNFINALIZED_INDEX = "batches_unfinalized_idx"


def _scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "Relation Name" in node and "Scan" in node["Node Type"]:
        yield node
    for child in node.get("Plans", []):
        yield from _scans(child)


@asynccontextmanager
async def _rolled_back(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection set up as the service's, inside a transaction rolled back at the end."""
    conn = await asyncpg.connect(settings.database_url or "")
    try:
        await conn.execute(QUERIES["session_settings"])
        tx = conn.transaction()
        await tx.start()
        try:
            yield conn
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def _rows_read(settings: Settings, query: str, *args: Any) -> dict[str, int]:
    """Rows each table's scans returned when `query` ran with a generic plan (rolled back)."""
    async with _rolled_back(settings) as conn:
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args)
    read: dict[str, int] = {}
    for scan in _scans(json.loads(text)[0]["Plan"]):
        rows = int(scan["Actual Rows"]) * int(scan["Actual Loops"])
        read[scan["Relation Name"]] = read.get(scan["Relation Name"], 0) + rows
    return read


async def test_an_outcome_reads_only_its_own_batch(settings: Settings, ports: Ports) -> None:
    """`record_outcomes` for one file of one batch, with many batches unfinalized: one
    row of batch_files and one of batches, not one per unfinalized batch."""
    ids = [(await submit(ports, files(2))).batch_id for _ in range(OPEN_BATCHES)]
    args = ([ids[0]], ["f00000"], [True], [None], [None], [0.01], [1])
    read = await _rows_read(settings, QUERIES["record_outcomes"], *args)
    assert read == {"batch_files": 1, "batches": 1}, read


async def _index_scans(
    settings: Settings, index: str, query: str, *args: Any
) -> tuple[list[asyncpg.Record], int]:
    """`query`'s rows, run once and rolled back, and how many times it scanned `index`:
    the statements inside a function called from it included, which EXPLAIN does not show."""
    async with _rolled_back(settings) as conn:
        rows = await conn.fetch(query, *args)
        scans = await conn.fetchval("SELECT pg_stat_get_xact_numscans($1::regclass)", index)
    return rows, int(scans)


async def test_a_finalization_reads_its_batch_by_key(settings: Settings, ports: Ports) -> None:
    """`reconciler_finalize` of a done batch with many unfinalized: no statement in it
    walks the index of the unfinalized batches to find its batch (one did before
    schema/0013)."""
    for _ in range(OPEN_BATCHES):
        await submit(ports, files(2))
    done = (await submit(ports, files(1))).batch_id
    await record(ports, done, ["f00000"])
    args = _arguments([done], Trigger.EVENT, None)
    rows, scans = await _index_scans(settings, UNFINALIZED_INDEX, QUERIES["finalize"], *args)
    assert [row["outcome"] for row in rows] == ["finalized"]
    assert scans == 0
