"""Faults while a worker holds jobs: Redis resets while the reader admits a batch and
malformed entries, and a Postgres blackhole while a file outlives the visibility
timeout with another worker ready to steal it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import pytest

from reconciler.app import Ports
from reconciler.config import Settings
from tests.acceptance.processes import with_env
from tests.boundary.support import (
    Replicas,
    calls,
    files_of,
    journal_grows,
    redis_client,
    settled,
    work,
)
from tests.boundary.tripwire import tripwire_proxy
from tests.chaos.faulty_proxy import FaultyProxy, faulty_proxy
from tests.helpers import files, submit, wait_for

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")
GHOST: Final = "no-such-batch-tripwire"
RESETS: Final = 3
MAX_ATTEMPTS: Final = 3
READER_FILES: Final = 5
SLOW_FILE_S: Final = 8.0
BLACKHOLE_S: Final = 7.0  # longer than the 5 s between a consumer's reclaim passes


def _malformed() -> list[bytes]:
    """Two entries that are not JSON and one job naming no batch (it carries the marker)."""
    ghost = {"batch_id": GHOST, "file_id": "g1", "uri": "mem://g1"}
    return [b"{not json", b'{"batch_id": "broken', json.dumps(ghost).encode()]


async def _dead_letters(url: str, namespace: str) -> Counter[bytes]:
    """How often each original job was dead-lettered."""
    async with redis_client(url) as client:
        entries: Any = await client.xrange(f"{namespace}:dead")
    return Counter(fields.get(b"job") for _, fields in entries)


async def _when(probe: Callable[[], Awaitable[T]], holds: Callable[[T], bool]) -> T | None:
    """The probe's value when it passes `holds`, else None (for `wait_for`)."""
    value = await probe()
    return value if holds(value) else None


async def test_redis_resets_in_the_reader_fail_no_file(
    settings: Settings, ports: Ports, replicas: Replicas, journal: Path
) -> None:
    """Redis resets three times while jobs are admitted: files succeed, dead letters once."""
    await submit(ports, files(READER_FILES, work(journal, 0.05)), batch_id="read")
    redis_url = settings.redis_url or ""
    async with redis_client(redis_url) as client:
        for job in _malformed():
            await client.xadd(f"{settings.namespace}:jobs", {"job": job})
    async with tripwire_proxy(redis_url, GHOST.encode(), RESETS) as proxy:
        await replicas.up("worker", with_env(replicas.env, RECONCILER_REDIS_URL=proxy.url))
        await settled(settings.database_url or "", "read")
        # Dead letters are settled beside the outcome writes, not before them: the
        # batch can finalize while the ghost's dead letter is still being retried.
        every_job = Counter(_malformed())
        dead = partial(_dead_letters, redis_url, settings.namespace)
        await wait_for(
            lambda: _when(dead, lambda found: found == every_job),
            timeout_s=30.0, what="every malformed job dead-lettered",
        )  # fmt: skip
        assert proxy.trips == RESETS, f"the reset fired {proxy.trips} times"
    rows = await files_of(settings.database_url or "", "read")
    runs = Counter(c.file_id for c in calls(journal))
    found = {
        "statuses": Counter(f["status"] for f in rows.values()),
        "over max attempts": sorted(k for k, f in rows.items() if f["attempts"] > MAX_ATTEMPTS),
        "never run": sorted(set(rows) - set(runs)),
        "dead letters per job": await _dead_letters(redis_url, settings.namespace),
    }
    assert found == {
        "statuses": {"succeeded": READER_FILES},
        "over max attempts": [],
        "never run": [],
        "dead letters per job": every_job,
    }


async def _owner_proxy(proxies: dict[int, FaultyProxy], journal: Path) -> FaultyProxy:
    """The Postgres proxy of the replica that started the file."""
    (first,) = await journal_grows(journal, 0)
    return proxies[first.pid]


async def test_postgres_blackhole_lets_no_one_steal_a_live_file(
    settings: Settings, ports: Ports, replicas: Replicas, journal: Path
) -> None:
    """The owner's Postgres blackholed mid-file: no other worker reruns it; it succeeds."""
    database_url = settings.database_url or ""
    async with faulty_proxy(database_url) as one, faulty_proxy(database_url) as two:
        proxies: dict[int, FaultyProxy] = {}
        for proxy in (one, two):
            env = with_env(replicas.env, RECONCILER_DATABASE_URL=proxy.url)
            proxies[(await replicas.up("all", env)).proc.pid] = proxy
        await submit(ports, files(1, work(journal, SLOW_FILE_S)), batch_id="slow")
        owner = await _owner_proxy(proxies, journal)
        owner.blackhole()
        await anyio.sleep(BLACKHOLE_S)  # the fault's length, not a wait for a condition
        owner.heal()
        await settled(database_url, "slow")
    (row,) = (await files_of(database_url, "slow")).values()
    assert len(calls(journal)) == 1, f"handler calls: {calls(journal)}"
    assert row["status"] == "succeeded", row
