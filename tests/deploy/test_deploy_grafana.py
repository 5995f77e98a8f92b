"""Grafana dashboard: generated from deploy/grafana/dashboard.py, with the required panels."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "grafana" / "dashboard.py"
COMMITTED = REPO / "deploy" / "grafana" / "batch-reconciler.json"

# Panel title -> a metric its queries must read.
REQUIRED_PANELS = {
    "Stuck batches": "reconciler_batches_stuck",
    "Batches in progress": "reconciler_batches_in_progress",
    "Oldest unfinalized batch": "reconciler_oldest_unfinalized_batch_age_seconds",
    "Finalization latency by trigger (p50 / p99)": (
        "reconciler_finalization_latency_seconds_bucket"
    ),
    "Files processed per second by outcome": "reconciler_files_processed_total",
    "Dead-lettered jobs by reason": "reconciler_jobs_dead_lettered_total",
    "Queue pending jobs": "reconciler_queue_pending_jobs",
    "Sweep duration (p50 / p99)": "reconciler_sweep_duration_seconds_bucket",
    "Actor restarts": "reconciler_actor_restarts_total",
    "Oldest undelivered event": "reconciler_oldest_undelivered_event_age_seconds",
    "Deliveries per second by sink and outcome": "reconciler_deliveries_total",
    "Delivery latency by sink (p50 / p99)": "reconciler_delivery_latency_seconds_bucket",
    "Batches deleted by retention": "reconciler_retention_deleted_total",
}
SHARED_GAUGES = {
    "reconciler_batches_stuck",
    "reconciler_batches_in_progress",
    "reconciler_oldest_unfinalized_batch_age_seconds",
    "reconciler_queue_pending_jobs",
    "reconciler_oldest_undelivered_event_age_seconds",
}
CONTRACT_COUNTERS = {
    "reconciler_finalizations_total",
    "reconciler_files_processed_total",
    "reconciler_jobs_redelivered_total",
    "reconciler_jobs_dead_lettered_total",
    "reconciler_sweep_repairs_total",
    "reconciler_actor_restarts_total",
    "reconciler_deliveries_total",
    "reconciler_retention_deleted_total",
}
CONTRACT_HISTOGRAMS = {
    "reconciler_finalization_latency_seconds",
    "reconciler_file_processing_seconds",
    "reconciler_sweep_duration_seconds",
    "reconciler_delivery_latency_seconds",
}
CONTRACT_SERIES = (
    SHARED_GAUGES
    | CONTRACT_COUNTERS
    | {f"{h}{suffix}" for h in CONTRACT_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

Panel = dict[str, Any]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is not installed")
    spec = importlib.util.spec_from_file_location("reconciler_dashboard", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(COMMITTED.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[Panel]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def by_title(dashboard: dict[str, Any]) -> dict[str, list[Panel]]:
    result: dict[str, list[Panel]] = {}
    for panel in panels(dashboard):
        result.setdefault(panel["title"], []).append(panel)
    return result


def exprs(panel: Panel) -> list[str]:
    return [str(t["expr"]) for t in panel.get("targets", [])]


def test_committed_json_is_the_script_output(script: ModuleType) -> None:
    """Regenerating the dashboard from dashboard.py gives the committed JSON byte for byte."""
    assert script.render() == COMMITTED.read_text(encoding="utf-8")


def test_dashboard_round_trips_through_the_sdk_model(
    script: ModuleType, dashboard: dict[str, Any]
) -> None:
    """The committed JSON parses back into the SDK's Dashboard model unchanged."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    model = Dashboard.from_json(dashboard)
    assert json.loads(json.dumps(model.to_json(), default=_to_json)) == dashboard


def _to_json(obj: Any) -> Any:
    return obj.to_json()


def test_dashboard_has_every_required_panel(dashboard: dict[str, Any]) -> None:
    """Each required panel exists and queries its metric."""
    titles = by_title(dashboard)
    for title, metric in REQUIRED_PANELS.items():
        assert title in titles, title
        assert any(metric in expr for p in titles[title] for expr in exprs(p)), title


def test_every_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """A `datasource` variable of type prometheus exists and every panel and query uses it."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref, panel["title"]


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique and every panel lies inside the 24-column grid."""
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0
    assert dashboard["uid"] == "batch-reconciler"


def test_latency_panel_shows_p50_and_p99_by_trigger(dashboard: dict[str, Any]) -> None:
    """Finalization latency uses histogram_quantile 0.5 and 0.99 grouped by trigger."""
    [panel] = by_title(dashboard)["Finalization latency by trigger (p50 / p99)"]
    queries = exprs(panel)
    for quantile in ("0.5", "0.99"):
        assert any(
            q.startswith(f"histogram_quantile({quantile},")
            and "by (trigger, le)" in q
            and "reconciler_finalization_latency_seconds_bucket" in q
            for q in queries
        ), quantile
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_files_panel_is_the_rate_by_outcome(dashboard: dict[str, Any]) -> None:
    """Files per second is the rate of reconciler_files_processed_total by outcome."""
    [panel] = by_title(dashboard)["Files processed per second by outcome"]
    [query] = exprs(panel)
    assert re.fullmatch(
        r"sum by \(outcome\) \(rate\(reconciler_files_processed_total\{[^}]*\}"
        r"\[\$__rate_interval\]\)\)",
        query,
    ), query


def test_metric_names_helper_lists_every_queried_metric(
    script: ModuleType, dashboard: dict[str, Any]
) -> None:
    """metric_names() returns exactly the reconciler_* names found in the dashboard's queries."""
    found: set[str] = set()
    for panel in panels(dashboard):
        for expr in exprs(panel):
            found |= set(re.findall(r"reconciler_[a-z_]+(?=[{\[)\s,])", expr))
    names = script.metric_names()
    assert isinstance(names, set)
    assert names == found | {"reconciler_batches_in_progress"}
    assert set(REQUIRED_PANELS.values()) <= names
    assert script.metric_names(dashboard) == names


def test_metric_name_extraction_ignores_label_values(script: ModuleType) -> None:
    """metric_names_in() skips names inside quoted label values and variables."""
    expr = 'sum(rate(reconciler_a_total{job="reconciler_fake", x=~"$reconciler_v"}[5m]))'
    assert script.metric_names_in(expr) == {"reconciler_a_total"}


def test_dashboard_queries_only_contract_metrics(script: ModuleType) -> None:
    """Every metric the dashboard queries is a series of the public contract."""
    names: set[str] = script.metric_names()
    assert names <= CONTRACT_SERIES, names - CONTRACT_SERIES


def test_shared_gauges_are_aggregated_with_max_never_sum(dashboard: dict[str, Any]) -> None:
    """Gauges identical on every replica are shown with max(), never summed."""
    for panel in panels(dashboard):
        for expr in exprs(panel):
            for gauge in SHARED_GAUGES:
                if gauge in expr:
                    assert re.search(rf"\bmax\s*\(\s*{gauge}\b", expr), expr
                    assert not re.search(r"\bsum\b", expr), expr
