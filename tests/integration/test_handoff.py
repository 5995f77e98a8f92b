"""Finalization hands a batch's webhook delivery to the replica's delivery actor, claimed."""

from __future__ import annotations

import json
from typing import Any

import anyio
import asyncpg

from reconciler import delivery
from reconciler.actors.delivery import DELIVERY_CONCURRENCY, Deliverer, lease_s
from reconciler.actors.finalizer import Finalizer, FinalizeRequest
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.database import Database, Row
from reconciler.errors import RetryableError
from reconciler.finalization import Handing, Outcome, Trigger, finalize_each
from tests.delivery_support import attempts_of, fast, settled, subscribe
from tests.helpers import DEFAULT_TIMEOUT_S, files, record, sql, submit, wait_for
from tests.receiver import always, receiving


async def _complete_batch(ports: Ports, count: int = 2) -> str:
    """A batch whose files have all succeeded, not finalized yet."""
    specs = files(count)
    batch = await submit(ports, specs)
    await record(ports, batch.batch_id, [spec.file_id for spec in specs])
    return batch.batch_id


async def test_one_webhook_delivery_per_batch_is_written_claimed_and_returned(
    settings: Settings, ports: Ports
) -> None:
    """Of three webhooks (one paused) the first ready one is handed over, claimed by the
    replica; the others are left due, and the NOTIFY counts only those."""
    urls = {
        await subscribe(ports, f"http://127.0.0.1:9/{name}", "whsec_" + name * 32): name
        for name in "ABC"
    }
    paused, *ready = sorted(urls, key=lambda webhook_id: urls[webhook_id] != "B")
    ready.sort()
    url = settings.database_url or ""
    pause = "UPDATE webhooks SET paused_until = now() + interval '1 hour' WHERE webhook_id = $1"
    await sql(url, pause, paused)
    batch_id = await _complete_batch(ports)
    notified: list[dict[str, int]] = []
    listener = await asyncpg.connect(url)
    await listener.add_listener(
        "reconciler_finalized", lambda *args: notified.append(json.loads(args[3]))
    )
    try:
        handing = Handing("r-1", 1, 30.0)
        (result,) = await finalize_each(ports.db, [batch_id], Trigger.EVENT, handing)
        await wait_for(lambda: _true(bool(notified)), what="the finalized NOTIFY")
    finally:
        await listener.close()
    assert result.outcome is Outcome.FINALIZED and result.handed is not None
    (claimed,) = delivery.handed(result.handed, batch_id, "r-1")
    assert (claimed.webhook_id, claimed.attempt, claimed.replica) == (ready[0], 1, "r-1")
    assert claimed.url == f"http://127.0.0.1:9/{urls[ready[0]]}"
    assert claimed.event.batch_id == batch_id and claimed.event.data["files_succeeded"] == 2
    rows = await sql(
        url,
        "SELECT webhook_id, attempts, claimed_by, next_attempt_at > now() + interval '20 s'"
        " FROM deliveries ORDER BY webhook_id",
    )
    by_webhook = {row[0]: tuple(row[1:]) for row in rows}
    assert by_webhook[ready[0]] == (1, "r-1", True)
    assert by_webhook[ready[1]] == (0, None, False)
    assert by_webhook[paused] == (0, None, False)
    assert notified[0]["deliveries"] == 2, "only the deliveries left due wake a claim"


async def test_without_handing_nothing_is_claimed(settings: Settings, ports: Ports) -> None:
    await subscribe(ports, "http://127.0.0.1:9/a", "whsec_" + "A" * 32)
    batch_id = await _complete_batch(ports)
    (result,) = await finalize_each(ports.db, [batch_id], Trigger.EVENT)
    assert result.outcome is Outcome.FINALIZED and result.handed is None
    rows = await sql(settings.database_url or "", "SELECT attempts, claimed_by FROM deliveries")
    assert [tuple(row) for row in rows] == [(0, None)]


