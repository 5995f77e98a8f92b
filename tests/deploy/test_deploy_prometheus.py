"""Alerting rules: promtool checks and unit tests, CRD parity, annotations and runbooks."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
PROMETHEUSRULE = PROM_DIR / "prometheusrule.yaml"
RULES_TEST = PROM_DIR / "tests" / "rules_test.yml"
GENERATOR = PROM_DIR / "generate_prometheusrule.py"
RUNBOOK_DOCS = (REPO / "docs" / "operations.md",)
RUNBOOK_PREFIX = (
    "https://github.com/batch-reconciler/batch-reconciler/blob/main/docs/operations.md#"
)

REQUIRED_ALERTS = {
    "ReconcilerBatchesStuck": ("critical", "batches-stuck"),
    "ReconcilerOldestUnfinalizedBatchTooOld": ("warning", "oldest-unfinalized-batch"),
    "ReconcilerFinalizationLatencyHigh": ("warning", "finalization-latency"),
    "ReconcilerDeadLettersGrowing": ("warning", "dead-letters"),
    "ReconcilerConsumerLagGrowing": ("warning", "consumer-lag"),
    "ReconcilerActorRestartLoop": ("warning", "actor-restarts"),
    "ReconcilerAbsent": ("critical", "service-absent"),
    "ReconcilerDeliveriesDead": ("warning", "deliveries-dead"),
    "ReconcilerUndeliveredEventTooOld": ("warning", "undelivered-events"),
}
# absent() always evaluates to 1, so its value says nothing worth printing.
NO_VALUE_IN_DESCRIPTION = {"ReconcilerAbsent"}

# Metric names of the public contract, and the series names they expose.
CONTRACT_COUNTERS = {
    "reconciler_finalizations_total",
    "reconciler_files_processed_total",
    "reconciler_jobs_redelivered_total",
    "reconciler_jobs_dead_lettered_total",
    "reconciler_sweep_repairs_total",
    "reconciler_actor_restarts_total",
    "reconciler_deliveries_total",
}
CONTRACT_HISTOGRAMS = {
    "reconciler_finalization_latency_seconds",
    "reconciler_file_processing_seconds",
    "reconciler_sweep_duration_seconds",
    "reconciler_delivery_latency_seconds",
}
# Computed from Postgres or Redis: identical on every replica, so aggregate with max.
SHARED_GAUGES = {
    "reconciler_batches_stuck",
    "reconciler_batches_in_progress",
    "reconciler_oldest_unfinalized_batch_age_seconds",
    "reconciler_queue_pending_jobs",
    "reconciler_oldest_undelivered_event_age_seconds",
}
CONTRACT_SERIES = (
    SHARED_GAUGES
    | CONTRACT_COUNTERS
    | {f"{h}{suffix}" for h in CONTRACT_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![A-Za-z0-9_:$])reconciler_[A-Za-z0-9_:]*")

Rule = dict[str, Any]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (run scripts/ensure-tools)")
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=90, check=False
    )


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return groups


def alerts() -> dict[str, Rule]:
    return {
        rule["alert"]: rule
        for group in plain_groups()
        for rule in group["rules"]
        if "alert" in rule
    }


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(_STRING_LITERAL.sub('""', expr)))


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading's text."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    for doc in RUNBOOK_DOCS:
        if doc.exists():
            for line in doc.read_text(encoding="utf-8").splitlines():
                match = re.match(r"#{1,6}\s+(.*)", line)
                if match:
                    anchors.add(github_anchor(match.group(1)))
    return anchors


def test_promtool_accepts_the_plain_rules_file() -> None:
    """`promtool check rules` accepts deploy/prometheus/rules.yml."""
    result = _run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_accepts_the_prometheusrule_spec(tmp_path: Path) -> None:
    """`promtool check rules` accepts the spec of the PrometheusRule object."""
    document = yaml.safe_load(PROMETHEUSRULE.read_text(encoding="utf-8"))
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    spec_file = tmp_path / "prometheusrule-spec.yml"
    spec_file.write_text(yaml.safe_dump(document["spec"]), encoding="utf-8")
    result = _run_promtool("check", "rules", str(spec_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes: every alert fires when it should and not otherwise."""
    result = _run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    """rules_test.yml has, for every alert, a case where it fires and one where it does not."""
    cases = [
        case
        for test in yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for name in alerts():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name} never fires in a test"
        assert any(not c.get("exp_alerts") for c in mine), f"{name} is never checked silent"


def test_prometheusrule_has_the_same_groups_as_rules_file() -> None:
    """The PrometheusRule's spec.groups equal the plain rules file's groups."""
    document = yaml.safe_load(PROMETHEUSRULE.read_text(encoding="utf-8"))
    assert document["spec"]["groups"] == plain_groups()


def test_prometheusrule_is_the_generator_output() -> None:
    """prometheusrule.yaml is exactly what generate_prometheusrule.py renders from rules.yml."""
    generator = _load_generator()
    assert PROMETHEUSRULE.read_text(encoding="utf-8") == generator.render(RULES)


def test_required_alerts_exist_with_their_severity() -> None:
    """Every required alert exists with the agreed severity."""
    found = alerts()
    for name, (severity, _anchor) in REQUIRED_ALERTS.items():
        assert name in found, name
        assert found[name]["labels"]["severity"] == severity, name


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_has_summary_description_and_runbook(name: str) -> None:
    """Each alert has a summary, a description quoting its value, and a runbook_url."""
    annotations = alerts()[name]["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    if name not in NO_VALUE_IN_DESCRIPTION:
        assert "$value" in annotations["description"], name
    assert annotations["runbook_url"] == RUNBOOK_PREFIX + REQUIRED_ALERTS[name][1]


def test_every_runbook_anchor_is_a_docs_heading() -> None:
    """Every runbook_url anchor is a heading in docs/operations.md."""
    anchors = runbook_anchors()
    assert anchors, f"none of {[str(d) for d in RUNBOOK_DOCS]} has headings"
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_PREFIX), name
        assert url.removeprefix(RUNBOOK_PREFIX) in anchors, f"{name}: {url}"


def test_rules_use_only_contract_metrics() -> None:
    """Every reconciler_* series an alert reads is a metric of the public contract."""
    for name, rule in alerts().items():
        used = metric_names(rule["expr"])
        assert used <= CONTRACT_SERIES, f"{name}: {used - CONTRACT_SERIES}"


def test_shared_gauges_are_aggregated_with_max_never_sum() -> None:
    """Gauges identical on every replica are taken with max(), never summed."""
    for name, rule in alerts().items():
        expr = rule["expr"]
        for gauge in metric_names(expr) & SHARED_GAUGES:
            assert re.search(rf"\bmax\s*\(\s*{gauge}\b", expr), f"{name}: {expr}"
            assert not re.search(r"\bsum\b", expr), f"{name}: {expr}"
