"""versus-bullmq at tiny sizes: both sides run, finish every batch, and report a ratio.

Needs node and npm (the first run installs the pinned BullMQ with `npm ci`); no timed
assertions, the figures live in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bench.test_bench_smoke import bench
from tests.services import Endpoints

SIDE_KEYS = {"files_per_s", "wall_s", "finalize_latency_ms", "cpu_us_per_file", "ok", "checks"}

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="versus-bullmq runs the BullMQ peer under Node: node and npm are not on PATH",
)


def test_versus_bullmq_runs_both_sides_to_the_last_batch(
    services: Endpoints, tmp_path: Path
) -> None:
    """One round of 5 x 5: each side's figures, medians and ratio, every batch done."""
    result = bench(services, "versus-bullmq", "--batches", "5", "--files", "5",
                   "--rounds", "1", "--log-dir", str(tmp_path))  # fmt: skip
    assert (result["batches"], result["files"], result["rounds"]) == (5, 25, 1)
    assert result["checks"] == {"ok": True, "per_round": [{"ours": True, "bullmq": True}]}
    (only,) = result["per_round"]
    assert only["order"] == ["ours", "bullmq"]
    assert SIDE_KEYS <= only["ours"].keys()
    assert SIDE_KEYS <= only["bullmq"].keys()
    assert only["ours"]["checks"]["summary_files_done"] == 25
    peer = only["bullmq"]["checks"]
    assert (peer["parents_completed"], peer["children_completed"]) == (5, 25)
    assert peer["summary_files_done"] == 25
    assert only["bullmq"]["finalize_latency_ms"]["n"] == 5
    assert only["bullmq"]["bullmq"] == "6.7.0"
    medians = result["medians"]
    assert {"ours", "bullmq"} == medians.keys()
    assert medians["ours"]["cpu_us_per_file"]["total"] is not None
    assert medians["bullmq"]["cpu_us_per_file"]["total"] is not None
    assert result["ratio"] == round(
        medians["ours"]["files_per_s"] / medians["bullmq"]["files_per_s"], 3
    )