async def test_a_handed_delivery_is_posted_without_a_claim_or_a_wake_up(
    settings: Settings, ports: Ports
) -> None:
    """The delivery actor polls once an hour and hears no NOTIFY here: only the handed
    delivery can reach the receiver. Reserved slots come back whatever was handed."""
    tuned = fast(settings, delivery_poll_interval_s=3600.0)
    deliverer = Deliverer(tuned, ports.db)
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        batch_ids = [await _complete_batch(ports) for _ in range(2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliverer.run)
            await wait_for(lambda: _true(deliverer.handing(0) is not None), what="running")
            assert deliverer.handing(DELIVERY_CONCURRENCY + 1) is None, "more than the slots"
            handing = deliverer.handing(2)
            assert handing is not None
            assert deliverer.handing(DELIVERY_CONCURRENCY - 1) is None, "two slots reserved"
            results = await finalize_each(ports.db, batch_ids[:1], Trigger.EVENT, handing)
            deliverer.take(handing, 2, results)  # one delivery handed, one slot unused
            await wait_for(lambda: settled(tuned, batch_ids[0], "delivered"), what="delivered")
            spare = deliverer.handing(DELIVERY_CONCURRENCY)
            assert spare is not None, "every slot free again once the attempt settled"
            deliverer.take(spare, DELIVERY_CONCURRENCY, [])
            tg.cancel_scope.cancel()
    assert [r.payload["data"]["batch_id"] for r in receiver.received] == batch_ids[:1]
    (attempt,) = await attempts_of(ports, batch_ids[0])
    assert (attempt["attempt"], attempt["status_code"], attempt["delivered"]) == (1, 200, True)


class LosesFirstReply(Database):
    """The real pool; the first `statement` that returns rows (or any, unless
    `only_with_rows`) commits, then its reply is lost."""

    def __init__(self, real: Database, statement: str, *, only_with_rows: bool = False) -> None:
        self.__dict__.update(vars(real))
        self.statement, self.only_with_rows = statement, only_with_rows
        self.lost = False

    async def fetch(self, name: str, *args: Any) -> list[Row]:
        rows = await super().fetch(name, *args)
        if name == self.statement and (rows or not self.only_with_rows) and not self.lost:
            self.lost = True
            raise RetryableError("postgres: ConnectionResetError: the reply was lost")
        return rows


async def test_a_reply_lost_after_the_commit_frees_the_delivery_for_a_claim(
    settings: Settings, ports: Ports
) -> None:
    """The finalizer never sees what it was handed: the slot comes back, and its retry,
    finding the batch finalized, frees the delivery; a claim delivers it once, long
    before its 30 s lease would have run out."""
    tuned = fast(settings)
    deliverer = Deliverer(tuned, ports.db)
    lossy = LosesFirstReply(ports.db, "finalize")
    send, receive = anyio.create_memory_object_stream[FinalizeRequest](4)
    assert lease_s(tuned) >= 30.0 > DEFAULT_TIMEOUT_S, "only a release delivers in time"
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        batch_id = await _complete_batch(ports)
        with send, receive:
            async with anyio.create_task_group() as tg:
                tg.start_soon(deliverer.run)
                await wait_for(lambda: _true(deliverer.handing(0) is not None), what="running")
                tg.start_soon(Finalizer(lossy, receive, handoff=deliverer).run)
                await send.send(FinalizeRequest((batch_id,)))
                await wait_for(lambda: settled(tuned, batch_id, "delivered"), what="delivered")
                assert lossy.lost
                spare = await wait_for(
                    lambda: _true_value(deliverer.handing(DELIVERY_CONCURRENCY)), what="slots back"
                )
                deliverer.take(spare, DELIVERY_CONCURRENCY, [])
                tg.cancel_scope.cancel()
    assert len(receiver.received) == 1
    (attempt,) = await attempts_of(ports, batch_id)
    assert (attempt["attempt"], attempt["delivered"]) == (2, True), "the claim's attempt"


async def test_a_claim_whose_reply_is_lost_frees_what_it_leased(
    settings: Settings, ports: Ports
) -> None:
    """A claim leased a due delivery, and its reply never came: the actor frees what that
    claim (and only it) leased, and the next claim delivers it once, long before the
    30 s lease would have run out."""
    tuned = fast(settings)
    lossy = LosesFirstReply(ports.db, "claim_deliveries", only_with_rows=True)
    deliverer = Deliverer(tuned, lossy)
    assert lease_s(tuned) >= 30.0 > DEFAULT_TIMEOUT_S, "only a release delivers in time"
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        batch_id = await _complete_batch(ports)
        await finalize_each(ports.db, [batch_id], Trigger.SWEEP)  # not handed: due now
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliverer.run)
            await wait_for(lambda: settled(tuned, batch_id, "delivered"), what="delivered")
            tg.cancel_scope.cancel()
    assert lossy.lost
    assert len(receiver.received) == 1
    (attempt,) = await attempts_of(ports, batch_id)
    assert (attempt["attempt"], attempt["delivered"]) == (2, True), "the next claim's attempt"


