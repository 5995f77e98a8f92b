"""GET /api/batches/{id}/events and GET /api/events: real SSE over real HTTP.

The API runs alone (no worker): the tests record outcomes and finalize the way the
consumer and the finalizer do, so each event is caused by a known commit.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from reconciler.app import Ports, Role, open_ports
from reconciler.config import Settings
from reconciler.finalization import Outcome, finalize
from tests.api.served import assert_error, serving
from tests.api.sse import streaming
from tests.helpers import files, record, sql, submit, wait_for

PING_S = 0.2
OTHER_TX_BOUND_S = 5.0  # the safety-net re-read is 1 s


def quiet(settings: Settings) -> Settings:
    """Pings far apart, so they never stand between the events a test reads."""
    return replace(settings, events_ping_interval_s=60.0)


async def finished(ports: Ports, batch_id: str) -> None:
    assert (await finalize(ports.db, batch_id, "event")).outcome is Outcome.FINALIZED


async def test_progress_then_one_finalized_then_the_stream_ends(
    settings: Settings, ports: Ports
) -> None:
    """Each commit that finishes files sends a progress event; finalization ends it."""
    batch = await submit(ports, files(3))
    async with (
        serving(quiet(settings), ports, Role.API) as served,
        streaming(served.http, f"/api/batches/{batch.batch_id}/events") as stream,
    ):
        first = await stream.next_event()
        assert first is not None and (first.event, first.id) == ("progress", "0")
        await record(ports, batch.batch_id, ["f00000"])
        one = await stream.next_event()
        assert one is not None and (one.event, one.id) == ("progress", "1")
        assert one.data["files_succeeded"] == 1 and one.data["status"] == "processing"
        await record(ports, batch.batch_id, ["f00001", "f00002"], ok=False)
        three = await stream.next_event()
        assert three is not None and (three.id, three.data["files_failed"]) == ("3", 2)
        await finished(ports, batch.batch_id)
        final = await stream.next_event()
        assert final is not None and final.event == "finalized"
        assert final.id == final.data["event_id"] and str(final.id).startswith("evt_")
        assert final.data["data"]["status"] == "completed_with_errors"
        assert await stream.next() is None


async def test_last_event_id_resumes_without_a_gap_or_a_repeat(
    settings: Settings, ports: Ports
) -> None:
    """A resumed stream sends what changed since the id, never the event it names."""
    batch = await submit(ports, files(2))
    path = f"/api/batches/{batch.batch_id}/events"
    async with serving(quiet(settings), ports, Role.API) as served:
        await record(ports, batch.batch_id, ["f00000"])
        async with streaming(served.http, path) as stream:
            seen = await stream.next_event()
        assert seen is not None and seen.id == "1"
        async with streaming(served.http, path, last_event_id="1") as stream:
            await record(ports, batch.batch_id, ["f00001"])
            resumed = await stream.next_event()
        assert resumed is not None and (resumed.event, resumed.id) == ("progress", "2")
        await finished(ports, batch.batch_id)
        async with streaming(served.http, path, last_event_id="2") as stream:
            final = await stream.next_event()
            assert final is not None and final.event == "finalized"
            assert await stream.next() is None
        over = await served.http.get(path, headers={"Last-Event-ID": final.id or ""})
    assert over.status_code == 204


async def test_an_idle_stream_gets_pings(settings: Settings, ports: Ports) -> None:
    """With nothing to say, the stream sends `: ping` comments at the ping interval."""
    batch = await submit(ports, files(1))
    pinging = replace(settings, events_ping_interval_s=PING_S)
    async with (
        serving(pinging, ports, Role.API) as served,
        streaming(served.http, f"/api/batches/{batch.batch_id}/events") as stream,
    ):
        first = await stream.next()
        assert first is not None and first.event == "progress"
        pings = [await stream.next(timeout_s=5.0) for _ in range(2)]
    assert [p.comment if p else None for p in pings] == ["ping", "ping"]


async def test_an_unknown_batch_is_404_not_a_stream(settings: Settings, ports: Ports) -> None:
    """Asking for the events of a batch that does not exist answers a JSON 404."""
    async with serving(settings, ports, Role.API) as served:
        answer = await served.http.get("/api/batches/nope/events")
    assert_error(answer, 404)


async def test_the_stream_survives_a_postgres_reconnect(settings: Settings, ports: Ports) -> None:
    """Killing the listening backend: the listener reconnects and later events arrive."""
    batch = await submit(ports, files(2))
    notifications = ports.notifications
    async with (
        serving(quiet(settings), ports, Role.API) as served,
        streaming(served.http, f"/api/batches/{batch.batch_id}/events") as stream,
    ):
        await wait_for(lambda: _true(notifications.live), what="listening")
        assert (await stream.next_event()) is not None
        old_pid = notifications.backend_pid
        await sql(settings.database_url or "", "SELECT pg_terminate_backend($1)", old_pid)
        await wait_for(
            lambda: _true(notifications.live and notifications.backend_pid != old_pid),
            what="a new listening connection",
        )
        await record(ports, batch.batch_id, ["f00000"])
        after = await stream.next_event()
        assert after is not None and after.id == "1"
        await record(ports, batch.batch_id, ["f00001"])
        await finished(ports, batch.batch_id)
        events = []
        while (event := await stream.next_event()) is not None:
            events.append((event.event, event.id))
    # A progress event the finalization overtook is folded into `finalized`, which
    # ends the stream: either way nothing is repeated and the last word is `finalized`.
    assert events[-1][0] == "finalized" and events[:-1] in ([], [("progress", "2")]), events


async def _true(value: bool) -> bool:
    return value


async def test_all_events_streams_finalized_and_resumes_after_an_id(
    settings: Settings, ports: Ports
) -> None:
    """/api/events sends every batch's finalized event once, in order, from an id."""
    first = await submit(ports, files(1, prefix="a"))
    second = await submit(ports, files(1, prefix="b"))
    pinging = replace(settings, events_ping_interval_s=PING_S)
    async with serving(pinging, ports, Role.API) as served:
        async with streaming(served.http, "/api/events?progress=1") as stream:
            await record(ports, first.batch_id, ["a00000"])
            moved = await stream.next_event()
            assert moved is not None and moved.event == "progress" and moved.id is None
            await finished(ports, first.batch_id)
            one = await stream.next_event()
            assert one is not None and one.event == "finalized"
            assert one.data["data"]["batch_id"] == first.batch_id
        await record(ports, second.batch_id, ["b00000"])
        await finished(ports, second.batch_id)
        async with streaming(served.http, "/api/events", one.id) as stream:
            two = await stream.next_event()
            assert two is not None and two.data["data"]["batch_id"] == second.batch_id
            after = await stream.next(timeout_s=5.0)
    assert after is not None and after.comment == "ping"  # and not `one` again


