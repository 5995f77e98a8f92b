"""The suite's service finder falls back to embedded servers when nothing answers."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from reconciler import migrations
from reconciler.app import open_ports
from reconciler.config import Settings
from tests import services
from tests.helpers import files, running, submit, summary_of, wait_for

pytest.importorskip("pgserver", reason="the embedded extra is not installed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_unreachable_local_services_mean_embedded_ones(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """With no URLs and nothing on the standard ports, real embedded servers run a batch."""
    monkeypatch.delenv("RECONCILER_TEST_DATABASE_URL", raising=False)
    monkeypatch.delenv("RECONCILER_TEST_REDIS_URL", raising=False)
    monkeypatch.setattr(services, "LOCAL_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/x")
    monkeypatch.setattr(services, "LOCAL_REDIS_URL", "redis://127.0.0.1:1/0")
    assert services.choose() == "embedded"
    with services.endpoints() as found:
        assert found.source == "embedded" and len(found.pids) == 2
        assert all(_alive(pid) for pid in found.pids)
        embedded = replace(settings, database_url=found.database_url, redis_url=found.redis_url)
        async with open_ports(embedded, listen=True) as ports:
            await migrations.migrate(ports.db)
            await ports.queue.ensure_group()
            submitted = await submit(ports, files(3))
            async with running(embedded, ports):
                summary = await wait_for(lambda: summary_of(ports, submitted.batch_id))
    assert summary["files_succeeded"] == 3
    assert not any(_alive(pid) for pid in found.pids), "servers stopped on exit"
    assert "RECONCILER_TEST_DATABASE_URL" not in os.environ
