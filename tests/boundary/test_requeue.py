"""Jobs Redis lost, put back by the sweeper: the same bytes as submitted, once each even
with two sweepers, on the next sweep rather than a visibility timeout later; and a
malformed job that names a known file fails that file instead of stranding its batch."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any, Final

import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import ServiceProcess, with_env
from tests.boundary.support import (
    STEADY,
    Replicas,
    age_pending,
    calls,
    drop_namespace,
    events,
    files_of,
    job_file_ids,
    journal_grows,
    ports_on,
    redis_client,
    settled,
    stop,
    stream_jobs,
    work,
)
from tests.chaos.harness import PrivateRedis
from tests.helpers import files, sql, submit, wait_for

pytestmark = pytest.mark.timeout(90)
ODD_PAYLOADS: Final[list[Any]] = [[1e300] * 4000, {"x": 1e16}, {"n": 1}]
LOST_FILES: Final = 50
PAUSE_MS: Final = 2000
NEXT_SWEEP_S: Final = 8.0
LONG_VISIBILITY: Final = {"RECONCILER_VISIBILITY_TIMEOUT_S": "30"}


async def _jobs_of(url: str, namespace: str, at_least: int) -> list[bytes]:
    async def enough() -> list[bytes] | None:
        found = await stream_jobs(url, namespace)
        return found if len(found) >= at_least else None

    return await wait_for(enough, timeout_s=15, what=f"{at_least} jobs on the stream")


async def test_requeued_jobs_are_the_submitted_bytes(
    settings: Settings, ports: Ports, replicas: Replicas
) -> None:
    """Jobs lost in Redis come back byte-identical (28 KB of 1e300, 1e16), then succeed."""
    replicas.env = with_env(replicas.env, RECONCILER_HANDLER=STEADY)
    specs = [files(1, payload, prefix=f"odd{n}-")[0] for n, payload in enumerate(ODD_PAYLOADS)]
    await submit(ports, specs, batch_id="exact")
    submitted = sorted(await stream_jobs(settings.redis_url or "", settings.namespace))
    await drop_namespace(settings.redis_url or "", settings.namespace)
    await age_pending(settings.database_url or "")
    await replicas.up("sweeper")
    requeued = await _jobs_of(settings.redis_url or "", settings.namespace, len(specs))
    same = sorted(requeued) == submitted
    sizes = ([len(j) for j in sorted(requeued)], [len(j) for j in submitted])
    assert same, f"requeued job sizes {sizes[0]} differ from the submitted {sizes[1]}"
    await replicas.up("worker")
    assert await settled(settings.database_url or "", "exact") == "completed"


async def _replace_job(url: str, namespace: str, file_id: str, job: dict[str, Any]) -> None:
    """Swaps the file's job on the stream for `job`, leaving the queued set as it was."""
    async with redis_client(url) as client:
        entries: Any = await client.xrange(f"{namespace}:jobs")
        for entry_id, fields in entries:
            if json.loads(fields[b"job"])["file_id"] == file_id:
                await client.xdel(f"{namespace}:jobs", entry_id)
        await client.xadd(f"{namespace}:jobs", {"job": json.dumps(job)})


async def _still_queued(url: str, namespace: str, batch_id: str, file_id: str) -> list[str]:
    async with redis_client(url) as client:
        found: Any = await client.smembers(f"{namespace}:queued")
    members = [m.decode() for m in found]
    return [m for m in members if batch_id in m and file_id in m]


async def test_a_malformed_job_of_a_known_file_fails_that_file(
    settings: Settings, ports: Ports, replicas: Replicas
) -> None:
    """A job naming a known file with an unknown field fails that file; its batch completes."""
    replicas.env = with_env(replicas.env, RECONCILER_HANDLER=STEADY)
    await submit(ports, files(2, prefix="k"), batch_id="bad-known")
    bad = {"batch_id": "bad-known", "file_id": "k00000", "uri": "mem://k0", "extra": 1}
    await _replace_job(settings.redis_url or "", settings.namespace, "k00000", bad)
    await replicas.up()
    status = await settled(settings.database_url or "", "bad-known", timeout_s=15)
    rows = await files_of(settings.database_url or "", "bad-known")
    assert status == "completed_with_errors"
    assert rows["k00001"]["status"] == "succeeded", rows
    assert rows["k00000"]["status"] == "failed", rows
    assert str(rows["k00000"]["error"]).startswith("job could not be decoded"), rows
    named = await _still_queued(settings.redis_url or "", settings.namespace, "bad-known", "k0")
    assert named == [], f"the queued set still names the file: {named}"


async def _sweeps(process: ServiceProcess) -> int:
    return len(events(process, "sweep_finished"))


