"""Cancel and retry-failed against a real `reconciler run`, over HTTP and with the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx

from reconciler import reasons
from reconciler.app import Ports
from tests.acceptance.processes import ServiceProcess, run_cli, service_process, with_env
from tests.helpers import files, sql, submit, wait_for

TOKEN = "acceptance-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, *args))
    return done.returncode, done.stdout, done.stderr


def _env(service_env: dict[str, str]) -> dict[str, str]:
    return with_env(
        service_env,
        RECONCILER_HANDLER="tests.acceptance.operator_handlers:held",
        RECONCILER_CONCURRENCY="1",
        RECONCILER_MAX_ATTEMPTS="1",
        RECONCILER_API_TOKEN=TOKEN,
        RECONCILER_API_TOKEN_NAME="ops-team",
    )


def _batch(batch_id: str, tmp_path: Path, count: int) -> dict[str, Any]:
    payload = {"journal": str(tmp_path / "journal"), "release": str(tmp_path / "release")}
    files = [{"file_id": f"f{i}", "uri": f"mem://{i}", "payload": payload} for i in range(count)]
    return {"batch_id": batch_id, "run_id": "run-ops", "files": files}


def _journal(tmp_path: Path, batch_id: str) -> list[str]:
    path = tmp_path / "journal"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.startswith(f"{batch_id}\t")]


async def _progress(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    return dict((await http.get(f"/api/batches/{batch_id}")).json())


async def _settled(ports: Ports) -> bool:
    """Every job acknowledged: each outcome was written (or found moot) before its ack."""
    return await ports.queue.length() == 0


async def _cancel_in_flight(
    proc: ServiceProcess, ports: Ports, tmp_path: Path, database_url: str
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.port}") as http:
        assert (
            await http.post("/api/batches", json=_batch("A", tmp_path, 3), headers=AUTH)
        ).status_code == 201
        await wait_for(lambda: _journal_async(tmp_path, "A"), what="a file of A in flight")
        refused = await http.post("/api/batches/A/cancel", json={"reason": "runaway"})
        assert refused.status_code == 401
        done = await http.post("/api/batches/A/cancel", json={"reason": "runaway"}, headers=AUTH)
        assert done.status_code == 200, done.text
        assert (done.json()["finalized_by"], done.json()["files_failed"]) == ("operator", 3)
        (tmp_path / "release").touch()
        await wait_for(lambda: _settled(ports), what="every job of A settled")
        after = await _progress(http, "A")
        assert (after["status"], after["files_failed"]) == ("completed_with_errors", 3)
        again = await http.post("/api/batches/A/cancel", json={"reason": "x"}, headers=AUTH)
        assert again.status_code == 409
    rows = await sql(database_url, "SELECT DISTINCT error FROM batch_files WHERE batch_id = 'A'")
    assert [r[0] for r in rows] == [reasons.CANCELLED]
    counts = await sql(
        database_url,
        "SELECT (SELECT count(*) FROM run_summaries WHERE batch_id = 'A'),"
        " (SELECT count(*) FROM events WHERE batch_id = 'A')",
    )
    assert tuple(counts[0]) == (1, 1)


async def _journal_async(tmp_path: Path, batch_id: str) -> list[str]:
    return _journal(tmp_path, batch_id)


async def test_cancel_in_flight_then_retry_failed_with_a_real_service(
    service_env: dict[str, str], ports: Ports, tmp_path: Path
) -> None:
    """A cancel wins over a late outcome; the retry runs exactly the failed files once."""
    env = _env(service_env)
    url = env["RECONCILER_DATABASE_URL"]
    with service_process(env, tmp_path / "service.log") as proc:
        # After the first sweep, so its check for lost Redis data enqueues nothing twice.
        proc.wait_for_event("sweep_finished")
        await _cancel_in_flight(proc, ports, tmp_path, url)
        base = f"http://127.0.0.1:{proc.port}"
        async with httpx.AsyncClient(base_url=base, headers=AUTH) as http:
            body = {"reason": "re-run after the fix", "batch_id": "A-retry"}
            created = await http.post("/api/batches/A/retry-failed", json=body)
            assert created.status_code == 201, created.text
            child = created.json()
            assert (child["parent_batch_id"], child["run_id"]) == ("A", "run-ops")
            summary = await wait_for(
                lambda: _summary(http, "A-retry"), what="the retry batch finalized"
            )
            assert (summary["status"], summary["files_succeeded"]) == ("completed", 3)
            repeated = await http.post("/api/batches/A/retry-failed", json=body)
            assert repeated.status_code == 200
            audit = (await http.get("/api/batches/A/audit")).json()["items"]
    assert [(a["action"], a["actor"]) for a in audit] == [
        ("cancel", "token:ops-team"),
        ("retry_failed", "token:ops-team"),
    ]
    assert sorted(_journal(tmp_path, "A-retry")) == [f"A-retry\tf{i}" for i in range(3)]


async def _summary(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any] | None:
    answer = await http.get(f"/api/batches/{batch_id}/summary")
    return dict(answer.json()) if answer.status_code == 200 else None


async def test_cli_cancel_retry_and_audit(
    service_env: dict[str, str], ports: Ports, tmp_path: Path
) -> None:
    """`reconciler cancel`, `retry-failed` and `audit` act as the API and name --actor."""
    env = _env(service_env)
    await submit(ports, files(2), batch_id="B")
    code, _, refused = await _cli(env, "cancel", "B")
    assert code == 2 and "--reason" in refused
    code, shown, _ = await _cli(
        env, "cancel", "B", "--reason", "stop", "--actor", "alice", "--json"
    )
    assert code == 0 and json.loads(shown)["finalized_by"] == "operator"
    code, _, again = await _cli(env, "cancel", "B", "--reason", "stop")
    assert code == 1 and "already finalized" in again
    code, shown, _ = await _cli(env, "retry-failed", "B", "--reason", "again", "--batch-id", "B2")
    assert code == 0 and "B2 created with 2 failed files" in shown
    code, shown, _ = await _cli(env, "retry-failed", "B", "--reason", "again", "--batch-id", "B2")
    assert code == 0 and "B2 already existed" in shown
    code, shown, _ = await _cli(env, "audit", "B", "--json")
    items = json.loads(shown)["items"]
    assert [i["action"] for i in items] == ["cancel", "retry_failed"]
    assert items[0]["actor"] == "alice" and items[1]["actor"].startswith("cli:")
    assert TOKEN not in shown
