"""Scenario 2: a private Redis restarted empty (the stream and the group are gone): the
replicas reconnect and recreate them, the sweeper re-enqueues every pending file from
Postgres, and nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from reconciler.app import Ports, open_ports
from reconciler.config import Settings
from reconciler.errors import RetryableError
from tests.acceptance.processes import with_env
from tests.chaos.harness import (
    SIZE,
    Audit,
    Fleet,
    PrivateRedis,
    assert_nothing_lost_or_duplicated,
    audit_fields,
    finalized_twice,
    first_finished_after,
    private_redis,
    report,
    seconds_since,
    settled_audit,
    started,
)
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
REPLICAS = 2
RESUBMITS = 50
# Longer than the 2 s visibility timeout: the leases of files in flight at the crash
# expire before the consumer restarts. A shorter outage strands them: see
# test_network_faults.py::test_short_redis_outage_strands_no_file_in_flight.
DOWN_S = 4.0
PAYLOAD = {"min_s": 0.02, "max_s": 0.05, "fail_rate": 0.05}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path) as server:
        yield server


async def _terminal_files(settings: Settings) -> int:
    rows = await sql(
        settings.database_url or "",
        "SELECT count(*) FROM batch_files WHERE status IN ('succeeded', 'failed')",
    )
    return int(rows[0][0])


async def _restart_empty(server: PrivateRedis) -> float:
    """SIGKILL, DOWN_S without Redis, then a fresh empty one on the same port."""
    server.kill()
    await anyio.sleep(DOWN_S)
    await anyio.to_thread.run_sync(server.start)
    return time.time()


async def _submit(ports: Ports, prefix: str, count: int) -> None:
    """Resubmits (same id) when Redis fails, as a client would: a batch committed
    before its enqueue failed is the sweeper's to enqueue."""
    for n in range(count):
        for _ in range(RESUBMITS):
            try:
                await submit(ports, files(SIZE.files, PAYLOAD), batch_id=f"{prefix}-{n:04d}")
                break
            except RetryableError:
                await anyio.sleep(0.1)


async def _report(
    name: str, settings: Settings, found: Audit, fleet: Fleet, back_at: float, faults: str
) -> None:
    report(
        name, faults=faults,
        resumed_s=await first_finished_after(settings.database_url or "", back_at),
        recovery_s=seconds_since(back_at, found.last_completed_at),
        requeued=len(fleet.events("file_requeued")),
        finalized_twice=len(finalized_twice(fleet.events())), **audit_fields(found),
    )  # fmt: skip


async def test_redis_restarted_empty_mid_run_loses_nothing(
    settings: Settings, fleet: Fleet, redis_server: PrivateRedis
) -> None:
    """Redis killed with files in flight and back empty 4 s later: every batch finalizes
    once, every file counted once."""
    through = replace(settings, redis_url=redis_server.url)
    fleet.env = with_env(fleet.env, RECONCILER_REDIS_URL=redis_server.url)
    half = SIZE.batches // 2
    async with open_ports(through, listen=True) as ports:
        await ports.queue.ensure_group()
        for index in range(REPLICAS):
            await started(fleet.start(index))
        await _submit(ports, "before", half)
        await wait_for(lambda: _terminal_files(settings), what="some files done")
        restarted_at = await _restart_empty(redis_server)
        await _submit(ports, "after", SIZE.batches - half)
    found = await settled_audit(
        settings.database_url or "", redis_server.url, settings.namespace, SIZE.settle_timeout_s
    )
    faults = f"Redis SIGKILLed mid-run, {DOWN_S:g} s down, back empty"
    await _report("redis_restarted_empty", settings, found, fleet, restarted_at, faults)
    assert_nothing_lost_or_duplicated(found)
    assert finalized_twice(fleet.events()) == []


async def test_redis_restarted_empty_between_files_requeues_from_postgres(
    settings: Settings, fleet: Fleet, redis_server: PrivateRedis
) -> None:
    """Jobs enqueued, Redis restarted empty before any replica read them: the replicas
    recreate the stream and group, the sweeper re-enqueues every file, all finalize."""
    through = replace(settings, redis_url=redis_server.url)
    fleet.env = with_env(fleet.env, RECONCILER_REDIS_URL=redis_server.url)
    async with open_ports(through, listen=True) as ports:
        await _submit(ports, "queued", SIZE.batches)
    restarted_at = await _restart_empty(redis_server)
    for index in range(REPLICAS):
        await started(fleet.start(index))
    found = await settled_audit(
        settings.database_url or "", redis_server.url, settings.namespace, SIZE.settle_timeout_s
    )
    faults = "Redis SIGKILLed with every job queued, back empty"
    await _report("redis_restarted_empty_idle", settings, found, fleet, restarted_at, faults)
    assert_nothing_lost_or_duplicated(found)
    assert len(fleet.events("file_requeued")) >= found.files, "every job came back from Postgres"