async def _sweep_twice_more(sweepers: list[ServiceProcess]) -> None:
    """Waits until every sweeper has finished two more passes."""
    targets = [await _sweeps(p) + 2 for p in sweepers]

    async def done() -> bool:
        return all([await _sweeps(p) >= n for p, n in zip(sweepers, targets, strict=True)])

    await wait_for(done, timeout_s=15, what="two more sweeps on each sweeper")


async def test_two_sweepers_requeue_each_lost_job_once(
    settings: Settings, replicas: Replicas, own_redis: PrivateRedis, journal: Path
) -> None:
    """Two sweepers after Redis lost 50 jobs: 50 jobs back, not 100; each file runs once."""
    replicas.env = with_env(replicas.env, RECONCILER_REDIS_URL=own_redis.url)
    async with ports_on(settings, own_redis.url) as ports:
        await submit(ports, files(LOST_FILES, work(journal, 0.001)), batch_id="lost")
    async with redis_client(own_redis.url) as client:
        await client.flushall()
        # Files become due only when aged below, during the pause.
        env = with_env(replicas.env, RECONCILER_VISIBILITY_TIMEOUT_S="3600")
        sweepers = [await replicas.up("sweeper", env), await replicas.up("sweeper", env)]
        # Writes wait out the pause while reads go on: both sweepers look, then write.
        await client.client_pause(PAUSE_MS, all=False)
        await age_pending(settings.database_url or "")
    await _jobs_of(own_redis.url, settings.namespace, LOST_FILES)
    await _sweep_twice_more(sweepers)
    jobs = Counter(job_file_ids(await stream_jobs(own_redis.url, settings.namespace)))
    assert sum(jobs.values()) == LOST_FILES, f"{sum(jobs.values())} jobs for {len(jobs)} files"
    await replicas.up("worker")
    await settled(settings.database_url or "", "lost")
    runs = Counter(c.file_id for c in calls(journal))
    assert len(runs) == LOST_FILES and set(runs.values()) == {1}, f"runs per file: {runs}"


async def _sweeping(replicas: Replicas) -> None:
    """A sweeper with a 30 s visibility timeout, running before anything is lost."""
    sweeper = await replicas.up("sweeper", with_env(replicas.env, **LONG_VISIBILITY))
    await wait_for(lambda: _sweeps(sweeper), what="a first sweep")


async def _pending_for(settings: Settings, seconds: int) -> None:
    """Makes the pending files look enqueued `seconds` ago."""
    await sql(settings.database_url or "", "UPDATE batch_files"
              " SET enqueued_at = now() - make_interval(secs => $1) WHERE status = 'pending'",
              seconds)  # fmt: skip


async def _requeued_on_next_sweep(settings: Settings, wanted: set[str]) -> None:
    """Redis loses the namespace; the running sweeper puts `wanted` back within seconds."""
    await drop_namespace(settings.redis_url or "", settings.namespace)

    async def back() -> bool:
        found = job_file_ids(await stream_jobs(settings.redis_url or "", settings.namespace))
        return wanted <= set(found)

    await wait_for(back, timeout_s=NEXT_SWEEP_S, what=f"jobs of {sorted(wanted)} requeued")


@pytest.mark.parametrize("pending_s", [0, 10], ids=["just-submitted", "pending-10s"])
async def test_lost_jobs_come_back_on_the_next_sweep(
    settings: Settings, ports: Ports, replicas: Replicas, pending_s: int
) -> None:
    """Visibility timeout 30 s, no worker: lost jobs are requeued within seconds."""
    await _sweeping(replicas)
    await submit(ports, files(4), batch_id="waiting")
    await _pending_for(settings, pending_s)
    await _requeued_on_next_sweep(settings, {f"f{n:05d}" for n in range(4)})


async def test_lost_jobs_come_back_after_a_worker_was_killed_mid_file(
    settings: Settings, ports: Ports, replicas: Replicas, journal: Path
) -> None:
    """Visibility timeout 30 s, worker SIGKILLed mid-file: unstarted files requeued at once."""
    await _sweeping(replicas)
    await submit(ports, files(4, work(journal, 30.0)), batch_id="killed")
    env = with_env(replicas.env, RECONCILER_CONCURRENCY="1", **LONG_VISIBILITY)
    worker = replicas.start("worker", env)
    started = {c.file_id for c in await journal_grows(journal, 0)}
    await stop(worker, signal.SIGKILL)
    await _pending_for(settings, 10)  # not just submitted: that case is tested above
    unstarted = {f"f{n:05d}" for n in range(4)} - started
    await _requeued_on_next_sweep(settings, unstarted)
