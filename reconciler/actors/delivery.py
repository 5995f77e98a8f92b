"""The delivery actor: takes due events from the outbox and hands them to their sinks.

Every replica that runs the worker or the sweeper runs one. It claims due deliveries
under a lease (so no two replicas attempt the same one at once), makes a few attempts
at a time, and settles each: a failure through `delivery.settle_failed`, a 2xx in a
group (`Settler`: one statement records every 2xx of a short window). A replica that
dies mid-attempt leaves its lease to run out, and another tries again.

The replica's finalizer hands it deliveries too: with a slot reserved per batch
(`handing`), the finalizing statement writes a batch's webhook delivery already claimed
by this replica and returns it, and `take` starts its attempt: no claim statement, no
wait for the NOTIFY. Those go through the same attempt and settling as claimed ones.
When the statement's reply is lost after its commit, the finalizer's retry finds the
batches finalized and `release_unanswered` frees their deliveries for a claim.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskGroup

from reconciler import delivery
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.delivery import Attempt, Claimed, Schedule, Sink
from reconciler.errors import RetryableError
from reconciler.finalization import FinalizeResult, Handing
from reconciler.notifications import Kind, Notifications, Watch
from reconciler.retry import persist
from reconciler.sinks import HookCaller, WebhookSender, http_client, load_hook

log = structlog.get_logger("reconciler.delivery")

DELIVERY_CONCURRENCY: Final = 16
# A lease outlives the attempt it covers: only a dead replica's lease runs out.
LEASE_MIN_S: Final = 30.0
LEASE_TIMEOUTS: Final = 3
RELEASE_TIMEOUT_S: Final = 2.0
# After a wake-up the claim waits this long, so finalizations close together share it.
CLAIM_WINDOW_S: Final = 0.01
# Delivered attempts settled together: the first of a group waits this long for others,
# and a group holds at most SETTLE_GROUP_MAX. An attempt frees its slot at its 2xx, so
# the window holds back only the bookkeeping (the 2xx's moment is what is recorded).
SETTLE_WINDOW_S: Final = 0.1
SETTLE_GROUP_MAX: Final = 64
# Webhook deliveries a finalization hands over per batch; more webhooks go by the claim.
HAND_PER_BATCH: Final = 1


def lease_s(settings: Settings) -> float:
    return max(LEASE_MIN_S, LEASE_TIMEOUTS * settings.delivery_timeout_s)


class Deliverer:
    name = "delivery"

    def __init__(
        self, settings: Settings, db: Database, notifications: Notifications | None = None
    ) -> None:
        self._settings = settings
        self._db = db
        self._notifications = notifications or Notifications()
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._claims = 0  # numbers each claim: its rows carry `{owner}#{number}`
        self._schedule = Schedule(settings.delivery_backoff_s, settings.delivery_max_age_s)
        hook = load_hook(settings.on_finalized) if settings.on_finalized else None
        self._hook = HookCaller(hook, settings.delivery_timeout_s) if hook else None
        self._busy = 0  # attempts running, and slots reserved for handed deliveries
        self._wakeup = Watch()  # replaced by the notifications' watch while running
        self._settler = Settler(db, SETTLE_WINDOW_S, SETTLE_GROUP_MAX)
        self._running: tuple[TaskGroup, WebhookSender] | None = None

    async def run(self) -> None:
        if self._settings.on_finalized:
            await delivery.register_hook(self._db, self._settings.on_finalized)
        async with http_client() as http:
            sender = WebhookSender(http, self._settings.delivery_timeout_s)
            # Watching before the first claim: a finalization from then on wakes us.
            # Only a finalization that fanned out to a sink can have made something due.
            due = self._notifications.watch(kinds=(Kind.FINALIZED,), accept=_fanned_out)
            with due as self._wakeup:
                async with anyio.create_task_group() as tg:
                    self._running = tg, sender
                    try:
                        while True:
                            if not await self._start_due(tg, sender):
                                await self._idle()
                    finally:
                        self._running = None

    def handing(self, batches: int) -> Handing | None:
        """Reserves the slots for what finalizing `batches` here may hand over; None when
        they are not free or the actor is not running (their deliveries go by the claim).
        Every reservation ends in `take`."""
        wanted = batches * HAND_PER_BATCH
        if self._running is None or DELIVERY_CONCURRENCY - self._busy < wanted:
            return None
        self._busy += wanted
        return Handing(self._owner, HAND_PER_BATCH, lease_s(self._settings))

    def take(self, handing: Handing, batches: int, results: Sequence[FinalizeResult]) -> None:
        """Starts an attempt for each delivery the finalization handed over and frees the
        slots it did not use. Stopped meanwhile, it starts none: their leases run out."""
        reserved = batches * handing.per_batch
        if self._running is None:
            self._free(reserved)
            return
        tg, sender = self._running
        claimed = [
            item
            for result in results
            if result.handed is not None
            for item in delivery.handed(result.handed, result.batch_id, handing.replica)
        ]
        for item in claimed:
            tg.start_soon(self._attempt, item, sender)
        self._free(reserved - len(claimed))

    async def release_unanswered(self, batch_ids: Sequence[str]) -> None:
        """The finalization that may have handed these batches' deliveries here lost its
        reply, and a retry found them finalized: nothing here attempts those deliveries,
        so they are freed for a claim now rather than when their lease runs out. If that
        fails, the lease still runs out."""
        await self._freed(partial(delivery.release_unanswered, self._db, batch_ids, self._owner))

    async def _start_due(self, tg: TaskGroup, sender: WebhookSender) -> bool:
        """Claims as many due deliveries as there are free slots and starts them; True
        when they filled every free slot (more may be due: claim again at once).
        """
        free = DELIVERY_CONCURRENCY - self._busy
        if free <= 0:
            return False
        self._claims += 1
        claim_id = f"{self._owner}#{self._claims}"
        try:
            claimed = await delivery.claim(
                self._db,
                self._owner,
                free,
                lease_s(self._settings),
                with_hook=bool(self._hook),
                claim_id=claim_id,
            )
        except RetryableError as exc:
            log.warning("delivery_claim_failed", error=str(exc))
            # Its reply may have been lost after the commit: what it leased is freed.
            await self._freed(partial(delivery.release_claim, self._db, claim_id))
            return False
        for item in claimed:
            self._busy += 1
            tg.start_soon(self._attempt, item, sender)
        return len(claimed) == free

    async def _freed(self, release: Callable[[], Awaitable[int]]) -> None:
        """Runs a release of leased deliveries nothing here attempts, and claims again at
        once when it freed any; if it fails, their leases still run out."""
        try:
            released = await release()
        except RetryableError as exc:
            log.warning("delivery_release_failed", error=str(exc))
            return
        if released:
            self._wakeup.wake()

    async def _idle(self) -> None:
        """Waits for the next poll, a finalization anywhere, or a slot to free up; after a
        wake-up, a moment more, so the finalizations of that moment share one claim."""
        if await self._wakeup.wait(self._settings.delivery_poll_interval_s):
            await anyio.sleep(CLAIM_WINDOW_S)

    async def _attempt(self, claimed: Claimed, sender: WebhookSender) -> None:
        made: Attempt | None = None
        try:
            made = await self._make(claimed, sender)
            if made.delivered:
                self._free(1)  # the receiver has it: the slot's work is done
                await self._settler.delivered(claimed, made)
            else:
                settle = partial(delivery.settle_failed, self._db, claimed, made, self._schedule)
                await persist(
                    settle, "delivery_settle_failed", log, event_id=claimed.event.event_id
                )
        except anyio.get_cancelled_exc_class():
            if made is None or not made.delivered:  # a delivered one is its group's to settle
                await self._release(claimed)
            raise
        finally:
            if made is None or not made.delivered:
                self._free(1)

    def _free(self, slots: int) -> None:
        full = self._busy >= DELIVERY_CONCURRENCY
        self._busy -= slots
        if full and self._busy < DELIVERY_CONCURRENCY:
            self._wakeup.wake()  # every slot was taken: claim again now

    async def _release(self, claimed: Claimed) -> None:
        """On a stop, lets another replica retry now rather than when the lease runs out."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await delivery.release(self._db, claimed)
            except RetryableError as exc:
                log.warning("delivery_release_failed", error=str(exc))

    async def _make(self, claimed: Claimed, sender: WebhookSender) -> Attempt:
        if claimed.sink is Sink.WEBHOOK:
            return await sender.send(claimed)
        if self._hook is None:  # claimed only with a hook: a registration changed under us
            return Attempt(False, 0.0, error="RECONCILER_ON_FINALIZED is not set here")
        return await self._hook.call(claimed)


