"""Webhook deliveries from the outbox to a real receiver, the service running in-process."""

from __future__ import annotations

import pytest

from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.delivery_support import (
    all_settled,
    attempts_of,
    deliveries_total,
    fast,
    settled,
    states,
    subscribe,
)
from tests.helpers import files, running, sql, submit, summary_of, wait_for
from tests.receiver import Answer, always, receiving, refused_url


async def test_every_finalized_batch_is_delivered_signed_and_once(
    settings: Settings, ports: Ports
) -> None:
    """Each finalized batch reaches the receiver once, signed, with its run summary as data."""
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        async with running(fast(settings), ports, Role.WORKER):
            with_files = await submit(ports, files(3, {"sleep_s": 0.01}))
            empty = [await submit(ports, []) for _ in range(4)]
            await wait_for(lambda: all_settled(settings, "delivered", 5), what="5 delivered")
        summary = await summary_of(ports, with_files.batch_id)
    assert receiver.rejected == []
    assert sorted(receiver.acknowledged.values()) == [1] * 5, "each event id accepted once"
    assert len(receiver.ids()) == 5, "no retry of an acknowledged event"
    by_batch = {r.payload["data"]["batch_id"]: r.payload for r in receiver.received}
    assert set(by_batch) == {with_files.batch_id, *(b.batch_id for b in empty)}
    payload = by_batch[with_files.batch_id]
    assert payload["type"] == "batch.finalized"
    assert summary is not None and payload["timestamp"] == summary["completed_at"]
    assert payload["data"]["files_succeeded"] == 3 and payload["data"]["totals"]["attempt"] == 3


