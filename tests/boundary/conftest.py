"""Fixtures of the boundary tests: the service's environment with short leases and
sweeps, replicas stopped at the end of each test, and a handler journal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.processes import with_env
from tests.boundary.support import SETTINGS, Replicas
from tests.chaos.harness import PrivateRedis, private_redis


@pytest.fixture
def env(service_env: dict[str, str]) -> dict[str, str]:
    """A `reconciler run` environment for this test's database and namespace."""
    return with_env(service_env, **SETTINGS)


@pytest.fixture
def replicas(env: dict[str, str], tmp_path: Path) -> Iterator[Replicas]:
    """Service processes, every one killed at the end of the test."""
    started = Replicas(env, tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """Where `workload` appends one line per handler call."""
    return tmp_path / "journal.tsv"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone, to pause, fill or empty."""
    with private_redis(tmp_path) as server:
        yield server
