"""Cancel, retry-failed, audit and dead letters over real HTTP, with a bearer token."""

from __future__ import annotations

from dataclasses import replace

import httpx

from reconciler.app import Ports, Role
from reconciler.config import Settings
from reconciler.finalization import finalize
from tests.api.served import assert_error, samples, serving
from tests.helpers import files, record, submit

TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _guarded(settings: Settings) -> Settings:
    return replace(settings, api_token=TOKEN, api_token_name="ops-team")


async def _cancel(http: httpx.AsyncClient, batch_id: str, **body: str) -> httpx.Response:
    return await http.post(f"/api/batches/{batch_id}/cancel", json=body, headers=AUTH)


async def test_cancel_needs_the_token_a_reason_and_an_unfinalized_batch(
    settings: Settings, ports: Ports
) -> None:
    """401 without the token, 422 without a reason, 200 finalized by `operator`, then 409."""
    batch = await submit(ports, files(2))
    async with serving(_guarded(settings), ports, Role.API) as served:
        # The counter is the process's: other tests in this process may have moved it.
        counted = samples((await served.http.get("/metrics")).text)
        url = f"/api/batches/{batch.batch_id}/cancel"
        assert_error(await served.http.post(url, json={"reason": "x"}), 401)
        assert_error(await _cancel(served.http, batch.batch_id), 422)
        assert_error(await _cancel(served.http, batch.batch_id, reason="   "), 422)
        done = await _cancel(served.http, batch.batch_id, reason="runaway")
        again = await _cancel(served.http, batch.batch_id, reason="runaway")
        missing = await _cancel(served.http, "no-such-batch", reason="runaway")
        scraped = samples((await served.http.get("/metrics")).text)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "completed_with_errors"
    assert (body["finalized_by"], body["files_failed"]) == ("operator", 2)
    assert "already finalized" in assert_error(again, 409)
    assert_error(missing, 404)
    cancels = ("reconciler_operator_actions_total", (("action", "cancel"),))
    assert scraped[cancels] - counted.get(cancels, 0.0) == 1


async def test_retry_failed_answers_the_new_batch_and_the_audit_names_the_token(
    settings: Settings, ports: Ports
) -> None:
    """201 a child batch in the same run, 200 when repeated, 409 when nothing failed."""
    batch = await submit(ports, files(2), run_id="run-9")
    await record(ports, batch.batch_id, ["f00000"], ok=False)
    await record(ports, batch.batch_id, ["f00001"])
    await finalize(ports.db, batch.batch_id, "event")
    clean = await submit(ports, files(1, prefix="c"))
    await record(ports, clean.batch_id, ["c00000"])
    await finalize(ports.db, clean.batch_id, "event")
    body = {"reason": "flaky upstream", "batch_id": "retry-1"}
    async with serving(_guarded(settings), ports, Role.API) as served:
        url = f"/api/batches/{batch.batch_id}/retry-failed"
        assert_error(await served.http.post(url, json=body), 401)
        created = await served.http.post(url, json=body, headers=AUTH)
        repeated = await served.http.post(url, json=body, headers=AUTH)
        clean_url = f"/api/batches/{clean.batch_id}/retry-failed"
        nothing = await served.http.post(clean_url, json=body, headers=AUTH)
        audit = await served.http.get(f"/api/batches/{batch.batch_id}/audit")
    assert created.status_code == 201, created.text
    child = created.json()
    assert (child["batch_id"], child["run_id"]) == ("retry-1", "run-9")
    assert child["parent_batch_id"] == batch.batch_id
    assert child["total_files"] == 1
    assert repeated.status_code == 200 and repeated.json()["total_files"] == 1
    assert "no failed file" in assert_error(nothing, 409)
    assert audit.status_code == 200
    [entry] = audit.json()["items"]
    assert (entry["action"], entry["reason"]) == ("retry_failed", "flaky upstream")
    assert entry["actor"] == "token:ops-team"
    assert entry["detail"] == {"new_batch_id": "retry-1", "files": 1}
    assert TOKEN not in audit.text


async def test_dead_letters_are_listed_with_reasons_and_capped_jobs(
    settings: Settings, ports: Ports
) -> None:
    """GET /api/dead-letters pages entries oldest first; a huge job shows only its start."""
    queue = ports.queue
    huge = '{"batch_id":"b1","file_id":"f1","uri":"u","payload":"' + "x" * 100_000 + '"}'
    await queue._redis.xadd(queue.dead, {"job": huge, "reason": "malformed: too big"})
    await queue._redis.xadd(queue.dead, {"garbage": "yes", "reason": "malformed: no job"})
    async with serving(settings, ports, Role.API) as served:
        first = await served.http.get("/api/dead-letters", params={"limit": 1})
        cursor = first.json()["next"]
        second = await served.http.get("/api/dead-letters", params={"after": cursor})
        typo = await served.http.get("/api/dead-letters", params={"limt": 1})
    assert first.status_code == 200, first.text
    [entry] = first.json()["items"]
    assert entry["reason"] == "malformed: too big"
    assert (entry["batch_id"], entry["file_id"]) == ("b1", "f1")
    assert entry["job_chars"] == len(huge) and len(entry["job"]) < 400
    assert len(first.content) < 2000
    [other] = second.json()["items"]
    assert other["reason"] == "malformed: no job" and "garbage" in other["job"]
    assert second.json()["next"] is None
    assert_error(typo, 422)
