"""The benchmark harness at tiny sizes: each command runs and prints a sound JSON line.

No timed assertions: the figures live in docs/PERFORMANCE.md. The harness makes its
own throwaway database on the test server, and drops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.services import Endpoints

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
THROUGHPUT_KEYS = {
    "files_per_s", "batches", "files", "wall_s", "finalize_latency_ms",
    "submit_files_per_s", "peak_rss_mb", "checks",
}  # fmt: skip
SWEEPER_QUERIES = {
    "expired_leases",
    "exhausted_leases",
    "claim_unqueued_files",
    "deadline_batches",
    "stuck_batches",
    "delete_expired_batches",
}


def bench(services: Endpoints, *args: str) -> dict[str, Any]:
    """Runs `python -m bench ARGS` against the test services; returns its JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(
        RECONCILER_DATABASE_URL=services.database_url,
        RECONCILER_REDIS_URL=services.redis_url,
        PYTHONPATH=str(REPO),
    )
    # A session of its own: if the run hangs, its children (service, receiver, poster)
    # go with it. It is interrupted first, so it drops its scratch database and
    # namespace as on Ctrl-C; what is still there after STOP_TIMEOUT_S is killed.
    child = subprocess.Popen(
        [sys.executable, "-m", "bench", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = child.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _, stderr = _stopped(child)
        message = f"bench {args[0]} ran past {RUN_TIMEOUT_S:g} s: {stderr[-4000:]}"
        raise AssertionError(message) from None
    assert child.returncode == 0, stderr[-4000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _stopped(child: subprocess.Popen[str]) -> tuple[str, str]:
    """Interrupts a run, then kills its whole session if it does not end in time."""
    child.send_signal(signal.SIGINT)
    try:
        return child.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return child.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def test_throughput_finalizes_every_batch_exactly_once(services: Endpoints, tmp_path: Path) -> None:
    """throughput: the JSON has every figure and each batch got one summary."""
    result = bench(services, "throughput", "--batches", "3", "--files", "5",
                   "--log-dir", str(tmp_path))  # fmt: skip
    assert THROUGHPUT_KEYS <= result.keys()
    assert (result["batches"], result["files"]) == (3, 15)
    checks = result["checks"]
    assert checks["ok"] is True
    assert (checks["summaries"], checks["summary_files"], checks["unfinalized"]) == (3, 15, 0)
    latency = result["finalize_latency_ms"]
    assert sum(figures["n"] for figures in latency.values()) == 3
    assert all({"p50", "p99", "max", "n"} <= figures.keys() for figures in latency.values())


def test_sweep_times_both_histories_and_explains_each_query(services: Endpoints) -> None:
    """sweep: timings for empty and filled history, ratio, a plan per sweeper query."""
    result = bench(services, "sweep", "--history-batches", "100", "--history-files", "1000",
                   "--passes", "3", "--unfinished-batches", "4")  # fmt: skip
    assert result["checks"]["ok"] is True
    assert {"median", "min", "p90", "max"} <= result["empty_ms"].keys()
    assert {"median", "min", "p90", "max"} <= result["history_ms"].keys()
    assert result["ratio"] is not None
    for history in ("empty", "history"):
        assert set(result["plans"][history]) == SWEEPER_QUERIES
        assert all(plan["plan"] for plan in result["plans"][history].values())
    assert {"median", "min", "p90", "max"} <= result["history_retention_ms"].keys()
    deletion = result["deletion"]
    assert (deletion["batches"], deletion["files"]) == (100, 1000)
    assert deletion["batches_per_s"] > 0 and deletion["files_per_s"] > 0
    assert deletion["checks"] == {
        "history_left": 0, "unfinalized": 4, "other_repairs": {}, "ok": True,
    }  # fmt: skip
    assert {"median", "min", "p90", "max"} <= deletion["after_vacuum_ms"].keys()
    assert deletion["plan"]["plan"] and deletion["passes"] >= 1


def test_submit_creates_and_enqueues_every_file(services: Endpoints) -> None:
    """submit: every file of the timed batch has a job id and a job on the stream."""
    result = bench(services, "submit", "--files", "200", "--repeat", "1")
    assert result["checks"] == {"files_pending": 200, "jobs_on_stream": 200, "ok": True}
    assert len(result["seconds"]) == 1


def test_webhook_runs_every_side_and_delivers_every_event(
    services: Endpoints, tmp_path: Path
) -> None:
    """webhook --floor: one round of each side; the webhook side delivered every batch's
    event, and on the floor's side the poster posted them (the run waits for that)."""
    result = bench(services, "webhook", "--batches", "3", "--files", "2", "--rounds", "1",
                   "--floor", "--timeout-s", "30", "--log-dir", str(tmp_path))  # fmt: skip
    (only,) = result["rounds"]
    assert only["order"] == ["none", "webhook", "posts"]
    assert only["none"]["delivery_latency_ms"] is None
    assert only["webhook"]["delivery_latency_ms"]["n"] == 3  # answered by the receiver
    assert only["webhook"]["delivery_recorded_ms"]["n"] == 3
    assert only["posts"]["delivery_recorded_ms"] is None  # nothing subscribed
    assert {"receiver", "poster"} <= only["posts"]["cpu_us_per_file"].keys()
    assert only["posts"]["ok"] is True and "floor_drop_paired" in result
    assert result["checks"]["ok"] is True and result["checks"]["duplicate_acknowledgements"] == 0


def test_wait_returns_after_each_finalization(services: Endpoints, tmp_path: Path) -> None:
    """wait: every round's Client.wait returned, with latency percentiles."""
    result = bench(services, "wait", "--rounds", "3", "--work-s", "0.05", "--webhook",
                   "--log-dir", str(tmp_path))  # fmt: skip
    assert (result["rounds"], result["listen"], result["checks"]["ok"]) == (3, True, True)
    assert result["delivery_latency_ms"]["n"] == 3
    assert {"p50", "p99", "min", "max"} <= result["latency_ms"].keys()


def test_post_counts_every_answered_post(services: Endpoints) -> None:
    """post: every POST of every round is answered, and a CPU figure per round."""
    result = bench(services, "post", "--posts", "30", "--rounds", "2", "--concurrency", "4")
    assert result["checks"] == {"delivered": 110, "wanted": 110, "ok": True}
    assert len(result["cpu_us_per_post"]) == 2 and result["cpu_us_per_post_median"] > 0
