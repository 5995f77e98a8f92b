"""Scenario 4: delay, blackhole and reset on the paths to Postgres and Redis, through
in-process proxies: no actor hangs past its timeout, /readyz turns 503 and back,
/healthz stays 200, and work resumes when the path heals."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio
import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import ServiceProcess, with_env
from tests.chaos.faulty_proxy import FaultyProxy, faulty_proxy
from tests.chaos.harness import (
    LONG,
    SIZE,
    Fleet,
    assert_nothing_lost_or_duplicated,
    audit_fields,
    first_finished_after,
    report,
    seconds_since,
    settled_audit,
    started,
)
from tests.chaos.probes import ProbeLog, watch
from tests.helpers import files, finalized, sql, submit, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)

# Short faults stay inside every client timeout; the long form outlasts them all
# (asyncpg command timeout 30 s, pool acquire 5 s, Redis socket timeout 10 s).
FAULT_S: Final = 40.0 if LONG else 4.0
BLIP_S: Final = 1.5
DELAY_S: Final = 0.1
PROBE_TIMEOUT_S: Final = 2.0  # reconciler.routes.PROBE_TIMEOUT_S, per dependency
HEALTHZ_MAX_S: Final = 1.0
READY_AGAIN_S: Final = 10.0
BATCHES: Final = 10
PAYLOAD: Final = {"min_s": 0.05, "max_s": 0.1, "fail_rate": 0.05}


@dataclass
class Rig:
    """One replica whose Postgres and Redis traffic goes through faulty proxies."""

    process: ServiceProcess
    postgres: FaultyProxy
    redis: FaultyProxy
    probes: ProbeLog


@asynccontextmanager
async def rig(settings: Settings, fleet: Fleet, **extra_env: str) -> AsyncIterator[Rig]:
    async with (
        faulty_proxy(settings.database_url or "") as postgres,
        faulty_proxy(settings.redis_url or "") as redis,
    ):
        env = with_env(
            fleet.env, RECONCILER_DATABASE_URL=postgres.url, RECONCILER_REDIS_URL=redis.url,
            **extra_env,
        )  # fmt: skip
        process = fleet.start(0, env)
        port = await started(process)
        probes, stop = ProbeLog(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, f"http://127.0.0.1:{port}", probes, stop)
            try:
                yield Rig(process, postgres, redis, probes)
            finally:
                stop.set()


async def _submit_batches(ports: Ports, prefix: str, payload: object = PAYLOAD) -> None:
    for n in range(BATCHES):
        await submit(ports, files(SIZE.files, payload), batch_id=f"{prefix}-{n:03d}")


async def _processing(settings: Settings) -> bool:
    rows = await sql(
        settings.database_url or "", "SELECT count(*) FROM batch_files WHERE status = 'processing'"
    )
    return int(rows[0][0]) > 0


async def _fault(
    settings: Settings,
    ports: Ports,
    rig_: Rig,
    inject: Callable[[], None],
    heal: Callable[[], None],
    seconds: float,
) -> tuple[float, float]:
    """Work in flight, then the fault for `seconds`, then healed; returns both times."""
    await _submit_batches(ports, "before")
    await wait_for(lambda: _processing(settings), what="files in flight")
    began = time.time()
    inject()
    await anyio.sleep(seconds)
    heal()
    return began, time.time()


async def _assert_probes(probes: ProbeLog, began: float, healed: float, dependency: str) -> float:
    """/healthz always 200 and quick; /readyz 503 naming the dependency, then 200 again.
    Returns the seconds from heal to ready."""
    await wait_for(lambda: _ready_after(probes, healed), timeout_s=READY_AGAIN_S)
    slow = [a for a in probes.of("/healthz", began) if a.status != 200 or a.took_s > HEALTHZ_MAX_S]
    assert slow == [], f"/healthz must stay 200 within {HEALTHZ_MAX_S} s: {slow[:5]}"
    down = probes.first("/readyz", 503, began)
    assert down is not None and dependency in down.body, f"/readyz never named {dependency}"
    assert down.at + down.took_s - began <= 2 * PROBE_TIMEOUT_S + 1.0, "readyz turned late"
    again = probes.first("/readyz", 200, healed)
    assert again is not None, "/readyz never came back"
    assert again.at - healed <= READY_AGAIN_S
    return round(again.at + again.took_s - healed, 2)


async def _settle_and_report(
    name: str, settings: Settings, fleet: Fleet, healed: float, ready_s: float, faults: str
) -> None:
    found = await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace,
        SIZE.settle_timeout_s,
    )  # fmt: skip
    report(
        name, faults=faults, ready_s=ready_s,
        resumed_s=await first_finished_after(settings.database_url or "", healed),
        recovery_s=seconds_since(healed, found.last_completed_at),
        actor_crashes=len(fleet.events("actor_crashed")), **audit_fields(found),
    )  # fmt: skip
    assert_nothing_lost_or_duplicated(found)


async def test_postgres_blackhole_pauses_work_and_readiness_only(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Postgres unreachable (packets held): /readyz 503 then 200, /healthz 200 and quick
    throughout, and every batch finalizes once the path heals."""
    async with rig(settings, fleet) as r:
        began, healed = await _fault(
            settings, ports, r, r.postgres.blackhole, r.postgres.heal, FAULT_S
        )
        ready_s = await _assert_probes(r.probes, began, healed, "postgres")
        await _submit_batches(ports, "after")
        await _settle_and_report(
            "postgres_blackhole", settings, fleet, healed, ready_s,
            f"Postgres path blackholed {FAULT_S:g} s",
        )  # fmt: skip


