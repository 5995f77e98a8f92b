"""Helpers for the delivery tests: fast delivery settings, subscriptions, states, metrics."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prometheus_client import REGISTRY

from reconciler import delivery, webhooks
from reconciler.app import Ports
from reconciler.config import Settings
from tests.helpers import sql


def fast(settings: Settings, **overrides: Any) -> Settings:
    """Settings whose retry schedule runs in well under a second."""
    quick: dict[str, Any] = {
        "delivery_backoff_s": 0.05,
        "delivery_poll_interval_s": 0.05,
        "delivery_timeout_s": 2.0,
        "delivery_max_age_s": 60.0,
    }
    return replace(settings, **{**quick, **overrides})


async def subscribe(ports: Ports, url: str, secret: str) -> str:
    created = await webhooks.create(ports.db, url, secret=secret)
    return str(created["webhook_id"])


async def states(settings: Settings, batch_id: str) -> list[str]:
    """The state of each delivery of the batch's events."""
    rows = await sql(
        settings.database_url or "",
        "SELECT d.state FROM deliveries d JOIN events e USING (event_id)"
        " WHERE e.batch_id = $1 ORDER BY d.delivery_id",
        batch_id,
    )
    return [row[0] for row in rows]


async def settled(settings: Settings, batch_id: str, state: str) -> bool:
    found = await states(settings, batch_id)
    return bool(found) and all(s == state for s in found)


async def all_settled(settings: Settings, state: str, count: int) -> bool:
    rows = await sql(
        settings.database_url or "", "SELECT count(*) FROM deliveries WHERE state = $1", state
    )
    return int(rows[0][0]) == count


async def attempts_of(ports: Ports, batch_id: str) -> list[dict[str, Any]]:
    found = await delivery.of_batch(ports.db, batch_id)
    attempts: list[dict[str, Any]] = found["attempts"]
    return attempts


def deliveries_total(sink: str, outcome: str) -> float:
    labels = {"sink": sink, "outcome": outcome}
    return REGISTRY.get_sample_value("reconciler_deliveries_total", labels) or 0.0


async def hook_registered(settings: Settings) -> bool:
    rows = await sql(settings.database_url or "", "SELECT count(*) FROM hook_registrations")
    return int(rows[0][0]) == 1
