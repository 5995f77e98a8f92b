"""The outbox: finalization writes its event and deliveries in the same statement."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from reconciler import webhooks
from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.errors import ReconcilerError
from reconciler.finalization import Outcome, finalize
from tests.helpers import files, record, sql, submit, summary_of

REFUSE_EVENTS = (
    "CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RAISE EXCEPTION 'no events today'; END $$",
    "CREATE TRIGGER refuse_event BEFORE INSERT ON events"
    " FOR EACH ROW EXECUTE FUNCTION refuse_event()",
)


async def _events(settings: Settings, batch_id: str) -> list[dict[str, object]]:
    rows = await sql(
        settings.database_url or "",
        "SELECT event_id, type, data, created_at FROM events WHERE batch_id = $1",
        batch_id,
    )
    return [dict(row) for row in rows]


async def test_finalization_writes_one_event_with_the_summary(
    settings: Settings, ports: Ports
) -> None:
    """A finalized batch has exactly one batch.finalized event whose data is its summary."""
    batch = await submit(ports, files(2))
    await record(ports, batch.batch_id, ["f00000", "f00001"])
    assert (await finalize(ports.db, batch.batch_id, "event")).outcome is Outcome.FINALIZED
    await finalize(ports.db, batch.batch_id, "sweep")
    summary = await summary_of(ports, batch.batch_id)
    [event] = await _events(settings, batch.batch_id)
    assert summary is not None and str(event["event_id"]).startswith("evt_")
    assert event["type"] == "batch.finalized"
    assert event["created_at"] == dt.datetime.fromisoformat(summary["completed_at"])
    data = json.loads(str(event["data"]))
    assert {k: data[k] for k in ("batch_id", "status", "files_succeeded", "errors")} == {
        k: summary[k] for k in ("batch_id", "status", "files_succeeded", "errors")
    }


async def test_a_failed_event_write_leaves_the_batch_unfinalized(
    settings: Settings, ports: Ports
) -> None:
    """If the event cannot be written, the finalization rolls back with it, and retries."""
    for statement in REFUSE_EVENTS:
        await sql(settings.database_url or "", statement)
    batch = await submit(ports, files(1))
    await record(ports, batch.batch_id, ["f00000"])
    with pytest.raises(ReconcilerError, match="no events today"):
        await finalize(ports.db, batch.batch_id, "event")
    assert await summary_of(ports, batch.batch_id) is None
    await sql(settings.database_url or "", "DROP TRIGGER refuse_event ON events")
    assert (await finalize(ports.db, batch.batch_id, "sweep")).outcome is Outcome.FINALIZED
    assert len(await _events(settings, batch.batch_id)) == 1


async def test_an_event_fans_out_to_the_webhooks_subscribed_when_it_was_written(
    settings: Settings, ports: Ports
) -> None:
    """Enabled webhooks at finalization get a delivery; later or disabled ones do not."""
    url = "http://127.0.0.1:9/hook"
    kept = await webhooks.create(ports.db, url)
    off = await webhooks.create(ports.db, url)
    await sql(
        settings.database_url or "",
        "UPDATE webhooks SET disabled_at = now() WHERE webhook_id = $1",
        off["webhook_id"],
    )
    batch = await submit(ports, [])
    await webhooks.create(ports.db, url)
    rows = await sql(
        settings.database_url or "",
        "SELECT d.webhook_id, d.state FROM deliveries d JOIN events e USING (event_id)"
        " WHERE e.batch_id = $1",
        batch.batch_id,
    )
    assert [tuple(r) for r in rows] == [(kept["webhook_id"], "pending")]