async def test_a_transaction_open_in_another_database_does_not_hold_events_back(
    settings: Settings, ports: Ports
) -> None:
    """/api/events streams a finalization while a transaction with an id stays open in
    another database of the cluster: that one cannot write this outbox.
    """
    elsewhere = await asyncpg.connect(
        urlunsplit(urlsplit(settings.database_url or "")._replace(path="/postgres"))
    )
    held = elsewhere.transaction()
    await held.start()
    try:
        await elsewhere.fetchval("SELECT pg_current_xact_id()")  # it now has an xid
        batch = await submit(ports, files(1))
        async with (
            serving(quiet(settings), ports, Role.API) as served,
            streaming(served.http, "/api/events") as stream,
        ):
            await record(ports, batch.batch_id, ["f00000"])
            await finished(ports, batch.batch_id)
            event = await stream.next_event(timeout_s=OTHER_TX_BOUND_S)
    finally:
        await held.rollback()
        await elsewhere.close()
    assert event is not None and event.event == "finalized"
    assert event.data["data"]["batch_id"] == batch.batch_id


async def test_without_listen_both_streams_fall_back_to_polling(settings: Settings) -> None:
    """Ports opened without LISTEN (as behind PgBouncer in transaction mode): nothing
    wakes the streams, which still send progress and `finalized` by re-reading.
    """
    async with open_ports(settings) as ports:
        assert not ports.notifications.live
        batch = await submit(ports, files(1))
        async with (
            serving(quiet(settings), ports, Role.API) as served,
            streaming(served.http, f"/api/batches/{batch.batch_id}/events") as one,
            streaming(served.http, "/api/events") as every,
        ):
            first = await one.next_event()
            assert first is not None and (first.event, first.id) == ("progress", "0")
            await record(ports, batch.batch_id, ["f00000"])
            moved = await one.next_event()
            assert moved is not None and (moved.event, moved.id) == ("progress", "1")
            await finished(ports, batch.batch_id)
            final = await one.next_event()
            announced = await every.next_event()
    assert final is not None and final.event == "finalized"
    assert announced is not None and announced.id == final.id
