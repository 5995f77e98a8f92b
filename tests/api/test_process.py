"""The HTTP face of a real `reconciler run` process: token, batch, summary, metrics."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.acceptance.processes import service_process, with_env
from tests.api.served import assert_error, body, scrape, value
from tests.helpers import files, wait_for

TOKEN = "process-token"


async def _summary(http: httpx.AsyncClient, batch_id: str) -> httpx.Response | None:
    response = await http.get(f"/api/batches/{batch_id}/summary")
    assert response.status_code in (200, 202), response.text
    return response if response.status_code == 200 else None


async def test_real_process_serves_the_contract_over_http(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """A real `reconciler run` guards POST, answers the summary and counts the batch."""
    env = with_env(service_env, RECONCILER_API_TOKEN=TOKEN)
    request = body(files(4, {"sleep_s": 0.01}), batch_id="proc-1")
    with service_process(env, tmp_path / "service.log") as process:
        base_url = f"http://127.0.0.1:{process.port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as http:
            refused = await http.post("/api/batches", json=request)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            created = await http.post("/api/batches", json=request, headers=auth)
            summary = await wait_for(lambda: _summary(http, "proc-1"), what="summary 200")
            scraped = await scrape(http)
            probes = [(await http.get(p)).status_code for p in ("/healthz", "/readyz")]
            spec = await http.get("/openapi.json")
        process.signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert_error(refused, 401)
    assert created.status_code == 201, created.text
    assert summary.json()["files_succeeded"] == 4
    assert value(scraped, "reconciler_files_processed_total", outcome="succeeded") == 4
    finalized = value(
        scraped, "reconciler_finalizations_total", trigger=summary.json()["finalized_by"],
        outcome="finalized",
    )  # fmt: skip
    assert finalized == 1
    assert value(scraped, "process_resident_memory_bytes") > 0
    assert probes == [200, 200]
    assert spec.status_code == 200 and "/api/batches" in spec.json()["paths"]