async def test_redis_blackhole_pauses_work_and_readiness_only(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Redis unreachable (packets held): /readyz 503 then 200, /healthz 200 throughout,
    and every batch finalizes once the path heals."""
    async with rig(settings, fleet) as r:
        began, healed = await _fault(settings, ports, r, r.redis.blackhole, r.redis.heal, FAULT_S)
        ready_s = await _assert_probes(r.probes, began, healed, "redis")
        await _submit_batches(ports, "after")
        await _settle_and_report(
            "redis_blackhole", settings, fleet, healed, ready_s,
            f"Redis path blackholed {FAULT_S:g} s",
        )  # fmt: skip


async def test_delay_on_both_paths_slows_but_loses_nothing(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """100 ms each way on both paths: both probes stay 200 and every batch finalizes."""
    async with rig(settings, fleet) as r:
        began = time.time()
        r.postgres.delay(DELAY_S)
        r.redis.delay(DELAY_S)
        await _submit_batches(ports, "slow")
        await wait_for(lambda: finalized(settings, f"slow-{BATCHES - 1:03d}"), timeout_s=60)
        r.postgres.heal()
        r.redis.heal()
        healed = time.time()
        assert {a.status for a in r.probes.of("/healthz", began)} == {200}
        assert {a.status for a in r.probes.of("/readyz", began)} == {200}
        await _settle_and_report(
            "delay", settings, fleet, healed, 0.0, f"{DELAY_S * 1000:g} ms each way, both paths"
        )


async def test_postgres_reset_recovers(settings: Settings, ports: Ports, fleet: Fleet) -> None:
    """Every Postgres connection reset, and new ones too, for a while: /readyz 503 then
    200 and new batches finalize once it heals."""
    async with rig(settings, fleet) as r:
        began, healed = await _fault(settings, ports, r, r.postgres.reset, r.postgres.heal, BLIP_S)
        again = await wait_for(lambda: _ready_after(r.probes, healed), timeout_s=READY_AGAIN_S)
        assert r.probes.first("/readyz", 503, began) is not None
        await submit(ports, files(SIZE.files, PAYLOAD), batch_id="after-reset")
        await wait_for(lambda: finalized(settings, "after-reset"), timeout_s=30)
        report("postgres_reset", faults=f"Postgres connections reset for {BLIP_S:g} s",
               ready_s=round(again - healed, 2))  # fmt: skip


async def _ready_after(probes: ProbeLog, healed: float) -> float | None:
    again = probes.first("/readyz", 200, healed)
    return None if again is None else again.at + again.took_s


async def test_healthz_stays_200_through_a_redis_reset(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Redis connections reset for 1.5 s on an idle replica: /healthz answers 200 all along."""
    async with rig(settings, fleet) as r:
        began = time.time()
        r.redis.reset()
        await anyio.sleep(BLIP_S)
        r.redis.heal()
        await wait_for(lambda: _ready_after(r.probes, time.time() - 0.1), timeout_s=READY_AGAIN_S)
        await anyio.sleep(1.0)  # the restart backoff that follows the blip
    statuses = [a.status for a in r.probes.of("/healthz", began)]
    assert set(statuses) == {200}, f"/healthz answers during and after the blip: {statuses}"


async def test_short_redis_outage_strands_no_file_in_flight(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """A 1.5 s Redis outage while files run (visibility timeout 60 s): the batch still
    finalizes within 20 s of the heal and the consumer group drains."""
    slow = {"min_s": 1.0, "max_s": 1.0, "fail_rate": 0.0}
    async with rig(settings, fleet, RECONCILER_VISIBILITY_TIMEOUT_S="60") as r:
        await submit(ports, files(8, slow), batch_id="in-flight")
        await wait_for(lambda: _processing(settings), what="files in flight")
        r.redis.reset()
        await anyio.sleep(BLIP_S)
        r.redis.heal()
        await wait_for(lambda: finalized(settings, "in-flight"), timeout_s=20)
        # Audited while the replica still reaches Redis: its acknowledgements retry on
        # their own schedule, beside the writes, so they may land after the finalization.
        found = await settled_audit(
            settings.database_url or "", settings.redis_url or "", settings.namespace, 10
        )
    assert_nothing_lost_or_duplicated(found)
