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


async def test_an_attempt_written_twice_counts_once(settings: Settings, ports: Ports) -> None:
    """`record_starts` run again (a lost reply) writes the same attempt, not another."""
    submitted = await submit(ports, files(1))
    for _ in range(2):
        await start_as(ports, settings, "w1", submitted.batch_id, "f00000", attempt=1)
    assert await _attempts(settings, "f00000") == ("processing", 1)


async def test_a_live_lease_holds_off_another_worker(settings: Settings, ports: Ports) -> None:
    """A second worker's check sees the file held; its own worker's check does not."""
    submitted = await submit(ports, files(1))
    await start_as(ports, settings, "w1", submitted.batch_id, "f00000")
    for worker, held in (("w2", True), ("w1", False)):
        args = ([submitted.batch_id], ["f00000"], worker)
        [row] = await ports.db.fetch("peek_files", *args)
        assert (row["known"], row["attempts"], row["held"]) == (True, 1, held)


async def test_release_gives_back_only_attempts_cut_short(settings: Settings, ports: Ports) -> None:
    """A stop returns every file to pending; only an attempt it interrupted is given back."""
    submitted = await submit(ports, files(2))
    for file_id in ("f00000", "f00001"):
        await start_as(ports, settings, "w1", submitted.batch_id, file_id, attempt=2)
    await ports.db.execute("release_leases", "w1", [submitted.batch_id], ["f00000"], [2])
    assert await _attempts(settings, "f00000") == ("pending", 1)
    assert await _attempts(settings, "f00001") == ("pending", 2)


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