async def test_releasing_a_claim_frees_only_what_that_claim_leased(
    settings: Settings, ports: Ports
) -> None:
    """The rows carry the claim's id: another claim of the same replica, and a
    delivery handed to it, keep their leases."""
    url = settings.database_url or ""
    webhook_id = await subscribe(ports, "https://example.com/hook", "whsec_" + "A" * 32)
    first, second, handed = [await _complete_batch(ports) for _ in range(3)]
    await finalize_each(ports.db, [first], Trigger.SWEEP)
    [lost] = await delivery.claim(ports.db, "replica-a", 1, 30.0, with_hook=False, claim_id="a#1")
    await finalize_each(ports.db, [second], Trigger.SWEEP)
    await delivery.claim(ports.db, "replica-a", 1, 30.0, with_hook=False, claim_id="a#2")
    await finalize_each(ports.db, [handed], Trigger.EVENT, Handing("replica-a", 1, 30.0))
    assert lost.replica == "replica-a", "attempts are logged under the replica, not the claim"
    assert await delivery.release_claim(ports.db, "a#1") == 1
    rows = await sql(
        url,
        "SELECT e.batch_id, d.claimed_by, d.attempts, d.next_attempt_at <= now() AS due"
        " FROM deliveries d JOIN events e USING (event_id) WHERE d.webhook_id = $1",
        webhook_id,
    )
    assert sorted(tuple(r) for r in rows) == sorted(
        [(first, None, 1, True), (second, "a#2", 1, False), (handed, "replica-a", 1, False)]
    )


async def test_only_the_lost_replys_handed_deliveries_are_freed(
    settings: Settings, ports: Ports
) -> None:
    """The release names a replica and a first attempt: another replica's handed
    delivery, and one already claimed again (attempt 2), keep their leases."""
    url = settings.database_url or ""
    webhook_id = await subscribe(ports, "https://example.com/hook", "whsec_" + "A" * 32)
    mine, theirs, again = [await _complete_batch(ports) for _ in range(3)]
    hand = Handing("replica-a", 1, 30.0)
    await finalize_each(ports.db, [mine, again], Trigger.EVENT, hand)
    await finalize_each(ports.db, [theirs], Trigger.EVENT, Handing("replica-b", 1, 30.0))
    await sql(
        url,
        "UPDATE deliveries SET attempts = 2 FROM events e"
        " WHERE deliveries.event_id = e.event_id AND e.batch_id = $1",
        again,
    )
    released = await delivery.release_unanswered(ports.db, [mine, theirs, again], "replica-a")
    assert released == 1
    rows = await sql(
        url,
        "SELECT e.batch_id, d.claimed_by, d.next_attempt_at <= now() AS due"
        " FROM deliveries d JOIN events e USING (event_id) WHERE d.webhook_id = $1",
        webhook_id,
    )
    assert sorted(tuple(r) for r in rows) == sorted(
        [(mine, None, True), (theirs, "replica-b", False), (again, "replica-a", False)]
    )


async def _true_value(value: Handing | None) -> Handing | None:
    return value


async def _true(value: bool) -> bool:
    return value