@dataclass(eq=False)
class _Group:
    answered: list[tuple[Claimed, Attempt]]
    at: list[float]  # when each 2xx came (time.monotonic)
    full: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


class Settler:
    """Settles delivered attempts in groups: the first of a group waits up to `window_s`
    (less once `size` have joined), then one statement records them all.

    The 2xx has reached the receiver before its attempt gets here, so the window delays
    only the bookkeeping, not the delivery. A stop during the window settles the group at
    once; a replica that dies inside it leaves those deliveries leased, and they are made
    again when the lease runs out (at least once: receivers deduplicate on the id).
    """

    def __init__(self, db: Database, window_s: float, size: int) -> None:
        self._db = db
        self._window_s = window_s
        self._size = size
        self._open: _Group | None = None

    @property
    def waiting(self) -> int:
        """Delivered attempts in the open group, not yet settled."""
        return len(self._open.answered) if self._open else 0

    async def delivered(self, claimed: Claimed, attempt: Attempt) -> None:
        group = self._open
        if group is None:
            await self._lead(_Group([(claimed, attempt)], [time.monotonic()]))
            return
        group.answered.append((claimed, attempt))
        group.at.append(time.monotonic())
        if len(group.answered) >= self._size:
            group.full.set()
        await group.done.wait()
        if group.error is not None:
            raise group.error

    async def _lead(self, group: _Group) -> None:
        self._open = group
        try:
            with anyio.move_on_after(self._window_s):
                await group.full.wait()
        except anyio.get_cancelled_exc_class():
            self._open = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
                await self._settle(group)
            raise
        self._open = None  # whoever comes next opens the next group
        await self._settle(group)

    async def _settle(self, group: _Group) -> None:
        async def settle() -> None:
            now = time.monotonic()  # again on a retry: the 2xx moments stay what they were
            ago_s = [now - at for at in group.at]
            await delivery.settle_delivered(self._db, group.answered, ago_s)

        try:
            await persist(settle, "delivery_settle_failed", log, deliveries=len(group.answered))
        except Exception as exc:
            group.error = exc
            raise
        finally:
            group.done.set()


def _fanned_out(payload: dict[str, Any]) -> bool:
    """Whether a `batch.finalized` notification created deliveries (older ones say nothing)."""
    return bool(payload.get("deliveries", 1) != 0)