async def test_503_three_times_then_200_is_delivered_on_the_fourth_attempt(
    settings: Settings, ports: Ports
) -> None:
    """A receiver failing three times is retried and acknowledges the fourth attempt."""
    with receiving(lambda n: Answer(503 if n <= 3 else 200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        async with running(fast(settings), ports, Role.WORKER):
            batch = await submit(ports, [])
            await wait_for(lambda: settled(settings, batch.batch_id, "delivered"), what="sent")
    log = await attempts_of(ports, batch.batch_id)
    assert [(a["attempt"], a["status_code"], a["delivered"]) for a in log] == [
        (1, 503, False),
        (2, 503, False),
        (3, 503, False),
        (4, 200, True),
    ]
    assert len(set(receiver.ids())) == 1, "the same webhook-id on every retry"
    assert receiver.acknowledged == {receiver.ids()[0]: 1}


@pytest.mark.parametrize("failure", ["timeout", "refused", "redirect"])
async def test_a_receiver_that_never_acknowledges_ends_dead(
    settings: Settings, ports: Ports, failure: str
) -> None:
    """Timeouts, refused connections and redirects are retried, then dead at the max age."""
    script = (lambda _: Answer(hold=True)) if failure == "timeout" else always(200)
    if failure == "redirect":
        script = lambda _: Answer(302, {"location": "/elsewhere"})  # noqa: E731
    # The max age leaves room for three 0.3 s attempts even when the first one starts
    # late on a loaded host (1.2 s allowed only two when it started 0.5 s late).
    tuned = fast(settings, delivery_timeout_s=0.3, delivery_max_age_s=2.0)
    dead_before = deliveries_total("webhook", "dead")
    with receiving(script) as receiver:
        url = refused_url() if failure == "refused" else receiver.url
        await subscribe(ports, url, receiver.secret)
        async with running(tuned, ports, Role.WORKER):
            batch = await submit(ports, [])
            await wait_for(lambda: settled(settings, batch.batch_id, "dead"), what="dead")
    log = await attempts_of(ports, batch.batch_id)
    assert len(log) >= 3, "retried before giving up"
    assert [a["outcome"] for a in log] == ["failed"] * (len(log) - 1) + ["dead"]
    assert not any(a["delivered"] for a in log)
    expected = {"timeout": "timed out", "refused": "Connect", "redirect": "redirects"}[failure]
    assert all(expected in (a["error"] or "") for a in log), log
    assert deliveries_total("webhook", "dead") == dead_before + 1
    assert all(r.path == "/hooks/finalized" for r in receiver.received), "no redirect followed"


async def test_410_disables_the_subscription(settings: Settings, ports: Ports) -> None:
    """A 410 answer disables the webhook: its deliveries stop and new batches skip it."""
    with receiving(always(410)) as receiver:
        webhook_id = await subscribe(ports, receiver.url, receiver.secret)
        async with running(fast(settings), ports, Role.WORKER):
            first = await submit(ports, [])
            await wait_for(lambda: settled(settings, first.batch_id, "cancelled"), what="gone")
            later = await submit(ports, [])
    assert len(receiver.ids()) == 1
    assert await states(settings, later.batch_id) == []
    rows = await sql(
        settings.database_url or "",
        "SELECT disabled_at IS NOT NULL FROM webhooks WHERE webhook_id = $1",
        webhook_id,
    )
    assert rows[0][0] is True


async def test_429_with_retry_after_holds_the_webhook(settings: Settings, ports: Ports) -> None:
    """A 429 with Retry-After pauses the webhook and schedules the retry no sooner."""
    with receiving(lambda _: Answer(429, {"retry-after": "120"})) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        async with running(fast(settings, delivery_max_age_s=3600), ports, Role.WORKER):
            batch = await submit(ports, [])
            await wait_for(lambda: attempts_of(ports, batch.batch_id), what="first attempt")
    rows = await sql(
        settings.database_url or "",
        "SELECT extract(epoch FROM d.next_attempt_at - now()),"
        " extract(epoch FROM w.paused_until - now())"
        " FROM deliveries d JOIN webhooks w USING (webhook_id)",
    )
    next_in_s, paused_for_s = (float(v) for v in rows[0])
    assert 110 < next_in_s <= 180 and 110 < paused_for_s <= 180
    assert len(receiver.ids()) == 1


async def test_two_replicas_never_deliver_an_event_twice(settings: Settings, ports: Ports) -> None:
    """Two replicas polling the same outbox deliver each event once between them."""
    with receiving(always(200)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        tuned = fast(settings, delivery_poll_interval_s=0.01)
        async with running(tuned, ports, Role.WORKER), running(tuned, ports, Role.SWEEPER):
            batches = [await submit(ports, []) for _ in range(40)]
            await wait_for(lambda: all_settled(settings, "delivered", 40), what="40 delivered")
    assert len(receiver.ids()) == 40 == len(set(receiver.ids()))
    replicas = await sql(
        settings.database_url or "", "SELECT DISTINCT replica FROM delivery_attempts"
    )
    assert len(replicas) == 2, "both replicas took part"
    assert {r.payload["data"]["batch_id"] for r in receiver.received} == {
        b.batch_id for b in batches
    }


async def test_a_stop_mid_attempt_gives_the_lease_back(settings: Settings, ports: Ports) -> None:
    """Stopping while a receiver holds the request makes the delivery due again at once."""
    with receiving(lambda _: Answer(hold=True)) as receiver:
        await subscribe(ports, receiver.url, receiver.secret)
        async with running(fast(settings, delivery_timeout_s=30), ports, Role.WORKER):
            batch = await submit(ports, [])
            await wait_for(lambda: _any(receiver.ids()), what="the attempt under way")
    rows = await sql(
        settings.database_url or "",
        "SELECT next_attempt_at <= now(), claimed_by, attempts, state FROM deliveries",
    )
    assert [tuple(r) for r in rows] == [(True, None, 1, "pending")]
    assert await attempts_of(ports, batch.batch_id) == [], "no outcome for a cut attempt"


async def _any(ids: list[str]) -> bool:
    return bool(ids)
