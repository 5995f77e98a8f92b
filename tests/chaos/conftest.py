"""Fixtures of the chaos suite: the service's environment for chaos runs, and a fleet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.processes import with_env
from tests.chaos.harness import Fleet

CHAOS_SETTINGS = {
    "RECONCILER_HANDLER": "tests.chaos.handlers:workload",
    "RECONCILER_CONCURRENCY": "4",
    "RECONCILER_VISIBILITY_TIMEOUT_S": "2",
    "RECONCILER_SWEEP_INTERVAL_S": "0.5",
    "RECONCILER_STUCK_GRACE_S": "1",
    "RECONCILER_FILE_TIMEOUT_S": "5",
    "RECONCILER_MAX_ATTEMPTS": "3",
    "RECONCILER_DRAIN_TIMEOUT_S": "5",
    "RECONCILER_STATS_INTERVAL_S": "0.5",
}


@pytest.fixture
def chaos_env(service_env: dict[str, str]) -> dict[str, str]:
    """A `reconciler run` environment with short leases, sweeps and grace for chaos runs."""
    return with_env(service_env, **CHAOS_SETTINGS)


@pytest.fixture
def fleet(chaos_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    """Replicas of the service, every one killed at the end of the test."""
    replicas = Fleet(chaos_env, tmp_path)
    try:
        yield replicas
    finally:
        replicas.close()
