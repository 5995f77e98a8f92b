"""The outbox of finalized-batch events: claiming due deliveries, settling attempts.

Finalization writes each event with one delivery row per sink (every webhook subscribed
at that moment, and the Python hook once registered). Any replica claims due rows under
a lease, makes the attempts, and settles each one: delivered, due again on the retry
schedule, or dead once the event is older than the max age. Every attempt leaves a log
row; the retry schedule is decided here and nowhere else.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import structlog

from reconciler import metrics
from reconciler.batches import progress
from reconciler.database import Database, Row, Session

log = structlog.get_logger("reconciler.delivery")

FINALIZED_TYPE: Final = "batch.finalized"
RETRY_MAX_DELAY_S: Final = 3600.0
THROTTLED_FACTOR: Final = 2.0  # a 429 without Retry-After waits twice the usual delay


class Sink(enum.StrEnum):
    WEBHOOK = "webhook"
    HOOK = "hook"


class Outcome(enum.StrEnum):
    """What one attempt came to: each attempt is counted under exactly one."""

    DELIVERED = "delivered"
    FAILED = "failed"  # due again later (or, after a 410, cancelled)
    DEAD = "dead"  # failed at or past the max age: no more attempts to this sink


@dataclass(frozen=True, slots=True)
class Event:
    """What a sink is told: the webhook body, and the argument of the Python hook."""

    event_id: str
    type: str
    batch_id: str
    timestamp: str
    data: dict[str, Any]

    def body(self) -> bytes:
        """The exact bytes posted and signed: the Standard Webhooks payload, compact
        JSON with sorted keys (orjson: a tenth of the standard library's time)."""
        payload = {"type": self.type, "timestamp": self.timestamp, "data": self.data}
        try:
            return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # an integer past 64 bits, which orjson refuses
            text = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
            return text.encode()


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this replica holds the lease of, with what its attempt needs."""

    delivery_id: int
    sink: Sink
    attempt: int
    event: Event
    replica: str
    webhook_id: str | None = None
    url: str | None = None
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What came of posting to a webhook or calling the hook once."""

    delivered: bool
    latency_s: float
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    gone: bool = False  # 410: the receiver wants no more
    throttled: bool = False  # 429: slow down


@dataclass(frozen=True, slots=True)
class Schedule:
    """When failed deliveries are tried again, and when they are given up."""

    backoff_s: float
    max_age_s: float
    rng: Callable[[], float] = random.random

    def delay_s(self, attempt: int) -> float:
        """Exponential with jitter: base * 2^(n-1) after failed attempt n, plus up to half."""
        ceiling = min(RETRY_MAX_DELAY_S, self.backoff_s * 2 ** min(attempt - 1, 32))
        return float(ceiling * (1 + self.rng() / 2))

    def after(self, attempt: Attempt, number: int) -> float:
        """The wait before the next attempt: a Retry-After is honoured, a 429 slows down."""
        delay = self.delay_s(number) * (THROTTLED_FACTOR if attempt.throttled else 1.0)
        if attempt.retry_after_s is not None:
            delay = max(delay, attempt.retry_after_s)
        return delay


async def register_hook(db: Database, target: str) -> None:
    """Fans every later finalization out to the Python hook too."""
    await db.execute("register_hook", target)
    log.info("hook_registered", hook=target)


async def claim(
    db: Database,
    owner: str,
    limit: int,
    lease_s: float,
    *,
    with_hook: bool,
    claim_id: str | None = None,
) -> list[Claimed]:
    """Up to `limit` due deliveries, leased to `owner` for `lease_s` seconds; the rows
    carry `claim_id` (default: the owner), so a claim whose reply is lost can be undone
    by `release_claim` without touching anything else the owner holds."""
    rows = await db.fetch("claim_deliveries", claim_id or owner, limit, lease_s, with_hook)
    return [_claimed(row, owner) for row in rows]


async def release_claim(db: Database, claim_id: str) -> int:
    """Frees what a claim whose reply never came leased (claimed, attempt counted, none
    made): due again at once, for any replica, instead of when the lease runs out."""
    return len(await db.fetch("release_claim", claim_id))


def handed(row: Row, batch_id: str, replica: str) -> list[Claimed]:
    """The deliveries a finalization wrote already claimed by `replica` (its `handed`
    row, schema/0011_finalize_hands_off.sql, kept by 0013): first attempts, as a claim
    would return."""
    created_at = row["event_created_at"].isoformat()
    event = Event(row["event_id"], FINALIZED_TYPE, batch_id, created_at, row["event_data"])
    return [
        Claimed(d["delivery_id"], Sink.WEBHOOK, 1, event, replica, **_webhook(d))
        for d in row["handed"]
    ]


def _claimed(row: Row, replica: str) -> Claimed:
    event = Event(
        row["event_id"], row["type"], row["batch_id"], row["created_at"].isoformat(), row["data"]
    )
    number = row["attempt"]
    return Claimed(row["delivery_id"], Sink(row["sink"]), number, event, replica, **_webhook(row))


def _webhook(found: Row) -> dict[str, Any]:
    """The webhook an attempt posts to (None for the hook), and its secret."""
    return {key: found[key] for key in ("webhook_id", "url", "secret")}


async def release(db: Database, claimed: Claimed) -> None:
    """Gives the lease back after a stop cut the attempt short."""
    await db.execute("release_delivery", claimed.delivery_id, claimed.attempt)


async def release_unanswered(db: Database, batch_ids: Sequence[str], replica: str) -> int:
    """Frees what a finalization whose reply was lost handed to `replica`; how many."""
    return len(await db.fetch("release_unanswered", list(batch_ids), replica))


async def settle_failed(
    db: Database, claimed: Claimed, attempt: Attempt, schedule: Schedule
) -> Outcome:
    """Records a failed attempt and moves the delivery on: due again, or dead (delivered
    attempts go through `settle_delivered`)."""
    async with db.transaction() as tx:
        outcome = await _move(tx, claimed, attempt, schedule)
        logged = (
            outcome.value,
            attempt.status_code,
            attempt.error,
            attempt.latency_s,
            claimed.replica,
        )
        await tx.execute("log_attempt", claimed.delivery_id, claimed.attempt, *logged)
    _observe(claimed, attempt, outcome, None)
    return outcome


async def settle_delivered(
    db: Database, answered: Sequence[tuple[Claimed, Attempt]], ago_s: Sequence[float]
) -> None:
    """Records delivered attempts, any number in one statement (the common case); each
    2xx came `ago_s` seconds before, which is when the delivery is recorded as made."""
    columns = (
        [claimed.delivery_id for claimed, _ in answered],
        [claimed.attempt for claimed, _ in answered],
        [attempt.status_code for _, attempt in answered],
        [attempt.latency_s for _, attempt in answered],
        [claimed.replica for claimed, _ in answered],
        list(ago_s),
    )
    rows = await db.fetch("deliveries_delivered", *columns)
    ages = {row["delivery_id"]: float(row["age_s"]) for row in rows}
    for claimed, attempt in answered:
        _observe(claimed, attempt, Outcome.DELIVERED, ages.get(claimed.delivery_id))


async def _move(tx: Session, claimed: Claimed, attempt: Attempt, schedule: Schedule) -> Outcome:
    if attempt.gone and claimed.webhook_id is not None:
        await tx.execute("disable_webhook", claimed.webhook_id)
        return Outcome.FAILED
    delay_s = schedule.after(attempt, claimed.attempt)
    if claimed.webhook_id is not None and (attempt.throttled or attempt.retry_after_s):
        await tx.execute("pause_webhook", claimed.webhook_id, delay_s)
    state = await tx.fetchval(
        "delivery_failed", claimed.delivery_id, claimed.attempt, delay_s, schedule.max_age_s
    )
    return Outcome.DEAD if state == "dead" else Outcome.FAILED


def _observe(claimed: Claimed, attempt: Attempt, outcome: Outcome, age_s: float | None) -> None:
    metrics.DELIVERIES.labels(claimed.sink.value, outcome.value).inc()
    if age_s is not None:
        metrics.DELIVERY_LATENCY.labels(claimed.sink.value).observe(age_s)
    # Never the URL (it may carry a token) nor the secret: the webhook's id says which.
    fields = {
        "event_id": claimed.event.event_id,
        "batch_id": claimed.event.batch_id,
        "sink": claimed.sink.value,
        "webhook_id": claimed.webhook_id,
        "attempt": claimed.attempt,
        "outcome": outcome.value,
        "status_code": attempt.status_code,
        "error": attempt.error,
        "latency_ms": round(attempt.latency_s * 1000, 3),
    }
    if outcome is Outcome.DEAD:
        log.error("delivery_dead", **fields)
    elif attempt.gone:
        log.warning("webhook_disabled", **fields)
    else:
        log.info("delivery_attempted", **fields)


async def of_batch(db: Database, batch_id: str) -> dict[str, Any]:
    """Every attempt to deliver the batch's events, and where each delivery stands."""
    await progress(db, batch_id)  # BatchNotFound for an unknown id
    attempts = await db.fetch("batch_delivery_attempts", batch_id)
    deliveries = await db.fetch("batch_deliveries", batch_id)
    return {
        "batch_id": batch_id,
        "attempts": [_jsonable(row) for row in attempts],
        "deliveries": [_jsonable(row) for row in deliveries],
    }


def _jsonable(row: Row) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}
