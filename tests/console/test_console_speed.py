"""The console's pages stay fast with 100,000 batches in the table.

The batches are made in SQL with generate_series (90% finalized within the last two
hours, with their run summaries; 10% in progress, some stuck; one batch of 5,000
files), then each page is asked for several times over real HTTP. The figure in
docs/PERFORMANCE.md is this test's output (`-s` prints it).
"""

from __future__ import annotations

import re
import statistics
from typing import Final

import httpx

from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.api.served import serving
from tests.helpers import sql

BATCHES: Final = 100_000
REPEATS: Final = 7
BUDGET_S: Final = 0.100  # the bound on the server time of a page

FILL: Final = [
    # Every batch; one in ten still processing, created 50 ms apart, newest first.
    """INSERT INTO batches (batch_id, run_id, status, files_digest, total_files,
                           files_succeeded, files_failed, created_at, last_file_completed_at,
                           completed_at, finalized_by)
    SELECT 'batch-' || lpad(i::text, 6, '0'), 'run-' || (i / 100), s.status, '', 5,
           CASE WHEN i % 10 = 0 THEN i % 6 ELSE 4 END, CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END,
           now() - i * interval '50 ms', now() - i * interval '50 ms' + interval '2 s',
           CASE WHEN i % 10 <> 0 THEN now() - i * interval '50 ms' + interval '2.1 s' END,
           CASE WHEN i % 10 <> 0 THEN (ARRAY['event', 'sweep', 'demand'])[1 + i % 3] END
    FROM generate_series(1, $1) i,
         LATERAL (SELECT CASE WHEN i % 10 = 0 THEN 'processing'
                              ELSE 'completed_with_errors' END AS status) s""",
    # The finalized ones' summaries: the overview's hour reads them.
    """INSERT INTO run_summaries (batch_id, run_id, status, finalized_by, total_files,
           files_succeeded, files_failed, created_at, last_file_completed_at, completed_at,
           processing_seconds, errors, totals, metadata)
    SELECT batch_id, run_id, status, finalized_by, total_files, files_succeeded, files_failed,
           created_at, last_file_completed_at, completed_at, '{"count": 0}', '[]', '{}', '{}'
    FROM batches WHERE status <> 'processing'""",
    # The unfinished batches' files (the list counts those processing) and one big batch.
    """INSERT INTO batch_files (batch_id, file_id, uri, status)
    SELECT b.batch_id, 'f' || n, 'mem://f' || n,
           CASE WHEN n < 2 THEN 'processing' ELSE 'pending' END
    FROM batches b, generate_series(0, 4) n WHERE b.status = 'processing'""",
    """INSERT INTO batch_files (batch_id, file_id, uri, status, error, attempts)
    SELECT 'batch-000001', 'big-' || lpad(n::text, 5, '0'), 'mem://' || n, 'failed', 'boom', 3
    FROM generate_series(1, 5000) n""",
    "VACUUM ANALYZE",  # as autovacuum leaves a table at rest: index-only scans work
]
PAGES: Final = {
    "overview": "/ui/",
    "batches, first page": "/ui/batches",
    "batches, page 100": None,  # the cursor is read off the first page
    "batches, status=processing": "/ui/batches?status=processing",
    "batches, stuck": "/ui/batches?stuck=true",
    "batches, run id": "/ui/batches?run=run-500",
    "batches, id prefix": "/ui/batches?q=batch-0999",
    "batch detail (5,000 files)": "/ui/batches/batch-000001",
    "batch detail, failed files": "/ui/batches/batch-000001?files=failed",
}


async def _timed(http: httpx.AsyncClient, path: str) -> tuple[float, float]:
    """The server's time on the first request, and the median of the ones after it,
    from the page's `Server-Timing` header (the client's own time adds the loopback)."""
    seconds = []
    for _ in range(REPEATS + 1):
        answer = await http.get(path)
        assert answer.status_code == 200, (path, answer.text[:300])
        timing = re.fullmatch(r"page;dur=([\d.]+)", answer.headers["server-timing"])
        assert timing, answer.headers["server-timing"]
        seconds.append(float(timing.group(1)) / 1000)
    return seconds[0], statistics.median(seconds[1:])


async def test_every_page_answers_within_100_ms_with_100k_batches(
    settings: Settings, ports: Ports, database_url: str
) -> None:
    """Keyset pages and indexed reads: each page's median time stays under the budget."""
    for statement in FILL:
        await sql(database_url, statement, *([BATCHES] if "$1" in statement else []))
    found: dict[str, tuple[float, float]] = {}
    async with serving(settings, ports, Role.API) as served:
        cursor = f"{await _created_at(database_url, 5000)}|batch-005000"
        paths = {**PAGES, "batches, page 100": f"/ui/batches?{httpx.QueryParams(after=cursor)}"}
        for name, path in paths.items():
            assert path is not None
            found[name] = await _timed(served.http, path)
    print(f"\nconsole pages with {BATCHES} batches: first request, median of {REPEATS} more")
    for name, (first, median) in found.items():
        print(f"  {name:<32} {first * 1000:6.1f} ms {median * 1000:6.1f} ms")
    slow = {name: median for name, (_, median) in found.items() if median > BUDGET_S}
    assert not slow, slow


async def _created_at(database_url: str, n: int) -> str:
    rows = await sql(
        database_url, "SELECT created_at FROM batches WHERE batch_id = $1", f"batch-{n:06d}"
    )
    return str(rows[0][0].isoformat())
