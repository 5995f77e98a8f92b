"""Grafana dashboard for batch-reconciler, built with grafana-foundation-sdk.

The committed batch-reconciler.json is this script's output; regenerate it after a change:

    python deploy/grafana/dashboard.py          # rewrite batch-reconciler.json
    python deploy/grafana/dashboard.py --check  # exit 1 if the JSON is stale
    python deploy/grafana/dashboard.py --stdout # print instead of writing

`metric_names()` returns every metric name the dashboard queries, so a test can check
them against a live `/metrics` page.

Gauges computed from the database or Redis (stuck batches, batches in progress, oldest
unfinalized age, oldest undelivered event, queue length) report the same value on every
replica: they are aggregated with `max`, never `sum`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus as prometheus_builders
from grafana_foundation_sdk.builders import stat as stat_builders
from grafana_foundation_sdk.builders import timeseries as timeseries_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

HERE = Path(__file__).resolve().parent
OUTPUT_PATH = HERE / "batch-reconciler.json"

DASHBOARD_UID = "batch-reconciler"
DASHBOARD_TITLE = "batch-reconciler"

# Every query goes to the data source picked in the `datasource` variable and is
# filtered by the `job` variable.
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'

Query = tuple[str, str]  # (PromQL expression, legend format)


def _target(expr: str, legend: str, ref_id: str) -> prometheus_builders.Dataquery:
    return (
        prometheus_builders.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .range()
    )


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_models.Threshold(value=value, color=color) for value, color in steps])
    )


def _stat(
    title: str,
    description: str,
    query: Query,
    *,
    unit: str,
    thresholds: Sequence[tuple[float | None, str]],
) -> stat_builders.Panel:
    expr, legend = query
    return (
        stat_builders.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target(expr, legend, "A"))
        .unit(unit)
        .min(0)
        .thresholds(_thresholds(thresholds))
        .color_mode(common_models.BigValueColorMode.BACKGROUND)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(6)
    )


def _timeseries(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    axis_label: str = "",
    span: int = 12,
) -> timeseries_builders.Panel:
    panel = (
        timeseries_builders.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .line_width(1)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common_models.TooltipDisplayMode.MULTI)
            .sort(common_models.SortOrder.DESCENDING)
        )
        .height(8)
        .span(span)
    )
    if axis_label:
        panel = panel.axis_label(axis_label)
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + index)))
    return panel


def _quantiles(metric: str, by: str = "") -> list[Query]:
    """p50 and p99 of a histogram, optionally split by a label."""
    group = f"{by}, le" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{JOB}}}[$__rate_interval])))",
            f"p{round(q * 100)}{suffix}",
        )
        for q in (0.5, 0.99)
    ]


def _variables() -> list[dashboard_builders.DatasourceVariable | dashboard_builders.QueryVariable]:
    datasource = (
        dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    job = (
        dashboard_builders.QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(reconciler_batches_in_progress, job)")
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
    )
    return [datasource, job]


def _batches_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    ok_red = [(None, "green"), (1, "red")]
    return (
        builder.with_row(dashboard_builders.Row("Batches"))
        .with_panel(
            _stat(
                "Stuck batches",
                "Batches whose files are all terminal but that are still not finalized after "
                "RECONCILER_STUCK_GRACE_S. Should be 0. Same value on every replica (max).",
                (f"max(reconciler_batches_stuck{{{JOB}}})", "stuck"),
                unit="short",
                thresholds=ok_red,
            )
        )
        .with_panel(
            _stat(
                "Batches in progress",
                "Batches not yet finalized. Same value on every replica (max).",
                (f"max(reconciler_batches_in_progress{{{JOB}}})", "in progress"),
                unit="short",
                thresholds=[(None, "blue")],
            )
        )
        .with_panel(
            _stat(
                "Oldest unfinalized batch",
                "Age of the oldest batch that is not finalized. Alerts above 1 h.",
                (f"max(reconciler_oldest_unfinalized_batch_age_seconds{{{JOB}}})", "age"),
                unit="s",
                thresholds=[(None, "green"), (1800, "orange"), (3600, "red")],
            )
        )
        .with_panel(
            _stat(
                "Queue pending jobs",
                "Jobs in the Redis stream not yet delivered or acknowledged.",
                (f"max(reconciler_queue_pending_jobs{{{JOB}}})", "pending"),
                unit="short",
                thresholds=[(None, "green"), (1000, "orange")],
            )
        )
        .with_panel(
            _timeseries(
                "Stuck and in-progress batches",
                "Stuck batches should stay at 0; in-progress batches rise and fall with load.",
                [
                    (f"max(reconciler_batches_stuck{{{JOB}}})", "stuck"),
                    (f"max(reconciler_batches_in_progress{{{JOB}}})", "in progress"),
                ],
                unit="short",
                axis_label="batches",
            )
        )
        .with_panel(
            _timeseries(
                "Oldest unfinalized batch age",
                "Age of the oldest unfinalized batch.",
                [(f"max(reconciler_oldest_unfinalized_batch_age_seconds{{{JOB}}})", "age")],
                unit="s",
            )
        )
    )


def _finalization_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    return (
        builder.with_row(dashboard_builders.Row("Finalization"))
        .with_panel(
            _timeseries(
                "Finalization latency by trigger (p50 / p99)",
                "Time from the last file of a batch done to the batch finalized, by trigger "
                "(event, sweep, demand, deadline). Alerts when p99 > 60 s.",
                _quantiles("reconciler_finalization_latency_seconds", by="trigger"),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "Finalizations by trigger and outcome",
                "Batches finalized per second. A rising share of `sweep` means events are lost.",
                [
                    (
                        "sum by (trigger, outcome) "
                        f"(rate(reconciler_finalizations_total{{{JOB}}}[$__rate_interval]))",
                        "{{trigger}} / {{outcome}}",
                    )
                ],
                unit="short",
                axis_label="batches/s",
            )
        )
    )


def _files_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    return (
        builder.with_row(dashboard_builders.Row("Files and queue"))
        .with_panel(
            _timeseries(
                "Files processed per second by outcome",
                "Rate of files processed, by outcome (succeeded, failed, retried).",
                [
                    (
                        "sum by (outcome) "
                        f"(rate(reconciler_files_processed_total{{{JOB}}}[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                unit="short",
                axis_label="files/s",
            )
        )
        .with_panel(
            _timeseries(
                "File processing time (p50 / p99)",
                "Time the handler takes for one file.",
                _quantiles("reconciler_file_processing_seconds"),
                unit="s",
            )
        )
        .with_panel(
            _timeseries(
                "Queue pending jobs",
                "Backlog of the job stream. Alerts when above 1000 and growing for 15 min.",
                [(f"max(reconciler_queue_pending_jobs{{{JOB}}})", "pending")],
                unit="short",
                axis_label="jobs",
                span=8,
            )
        )
        .with_panel(
            _timeseries(
                "Dead-lettered jobs by reason",
                "Jobs moved to the dead-letter stream. Any increase alerts.",
                [
                    (
                        "sum by (reason) "
                        f"(increase(reconciler_jobs_dead_lettered_total{{{JOB}}}[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
                unit="short",
                axis_label="jobs",
                span=8,
            )
        )
        .with_panel(
            _timeseries(
                "Redelivered jobs",
                "Jobs reclaimed from a consumer that stopped renewing its lease.",
                [
                    (
                        f"sum(increase(reconciler_jobs_redelivered_total{{{JOB}}}"
                        "[$__rate_interval]))",
                        "redelivered",
                    )
                ],
                unit="short",
                axis_label="jobs",
                span=8,
            )
        )
    )


def _sweeper_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    return (
        builder.with_row(dashboard_builders.Row("Sweeper and actors"))
        .with_panel(
            _timeseries(
                "Sweep duration (p50 / p99)",
                "Duration of one periodic reconciliation pass.",
                _quantiles("reconciler_sweep_duration_seconds"),
                unit="s",
                span=6,
            )
        )
        .with_panel(
            _timeseries(
                "Sweep repairs by kind",
                "What the sweeper had to repair. Steady repairs point at a bug or lost events.",
                [
                    (
                        "sum by (kind) "
                        f"(increase(reconciler_sweep_repairs_total{{{JOB}}}[$__rate_interval]))",
                        "{{kind}}",
                    )
                ],
                unit="short",
                span=6,
            )
        )
        .with_panel(
            _timeseries(
                "Batches deleted by retention",
                "Finalized batches older than RECONCILER_RETENTION_DAYS deleted with all "
                "their rows, at most 5,000 per pass and replica. Flat at 0 with "
                "retention 0 or no history that old.",
                [
                    (
                        f"sum(increase(reconciler_retention_deleted_total{{{JOB}}}"
                        "[$__rate_interval]))",
                        "deleted",
                    )
                ],
                unit="short",
                span=6,
            )
        )
        .with_panel(
            _timeseries(
                "Actor restarts",
                "Restarts of supervised actors, per actor and instance. "
                "More than 3 in 10 min alerts.",
                [
                    (
                        "sum by (actor, instance) "
                        f"(increase(reconciler_actor_restarts_total{{{JOB}}}[$__rate_interval]))",
                        "{{actor}} ({{instance}})",
                    )
                ],
                unit="short",
                span=6,
            )
        )
    )


def _deliveries_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    by_outcome = "sum by (sink, outcome) (rate(reconciler_deliveries_total{%s}[$__rate_interval]))"
    return (
        builder.with_row(dashboard_builders.Row("Completion callbacks"))
        .with_panel(
            _stat(
                "Oldest undelivered event",
                "Age of the oldest finalized-batch event a sink has not acknowledged. "
                "Alerts above 15 min. Same value on every replica (max).",
                (f"max(reconciler_oldest_undelivered_event_age_seconds{{{JOB}}})", "age"),
                unit="s",
                thresholds=[(None, "green"), (600, "orange"), (900, "red")],
            )
        )
        .with_panel(
            _timeseries(
                "Deliveries per second by sink and outcome",
                "Webhook and hook attempts: delivered, failed (retried) or dead (given up).",
                [(by_outcome % JOB, "{{sink}} {{outcome}}")],
                unit="ops",
                span=9,
            )
        )
        .with_panel(
            _timeseries(
                "Delivery latency by sink (p50 / p99)",
                "From a batch's finalization to its event acknowledged.",
                _quantiles("reconciler_delivery_latency_seconds", by="sink"),
                unit="s",
                span=9,
            )
        )
    )


def build_dashboard() -> dashboard_builders.Dashboard:
    """Return the dashboard builder (call `.build()` for the model)."""
    builder = (
        dashboard_builders.Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .description("Batch finalization, file processing, queue and sweeper health.")
        .tags(["batch-reconciler", "generated"])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .variables(list(_variables()))
    )
    rows = (_batches_row, _finalization_row, _files_row, _sweeper_row, _deliveries_row)
    for add_row in rows:
        builder = add_row(builder)
    return builder


def build_model() -> dashboard_models.Dashboard:
    """Return the dashboard model with unique, stable panel ids (1, 2, ...)."""
    model = build_dashboard().build()
    for panel_id, panel in enumerate(model.panels or [], start=1):
        panel.id_val = panel_id
    return model


def render() -> str:
    """Return the dashboard JSON text exactly as committed."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build_model()) + "\n"


