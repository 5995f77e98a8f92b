"""The sweeper with Redis out of reach or out of memory: the passes that need only
Postgres still finalize batches, and a full Redis is a retryable blink, not a crash."""

from __future__ import annotations

from typing import Any, Final

import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import ServiceProcess, with_env
from tests.boundary.support import (
    Replicas,
    age_pending,
    events,
    ports_on,
    redis_client,
    settled,
)
from tests.chaos.harness import PrivateRedis, free_port
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(60)
SWEEPS_WANTED: Final = 3
SWEEPS_WITHIN_S: Final = 6.0
RETRYABLE_BACKOFF_MAX_S: Final = 5.0

_LOSE_EVENT: Final = """
WITH done AS (
    UPDATE batch_files SET status = 'succeeded', attempts = 1, finished_at = now(),
                           started_at = now()
    WHERE batch_id = $1 RETURNING 1
)
UPDATE batches SET files_succeeded = (SELECT count(*) FROM done),
                   last_file_completed_at = now() - interval '1 hour'
WHERE batch_id = $1
"""


async def _pass_deadline(database_url: str, batch_id: str) -> None:
    await sql(database_url, "UPDATE batches SET deadline_at = now() - interval '1 second'"
              " WHERE batch_id = $1", batch_id)  # fmt: skip


async def test_sweeper_finalizes_while_redis_is_down(
    settings: Settings, ports: Ports, replicas: Replicas
) -> None:
    """Redis unreachable: a batch past its deadline and one whose event was lost finalize."""
    database_url = settings.database_url or ""
    await submit(ports, files(3), batch_id="late", deadline_s=3600)
    await submit(ports, files(3), batch_id="lost-event")
    await _pass_deadline(database_url, "late")
    await age_pending(database_url)  # their jobs look lost: the sweep asks Redis
    await sql(database_url, _LOSE_EVENT, "lost-event")
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    await replicas.up("sweeper", with_env(replicas.env, RECONCILER_REDIS_URL=unreachable))
    assert await settled(database_url, "late", timeout_s=10) == "completed_with_errors"
    assert await settled(database_url, "lost-event", timeout_s=5) == "completed"


async def _fill_up(server: PrivateRedis) -> None:
    """Redis refuses every write from now on, as a full cache with noeviction does."""
    async with redis_client(server.url) as client:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")


def _longest_backoff(process: ServiceProcess) -> float:
    delays: list[Any] = [e.get("restart_in_s", 0) for e in events(process, "actor_crashed")]
    return max((float(d) for d in delays), default=0.0)


async def test_redis_out_of_memory_does_not_stop_the_sweeper(
    settings: Settings, replicas: Replicas, own_redis: PrivateRedis
) -> None:
    """Redis OOM on the requeue write: the sweeper keeps sweeping, no long backoff."""
    async with ports_on(settings, own_redis.url) as ports:
        await submit(ports, files(3), batch_id="oom")
    async with redis_client(own_redis.url) as client:
        await client.flushall()  # the jobs are lost
    await _fill_up(own_redis)
    await age_pending(settings.database_url or "")
    sweeper = await replicas.up(
        "sweeper", with_env(replicas.env, RECONCILER_REDIS_URL=own_redis.url)
    )

    async def sweeping() -> bool:
        return len(events(sweeper, "sweep_finished")) >= SWEEPS_WANTED

    try:
        await wait_for(sweeping, timeout_s=SWEEPS_WITHIN_S, what=f"{SWEEPS_WANTED} sweeps")
    except AssertionError as exc:
        crashes = events(sweeper, "actor_crashed")
        last = crashes[-1].get("error") if crashes else None
        raise AssertionError(f"{exc}; {len(crashes)} actor crashes, last: {last}") from None
    assert _longest_backoff(sweeper) <= RETRYABLE_BACKOFF_MAX_S
