"""The shipped alerts and dashboard against a live service and Debian's Prometheus server.

A real `reconciler run` is scraped by a real Prometheus that evaluates
deploy/prometheus/rules.yml unchanged, every second. The stuck-batch alert keeps its
shipped `for: 5m`, so within test time it reaches `pending`, which proves its
expression holds on live data; `promtool test rules` pins the step to `firing`.
Nothing in Prometheus shortens a `for:` hold: it is measured in wall-clock time
from the first evaluation that matched, `--rules.alert.for-grace-period` only ever
lengthens it after a restart, and the restored "for" state would have to be forged.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler import batches
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.queue import JobQueue
from tests.acceptance.processes import ServiceProcess, service_process, with_env
from tests.deploy.prometheus_server import Prometheus, is_running, prometheus_binary
from tests.deploy.prometheus_server import prometheus_server as start_prometheus
from tests.helpers import files, record, sql, submit, summary_of, wait_for

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")

REPO: Final = Path(__file__).resolve().parents[2]
RULES: Final = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD: Final = REPO / "deploy" / "grafana" / "dashboard.py"
JOB: Final = "batch-reconciler"  # matches ReconcilerAbsent's up{job=~".*batch-reconciler.*"}
STUCK_ALERT: Final = "ReconcilerBatchesStuck"
RATE_WINDOW: Final = "1m"  # stands in for Grafana's $__rate_interval
LIVE_TIMEOUT_S: Final = 20.0
EVALUATION_MARGIN_S: Final = 0.5
TEST_TIMEOUT_S: Final = 60
# With RECONCILER_LONG_TESTS=1 the stuck-batch test also waits out the shipped `for:`
# and sees the alert fire before the repair (about six minutes).
WAIT_FOR_FIRING: Final = os.environ.get("RECONCILER_LONG_TESTS") == "1"
FIRING_EXTRA_S: Final = 420 if WAIT_FOR_FIRING else 0
ROLES: Final = ("all", "worker", "sweeper", "api")
BATCH_API_ROLES: Final = {"all", "api"}
_DURATION_UNITS_S: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_LABEL_VALUES: Final = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)")


# -- the shipped files ----------------------------------------------------------------


def dashboard() -> ModuleType:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is not installed")
    spec = importlib.util.spec_from_file_location("reconciler_dashboard_live", DASHBOARD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def seconds(duration: str) -> float:
    """A Prometheus duration such as `5m` or `1h30m` in seconds."""
    parts = re.findall(r"(\d+)(ms|[smhd])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * _DURATION_UNITS_S[u] for n, u in parts)


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in for the test's job."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$job", JOB)


# -- the live service -------------------------------------------------------------------


def prometheus_or_skip() -> Path:
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(
            "Prometheus server not installed (/usr/bin/prometheus from Debian's `prometheus`"
            " package; scripts/ensure-tools installs it)"
        )
    return binary


@contextmanager
def scraped_service(env: dict[str, str], log_path: Path) -> Iterator[ServiceProcess]:
    """`reconciler run` whose sweeper has finished its start-up pass and then idles."""
    quiet = with_env(
        env,
        RECONCILER_SWEEP_INTERVAL_S="86400",
        RECONCILER_STUCK_GRACE_S="0",
        RECONCILER_STATS_INTERVAL_S="0.2",
    )
    with service_process(quiet, log_path) as process:
        process.wait_for_event("sweep_finished")
        yield process


@contextmanager
def prometheus_for(binary: Path, service: ServiceProcess, workdir: Path) -> Iterator[Prometheus]:
    target = f"127.0.0.1:{service.port}"
    with start_prometheus(binary, workdir, JOB, [target], [RULES]) as prometheus:
        yield prometheus


async def exported_series(port: int) -> set[str]:
    """Every sample name on the service's /metrics page (`_total`, `_bucket`, ...)."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200, answer.text
    return {
        sample.name
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


async def complete_but_unfinalized(settings: Settings, ports: Ports) -> str:
    """A batch whose files all succeeded but that no completion event will finalize.

    Its jobs go to a stream no worker reads and its outcomes are recorded the way a
    worker records them, as if that worker died before finalizing the batch.
    """
    specs = files(3)
    lost = JobQueue.connect(settings.redis_url or "", f"{settings.namespace}:lost")
    try:
        submitted = await batches.submit(ports.db, lost, specs)
    finally:
        await lost.close()
    await record(ports, submitted.batch_id, [spec.file_id for spec in specs])
    return submitted.batch_id


# -- Prometheus probes ------------------------------------------------------------------


async def scraped_at(prometheus: Prometheus) -> float | None:
    """When Prometheus last scraped the service, or None before the first scrape."""
    answer = await prometheus.query(f'timestamp(up{{job="{JOB}"}})')
    result = answer["data"]["result"] if answer["status"] == "success" else []
    return float(result[0]["value"][1]) if result else None


async def evaluated_since(prometheus: Prometheus, moment: float) -> dict[str, dict[str, Any]]:
    """Every rule, once each has been evaluated at or after `moment`; else empty."""
    rules = await prometheus.rules()
    for rule in rules.values():
        if dt.datetime.fromisoformat(rule["lastEvaluation"]).timestamp() < moment:
            return {}
    return rules


async def active(prometheus: Prometheus, name: str) -> dict[str, Any] | None:
    for alert in await prometheus.alerts():
        if alert["labels"]["alertname"] == name:
            return alert
    return None


async def firing(prometheus: Prometheus, name: str) -> bool:
    alert = await active(prometheus, name)
    return alert is not None and alert["state"] == "firing"


async def cleared(prometheus: Prometheus, name: str) -> bool:
    rule = (await prometheus.rules())[name]
    return rule["state"] == "inactive" and await active(prometheus, name) is None


async def settled(prometheus: Prometheus) -> dict[str, dict[str, Any]]:
    """The rules once all were evaluated on data from at least one scrape."""
    scraped = await wait_for(
        lambda: scraped_at(prometheus), timeout_s=LIVE_TIMEOUT_S, what="a scrape"
    )
    # Half an interval of margin: a rule's lastEvaluation is taken just after its
    # evaluation timestamp, which must not precede the sample.
    return await wait_for(
        lambda: evaluated_since(prometheus, scraped + EVALUATION_MARGIN_S),
        timeout_s=LIVE_TIMEOUT_S,
        what="rules evaluated after a scrape",
    )


async def rates_by_outcome(prometheus: Prometheus, query: str) -> dict[str, float] | None:
    """The files panel's rates once it shows files succeeding, else None."""
    answer = await prometheus.query(grafana_to_promql(query))
    result = answer["data"]["result"] if answer["status"] == "success" else []
    rates = {row["metric"]["outcome"]: float(row["value"][1]) for row in result}
    return rates if rates.get("succeeded", 0.0) > 0 else None


# -- tests ----------------------------------------------------------------------------


@pytest.mark.anyio  # conftest marks coroutines after parametrization, too late for this one
@pytest.mark.parametrize("role", ROLES)
async def test_every_role_serves_probes_and_every_dashboard_metric(
    role: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Every role answers the probes and exports each dashboard metric; all and api serve /api."""
    wanted: set[str] = dashboard().metric_names()
    with service_process(with_env(service_env), tmp_path / f"{role}.log", "--role", role) as proc:
        base = f"http://127.0.0.1:{proc.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
            assert (await client.get("/healthz")).status_code == 200
            await wait_for(
                lambda: _answers(client, "/readyz", 200), timeout_s=LIVE_TIMEOUT_S, what="ready"
            )
            batches_status = (await client.get("/api/batches")).status_code
        exported = await exported_series(proc.port)
    assert wanted, "the dashboard queries no metric"
    assert wanted <= exported, f"role {role} does not export {sorted(wanted - exported)}"
    assert batches_status == (200 if role in BATCH_API_ROLES else 404), batches_status


async def _answers(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


@pytest.mark.timeout(TEST_TIMEOUT_S + FIRING_EXTRA_S)
async def test_stuck_batch_alert_goes_pending_in_prometheus_and_clears_after_a_sweep(
    settings: Settings, ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """A stuck batch makes the shipped stuck-batch alert active; the sweeper's repair clears it."""
    binary = prometheus_or_skip()
    shipped = shipped_alerts()[STUCK_ALERT]
    with (
        scraped_service(service_env, tmp_path / "service.log") as service,
        prometheus_for(binary, service, tmp_path / "prometheus") as prometheus,
    ):
        rules = await settled(prometheus)
        assert await prometheus.alerts() == [], "a healthy service raised alerts"
        assert rules[STUCK_ALERT]["duration"] == seconds(shipped["for"])

        batch_id = await complete_but_unfinalized(settings, ports)
        alert = await wait_for(
            lambda: active(prometheus, STUCK_ALERT), timeout_s=LIVE_TIMEOUT_S, what="stuck alert"
        )
        assert alert["state"] in {"pending", "firing"}, alert
        assert alert["labels"] == {"alertname": STUCK_ALERT, "severity": "critical"}
        assert float(alert["value"]) == 1.0
        assert alert["annotations"]["description"].startswith("1 batches have every file")
        assert alert["annotations"]["runbook_url"] == shipped["annotations"]["runbook_url"]
        assert [a["labels"]["alertname"] for a in await prometheus.alerts()] == [STUCK_ALERT]
        if WAIT_FOR_FIRING:
            hold_s = seconds(shipped["for"]) + LIVE_TIMEOUT_S
            await wait_for(lambda: firing(prometheus, STUCK_ALERT), timeout_s=hold_s, what="firing")

        await _sweep_once(service_env, tmp_path / "sweeper.log")
        rows = await sql(
            settings.database_url or "",
            "SELECT status, finalized_by FROM batches WHERE batch_id = $1",
            batch_id,
        )
        assert tuple(rows[0]) == ("completed", "sweep")
        await wait_for(
            lambda: cleared(prometheus, STUCK_ALERT), timeout_s=LIVE_TIMEOUT_S, what="alert cleared"
        )
    assert prometheus.proc.returncode == 0, prometheus.log_tail()
    assert not is_running(prometheus.pid)


async def _sweep_once(env: dict[str, str], log_path: Path) -> None:
    """Runs `reconciler run --role sweeper` until its start-up pass has finished."""
    sweeper_env = with_env(env, RECONCILER_SWEEP_INTERVAL_S="86400", RECONCILER_STUCK_GRACE_S="0")
    with service_process(sweeper_env, log_path, "--role", "sweeper") as sweeper:
        swept = sweeper.wait_for_event("sweep_finished")
    assert swept.get("finalized") == 1, swept


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_every_dashboard_and_alert_query_resolves_against_live_data(
    ports: Ports, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Every dashboard query returns data and every alert rule evaluates cleanly in Prometheus."""
    binary = prometheus_or_skip()
    board = dashboard()
    alerts = shipped_alerts()
    with (
        scraped_service(service_env, tmp_path / "service.log") as service,
        prometheus_for(binary, service, tmp_path / "prometheus") as prometheus,
    ):
        await settled(prometheus)
        submitted = await submit(ports, files(5))
        await wait_for(lambda: summary_of(ports, submitted.batch_id), what="batch finalized")
        # A scrape after the batch makes the rates non-zero and gives every series the
        # two samples in the window that rate() and increase() need.
        files_query = _panel_query(board, "Files processed per second by outcome")
        rates = await wait_for(
            lambda: rates_by_outcome(prometheus, files_query),
            timeout_s=LIVE_TIMEOUT_S,
            what="files panel showing the batch",
        )
        rules = await prometheus.rules()
        for query in board.iter_queries(board.dashboard_json()):
            await _check_dashboard_query(prometheus, query)
        for name, rule in alerts.items():
            answer = await prometheus.query(rule["expr"])
            assert answer["status"] == "success", f"{name}: {answer}"
    assert set(rules) == set(alerts)
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert rule["duration"] == seconds(alerts[name].get("for", "0s")), name
    assert set(rates) == {"succeeded", "failed", "retried"}, rates


async def _check_dashboard_query(prometheus: Prometheus, query: str) -> None:
    variable = _LABEL_VALUES.fullmatch(query.strip())
    if variable is not None:
        metric, label = variable.groups()
        values = await prometheus.data(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert JOB in values, f"{query}: {values}"
        return
    answer = await prometheus.query(grafana_to_promql(query))
    assert answer["status"] == "success", f"{query}: {answer}"
    assert answer["data"]["result"], f"{query} returned no data"


def _panel_query(board: ModuleType, title: str) -> str:
    for panel in board.iter_panels(board.dashboard_json()):
        if panel.get("title") == title:
            query: str = panel["targets"][0]["expr"]
            return query
    raise AssertionError(f"no panel {title!r}")
