"""GET /api/batches/{id}/summary: 200, 202 with Retry-After, finalize on demand, 404."""

from __future__ import annotations

import httpx

from reconciler.app import Ports, Role
from reconciler.config import Settings
from reconciler.summary_cache import SummaryCache
from tests.api.served import assert_error, body, serving
from tests.helpers import files, lock_held, record, sql, wait_for


async def _summary_ready(http: httpx.AsyncClient, batch_id: str) -> httpx.Response | None:
    response = await http.get(f"/api/batches/{batch_id}/summary")
    return response if response.status_code == 200 else None


async def _finalized(http: httpx.AsyncClient, batch_id: str) -> bool:
    response = await http.get(f"/api/batches/{batch_id}")
    return response.status_code == 200 and response.json()["status"] != "processing"


async def _summaries(settings: Settings) -> int:
    rows = await sql(settings.database_url or "", "SELECT count(*) FROM run_summaries")
    return int(rows[0][0])


async def test_summary_of_a_processed_batch_is_200(settings: Settings, ports: Ports) -> None:
    """With workers running, a batch's summary becomes a 200 with the contract's fields."""
    request = body(files(3, {"sleep_s": 0.01}), batch_id="s1", metadata={"k": "v"})
    request["files"][2]["payload"] = {"fail_attempts": 9, "error": "bad file"}
    async with serving(settings, ports, Role.ALL) as api:
        assert (await api.http.post("/api/batches", json=request)).status_code == 201
        # Polling /summary itself would finalize on demand once the last file is done,
        # racing the event path; the progress endpoint only reads.
        await wait_for(lambda: _finalized(api.http, "s1"), what="s1 finalized")
        ready = await wait_for(lambda: _summary_ready(api.http, "s1"), what="summary 200")
    summary = ready.json()
    assert (summary["status"], summary["finalized_by"]) == ("completed_with_errors", "event")
    assert (summary["total_files"], summary["files_succeeded"], summary["files_failed"]) == (
        3,
        2,
        1,
    )
    assert summary["errors"] == [{"message": "RuntimeError: bad file", "count": 1}]
    assert summary["metadata"] == {"k": "v"} and summary["processing_seconds"]["count"] == 3
    for field in ("created_at", "first_file_started_at", "last_file_completed_at", "completed_at"):
        assert summary[field] is not None, field


async def test_summary_is_202_while_files_remain_then_finalized_on_demand(
    settings: Settings, ports: Ports
) -> None:
    """202 with Retry-After while files remain; then GET finalizes it ('demand'): 200."""
    async with serving(settings, ports, Role.API) as api:  # no worker, no finalizer
        await api.http.post("/api/batches", json=body(files(2), batch_id="d1"))
        await record(ports, "d1", ["f00000"])
        waiting = await api.http.get("/api/batches/d1/summary")
        await record(ports, "d1", ["f00001"], ok=False)
        finalized = await api.http.get("/api/batches/d1/summary")
        again = await api.http.get("/api/batches/d1/summary")
        progress = await api.http.get("/api/batches/d1")
    assert waiting.status_code == 202
    assert int(waiting.headers["retry-after"]) > 0
    pending = waiting.json()
    assert (pending["status"], pending["files_pending"], pending["files_succeeded"]) == (
        "processing", 1, 1,
    )  # fmt: skip
    assert finalized.status_code == 200, finalized.text
    summary = finalized.json()
    assert (summary["finalized_by"], summary["status"]) == ("demand", "completed_with_errors")
    assert again.status_code == 200 and again.json() == summary
    assert progress.json()["finalized_by"] == "demand"
    assert await _summaries(settings) == 1


async def test_summary_is_202_while_another_replica_holds_the_lock(
    settings: Settings, ports: Ports
) -> None:
    """A complete batch whose finalization lock is held elsewhere answers 202, then 200."""
    async with serving(settings, ports, Role.API) as api:
        await api.http.post("/api/batches", json=body(files(1), batch_id="locked"))
        await record(ports, "locked", ["f00000"])
        async with lock_held(ports, "locked"):
            busy = await api.http.get("/api/batches/locked/summary")
        released = await api.http.get("/api/batches/locked/summary")
    assert busy.status_code == 202, busy.text
    assert "retry-after" in busy.headers
    assert busy.json()["files_succeeded"] == 1 and busy.json()["status"] == "processing"
    assert released.status_code == 200
    assert released.json()["finalized_by"] == "demand"


async def test_summary_of_overdue_batch_fails_the_rest_on_demand(
    settings: Settings, ports: Ports
) -> None:
    """Past its deadline, asking for the summary finalizes with the unfinished files failed."""
    async with serving(settings, ports, Role.API) as api:
        request = body(files(2), batch_id="late", deadline_s=3600)
        await api.http.post("/api/batches", json=request)
        await record(ports, "late", ["f00000"])
        await sql(
            settings.database_url or "",
            "UPDATE batches SET deadline_at = now() - interval '1 s' WHERE batch_id = 'late'",
        )
        answer = await api.http.get("/api/batches/late/summary")
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert (summary["files_succeeded"], summary["files_failed"]) == (1, 1)
    assert summary["finalized_by"] == "demand"
    assert "deadline" in summary["errors"][0]["message"]


async def test_summary_of_unknown_batch_is_404(settings: Settings, ports: Ports) -> None:
    """An unknown batch id is a 404 (an in-progress batch is a 202, never a 404)."""
    async with serving(settings, ports, Role.API) as api:
        unknown = await api.http.get("/api/batches/nope/summary")
    assert "nope" in assert_error(unknown, 404)


def test_summary_cache_keeps_the_most_recent_and_ages_out() -> None:
    """The summary cache is bounded (least recently read go first) and entries expire."""
    cache = SummaryCache(entries=2, ttl_s=60)
    cache.put("a", b"A")
    cache.put("b", b"B")
    assert cache.get("a") == b"A"  # now "b" is the least recently read
    cache.put("c", b"C")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"A", None, b"C")
    expired = SummaryCache(entries=2, ttl_s=0)
    expired.put("a", b"A")
    assert expired.get("a") is None
