"""/metrics read with prometheus-client's parser: contract names, labels and real values."""

from __future__ import annotations

from dataclasses import replace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from reconciler.actors.sweeper import Sweeper
from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.api.served import Scraped, body, scrape, serving, value
from tests.helpers import files, record, sql, wait_for

# The contract's metrics: family name as the parser reports it, type, label names.
CONTRACT_METRICS = {
    "reconciler_batches_stuck": ("gauge", set()),
    "reconciler_batches_in_progress": ("gauge", set()),
    "reconciler_oldest_unfinalized_batch_age_seconds": ("gauge", set()),
    "reconciler_finalizations": ("counter", {"trigger", "outcome"}),
    "reconciler_finalization_latency_seconds": ("histogram", {"trigger"}),
    "reconciler_files_processed": ("counter", {"outcome"}),
    "reconciler_file_processing_seconds": ("histogram", set()),
    "reconciler_jobs_redelivered": ("counter", set()),
    "reconciler_jobs_dead_lettered": ("counter", {"reason"}),
    "reconciler_queue_pending_jobs": ("gauge", set()),
    "reconciler_sweep_duration_seconds": ("histogram", set()),
    "reconciler_sweep_repairs": ("counter", {"kind"}),
    "reconciler_actor_restarts": ("counter", {"actor"}),
    "reconciler_deliveries": ("counter", {"sink", "outcome"}),
    "reconciler_delivery_latency_seconds": ("histogram", {"sink"}),
    "reconciler_oldest_undelivered_event_age_seconds": ("gauge", set()),
    "reconciler_operator_actions": ("counter", {"action"}),
}
PROCESS_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes"}


def _moved(before: Scraped, after: Scraped, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def _finalized(http: httpx.AsyncClient, batch_id: str) -> bool:
    # Progress, not the summary: asking for the summary could finalize on demand.
    return bool((await http.get(f"/api/batches/{batch_id}")).json()["status"] != "processing")


async def test_every_contract_metric_is_exported_with_its_labels(
    settings: Settings, ports: Ports
) -> None:
    """Each contract metric parses with its type and documented labels; process metrics too."""
    async with serving(settings, ports, Role.ALL) as api:
        text = (await api.http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    outcomes = {s.labels["outcome"] for s in families["reconciler_files_processed"].samples}
    assert outcomes == {"succeeded", "failed", "retried"}
    triggers = {s.labels["trigger"] for s in families["reconciler_finalizations"].samples}
    assert triggers == {"event", "sweep", "demand", "deadline", "operator"}
    actions = {s.labels["action"] for s in families["reconciler_operator_actions"].samples}
    assert actions >= {"cancel", "retry_failed"}
    exported = {s.name for family in families.values() for s in family.samples}
    assert PROCESS_METRICS <= exported


async def test_counters_move_by_the_right_amounts_after_a_real_batch(
    settings: Settings, ports: Ports
) -> None:
    """One batch (ok, retried once, failed after 3 attempts) moves each counter exactly."""
    specs = files(3)
    request = body(specs, batch_id="m1")
    request["files"][1]["payload"] = {"fail_attempts": 1}
    request["files"][2]["payload"] = {"fail_attempts": 9}
    async with serving(settings, ports, Role.ALL) as api:
        before = await scrape(api.http)
        await api.http.post("/api/batches", json=request)
        await wait_for(lambda: _finalized(api.http, "m1"), what="batch finalized")
        after = await scrape(api.http)
    files_total = "reconciler_files_processed_total"
    assert _moved(before, after, files_total, outcome="succeeded") == 2
    assert _moved(before, after, files_total, outcome="failed") == 1
    assert _moved(before, after, files_total, outcome="retried") == 3
    # one observation per attempt: 1 + 2 + 3
    assert _moved(before, after, "reconciler_file_processing_seconds_count") == 6
    finalizations = "reconciler_finalizations_total"
    assert _moved(before, after, finalizations, trigger="event", outcome="finalized") == 1
    latency = "reconciler_finalization_latency_seconds_count"
    assert _moved(before, after, latency, trigger="event") == 1
    assert _moved(before, after, "reconciler_jobs_dead_lettered_total", reason="malformed") == 0


async def test_batches_stuck_reads_1_for_a_stuck_batch_and_0_after_the_sweep(
    settings: Settings, ports: Ports
) -> None:
    """A complete batch left unfinalized past the grace reads 1 stuck; the sweep makes it 0."""
    graceful = replace(settings, stuck_grace_s=10.0)
    async with serving(graceful, ports, Role.API) as api:  # the monitor runs, nothing finalizes
        await api.http.post("/api/batches", json=body(files(2), batch_id="stuck"))
        await record(ports, "stuck", ["f00000", "f00001"])
        fresh = await wait_for(lambda: _gauges(api.http, in_progress=1, stuck=0), what="fresh")
        await sql(
            graceful.database_url or "",
            "UPDATE batches SET last_file_completed_at = now() - interval '1 hour',"
            " created_at = now() - interval '2 hours' WHERE batch_id = 'stuck'",
        )
        stuck = await wait_for(lambda: _gauges(api.http, in_progress=1, stuck=1), what="stuck")
        report = await Sweeper(graceful, ports.db, ports.queue).sweep_once()
        repaired = await wait_for(lambda: _gauges(api.http, in_progress=0, stuck=0), what="0")
        summary = (await api.http.get("/api/batches/stuck/summary")).json()
    assert report.repairs == {"finalized": 1}
    assert value(stuck, "reconciler_oldest_unfinalized_batch_age_seconds") >= 7200
    assert value(repaired, "reconciler_oldest_unfinalized_batch_age_seconds") == 0
    assert _moved(fresh, repaired, "reconciler_sweep_repairs_total", kind="finalized") == 1
    swept = _moved(
        fresh, repaired, "reconciler_finalizations_total", trigger="sweep", outcome="finalized"
    )
    assert swept == 1
    assert summary["finalized_by"] == "sweep"


async def _gauges(http: httpx.AsyncClient, *, in_progress: int, stuck: int) -> Scraped | None:
    scraped = await scrape(http)
    seen = (
        value(scraped, "reconciler_batches_in_progress"),
        value(scraped, "reconciler_batches_stuck"),
    )
    return scraped if seen == (in_progress, stuck) else None