def dashboard_json() -> dict[str, Any]:
    """Return the dashboard as plain JSON data."""
    data: dict[str, Any] = json.loads(render())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def iter_queries(dashboard: Mapping[str, Any]) -> Iterator[str]:
    """Yield every PromQL expression: panel targets and query variables."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(target["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            yield str(query.get("query", "")) if isinstance(query, Mapping) else str(query)


_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:$])reconciler_[A-Za-z0-9_:]*")


def metric_names_in(expr: str) -> set[str]:
    """Return the reconciler_* metric names that a PromQL expression reads.

    String literals (label values) are ignored. Histogram series are returned as
    queried, e.g. `reconciler_sweep_duration_seconds_bucket`, which is also how they
    appear in the text exposition format.
    """
    return set(_METRIC_NAME.findall(_STRING_LITERAL.sub('""', expr)))


def metric_names(dashboard: Mapping[str, Any] | None = None) -> set[str]:
    """Return every metric name used in the dashboard's queries."""
    data = dashboard_json() if dashboard is None else dashboard
    names: set[str] = set()
    for expr in iter_queries(data):
        names |= metric_names_in(expr)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the batch-reconciler dashboard.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the JSON is out of date")
    mode.add_argument("--stdout", action="store_true", help="print the JSON instead of writing")
    mode.add_argument("--metrics", action="store_true", help="print the metric names queried")
    args = parser.parse_args(argv)
    if args.metrics:
        print("\n".join(sorted(metric_names())))
        return 0
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = OUTPUT_PATH.read_text(encoding="utf-8") if OUTPUT_PATH.exists() else ""
        if current != text:
            print(f"{OUTPUT_PATH} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
