"""The port steps the actors retry: each one can run twice and change nothing more."""

from __future__ import annotations

from reconciler import jobs
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.queue import Delivery
from tests.helpers import files, sql, start_as, submit


async def _attempts(settings: Settings, file_id: str) -> tuple[str, int]:
    rows = await sql(
        settings.database_url or "",
        "SELECT status, attempts FROM batch_files WHERE file_id = $1",
        file_id,
    )
    return rows[0][0], rows[0][1]


async def test_a_start_retried_with_its_key_spends_one_attempt(
    settings: Settings, ports: Ports
) -> None:
    """`start_files` run again with the same key (a lost reply) spends no second attempt."""
    submitted = await submit(ports, files(1))
    first = await start_as(ports, settings, "w1", submitted.batch_id, "f00000")
    again = await start_as(ports, settings, "w1", submitted.batch_id, "f00000")
    assert first[0]["started"] == again[0]["started"] == 1
    assert await _attempts(settings, "f00000") == ("processing", 1)


async def test_a_live_lease_holds_off_another_worker(settings: Settings, ports: Ports) -> None:
    """A second worker does not start a file under a live lease; it learns it is held."""
    submitted = await submit(ports, files(1))
    await start_as(ports, settings, "w1", submitted.batch_id, "f00000")
    [row] = await start_as(ports, settings, "w2", submitted.batch_id, "f00000")
    assert (row["started"], row["held"]) == (None, True)
    assert await _attempts(settings, "f00000") == ("processing", 1)


async def test_release_gives_back_only_unrun_attempts(settings: Settings, ports: Ports) -> None:
    """A stop returns every file to pending; only the unrun start loses its attempt."""
    submitted = await submit(ports, files(2))
    await start_as(ports, settings, "w1", submitted.batch_id, "f00000")
    await start_as(ports, settings, "w1", submitted.batch_id, "f00001")
    await ports.db.execute("release_leases", "w1", ["w1/1"])  # both keys are "w1/1"
    assert await _attempts(settings, "f00000") == ("pending", 0)
    await start_as(ports, settings, "w2", submitted.batch_id, "f00001")
    await ports.db.execute("release_leases", "w2", [])
    assert await _attempts(settings, "f00001") == ("pending", 1)


async def test_a_dead_letter_retried_is_written_once(ports: Ports) -> None:
    """Dead-lettering the same entry twice leaves one dead letter and no queued mark."""
    queue = ports.queue
    member = jobs.member("b", "f")
    [entry_id] = await queue.enqueue([{"job": "{not json"}], [member])
    [delivery] = await queue.read("c1", 10, 100)
    assert delivery.id == entry_id
    for _ in range(2):
        await queue.dead_letter(Delivery(delivery.id, delivery.fields), "bad", member)
    assert len(await queue.dead_letters()) == 1
    assert await queue.missing([member]) == {member}
    assert await queue.length() == 0


async def test_prune_removes_only_idle_consumers_with_nothing_pending(ports: Ports) -> None:
    """A consumer holding a pending job is kept however idle; an empty one is removed."""
    queue = ports.queue
    await queue.enqueue([{"job": "x"}, {"job": "y"}], [jobs.member("b", "f")])
    await queue.read("holder", 1, 100)
    done = await queue.read("empty", 1, 100)
    await queue.ack([d.id for d in done], [])
    assert await queue.prune_consumers(0) == ["empty"]
    assert await queue.prune_consumers(0, "holder") == []
    consumers = await queue._redis.xinfo_consumers(queue.stream, queue.group)
    assert [c["name"] for c in consumers] == [b"holder"]


async def test_recovery_is_taken_once(ports: Ports) -> None:
    """After Redis lost the namespace, exactly one caller is told to recover."""
    assert [await ports.queue.take_recovery() for _ in range(3)] == [True, False, False]
    await ports.queue._redis.delete(ports.queue.intact)
    assert await ports.queue.take_recovery()
