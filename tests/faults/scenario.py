"""One run of the fault sweep: three small batches through a service whose ports fail.

A run subscribes the lane's webhook receiver, submits the batches through the faulty
ports, restarts the service after a crash (a fresh generation around the same pools),
waits until nothing is left to do (every event delivered too), stops the last
generation gracefully and records everything the invariants look at.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import anyio
import asyncpg
import redis.asyncio as aioredis
import structlog
from redis import exceptions as redis_errors

from reconciler import webhooks
from reconciler.app import Ports, Role, Service
from reconciler.batches import FileSpec, submit
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.errors import RetryableError
from reconciler.queue import JobQueue
from tests.faults import handlers
from tests.faults.handlers import HandlerRun
from tests.faults.injector import CURRENT_GENERATION, Crash, FaultPlan, Generation, faulty_ports
from tests.helpers import sql, wait_for
from tests.receiver import Receiver, always, receiving
from tests.services import unique_name

MAX_ATTEMPTS: Final = 3
DEADLINE_S: Final = 0.6
SLOW_S: Final = 1.2
VISIBILITY_TIMEOUT_S: Final = 1.0
SWEEP_INTERVAL_S: Final = 0.2
SETTLE_TIMEOUT_S: Final = 15.0
RESTART_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0
SUBMIT_TRIES: Final = 6
# Longer than all the stage deadlines together: past it, something hangs.
RUN_LIMIT_S: Final = 90.0
POOL_SIZE: Final = 5
LETTERS: Final = ("A", "B", "C")
HANDLER: Final = "tests.faults.handlers:handle"


def scenario_files(letter: str) -> list[FileSpec]:
    """A: one file always fails; B: one fails its first attempt; C: one outlives the deadline."""
    special = {
        "A": {"behaviour": handlers.FAIL_ALWAYS},
        "B": {"behaviour": handlers.FAIL_ONCE},
        "C": {"behaviour": handlers.SLOW, "sleep_s": SLOW_S},
    }[letter]
    ids = [f"{letter.lower()}{i}" for i in range(4)]
    return [FileSpec(fid, f"mem://{fid}", special if i == 0 else None) for i, fid in enumerate(ids)]


def special_file(letter: str) -> str:
    return f"{letter.lower()}0"


def run_settings(database_url: str, redis_url: str, namespace: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        namespace=namespace,
        http_host="127.0.0.1",
        http_port=0,
        handler=HANDLER,
        concurrency=4,
        sweep_interval_s=SWEEP_INTERVAL_S,
        stuck_grace_s=0.0,
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        max_attempts=MAX_ATTEMPTS,
        file_timeout_s=5.0,
        drain_timeout_s=1.0,
        stats_interval_s=3600.0,
        # The scenario's batches are seconds old, so retention would delete nothing and
        # only add a call per pass (a failing one is caught like any repair's).
        retention_days=0,
        # A claim that failed, or a delivery freed after a lost reply, is retried soon.
        delivery_poll_interval_s=0.2,
        delivery_backoff_s=0.05,
        delivery_timeout_s=5.0,
    )


@dataclass(frozen=True)
class RunSpec:
    mode: str  # "clean" or a Mode value
    points: frozenset[int] = frozenset()
    method: str | None = None  # the first call of this port method, instead of points

    def label(self) -> str:
        if self.method:
            return f"{self.mode} first {self.method}"
        return self.mode if not self.points else f"{self.mode} N={sorted(self.points)}"


# -- lanes: one database, pool and Redis client per concurrent run ---------------------


@dataclass(eq=False)
class Lane:
    """What runs in one lane share: a database (truncated between runs) and clients."""

    database_url: str
    redis_url: str
    db: Database
    redis: aioredis.Redis
    check: asyncpg.Connection
    receiver: Receiver  # answers 200 to every verified POST, for every run of the lane

    async def reset(self, namespace: str) -> None:
        """Empties the lane's tables and deletes the run's Redis keys."""
        tables = await self.check.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'"
        )
        names = ", ".join(f'"{r["tablename"]}"' for r in tables)
        await self.check.execute(f"TRUNCATE {names} CASCADE")
        keys = [key async for key in self.redis.scan_iter(match=f"{namespace}:*")]
        if keys:
            await self.redis.delete(*keys)


@asynccontextmanager
async def open_lane(admin_url: str, redis_url: str, template: str) -> AsyncIterator[Lane]:
    from tests.services import with_database

    name = unique_name("reconciler_faults")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    db = await Database.connect(url, max_size=POOL_SIZE)
    client = aioredis.Redis.from_url(redis_url)
    check = await asyncpg.connect(url)
    try:
        with receiving(always(200)) as receiver:
            yield Lane(url, redis_url, db, client, check, receiver)
    finally:
        with anyio.CancelScope(shield=True):
            await check.close()
            await client.aclose()
            await db.close()
            admin = await asyncpg.connect(admin_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


# -- what a run leaves behind -------------------------------------------------------------


@dataclass
class FinalState:
    batches: dict[str, dict[str, Any]]
    files: dict[tuple[str, str], dict[str, Any]]
    summaries: dict[str, list[dict[str, Any]]]
    pending: int
    queued: int
    stream_length: int
    dead_letters: int
    consumers: list[str]
    # Per batch letter: its events, each with its webhook delivery's state (or None).
    deliveries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Per event id of this run: how often the receiver acknowledged it.
    acknowledged: dict[str, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # requests whose signature failed
    # When the consumers were listed, on the clock of the events' `at`.
    read_at: float = 0.0


@dataclass
class RunRecord:
    spec: RunSpec
    plan: FaultPlan
    generations: int
    settled: bool
    left_before_stop: str
    stale_consumers: list[str]
    final: FinalState
    journal: list[HandlerRun]
    finalized_events: dict[str, int]
    duration_s: float
    errors: list[str] = field(default_factory=list)
    events: list[MutableMapping[str, Any]] = field(default_factory=list, repr=False)

    def label(self) -> str:
        """The run and the port call at each of its fault points."""
        calls = dict(self.plan.log)
        at = ", ".join(f"{n}: {calls.get(n, 'not reached')}" for n in sorted(self.spec.points))
        if self.spec.method:
            at = ", ".join(f"{n}: {name}" for n, name in self.plan.injected) or "not reached"
        return f"[{self.spec.label()}{' ' + at if at else ''}]"


@dataclass(eq=False)
class RunContext:
    """Per-run state the log router and the handler reach through context variables."""

    tag: str
    events: list[MutableMapping[str, Any]] = field(default_factory=list)


CURRENT_RUN: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "fault_run", default=None
)


def route_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: files each event under its run, with its generation."""
    run = CURRENT_RUN.get()
    if run is None:
        return event
    generation = CURRENT_GENERATION.get()
    event["generation"] = generation.number if generation else 0
    event["at"] = time.monotonic()
    run.events.append(event)
    raise structlog.DropEvent


async def redis_state(client: aioredis.Redis, queue: JobQueue) -> tuple[int, int, int, int]:
    """Pending entries in the group, queued members, stream length, dead letters."""
    try:
        pending = int((await client.xpending(queue.stream, queue.group))["pending"])
    except redis_errors.ResponseError:  # no group: nothing can be pending
        pending = 0
    queued = int(await client.scard(queue.queued))
    return pending, queued, int(await client.xlen(queue.stream)), int(await client.xlen(queue.dead))


async def consumer_rows(client: aioredis.Redis, queue: JobQueue) -> list[dict[str, Any]]:
    try:
        return list(await client.xinfo_consumers(queue.stream, queue.group))
    except redis_errors.ResponseError:  # no group, no consumers
        return []


async def group_consumers(client: aioredis.Redis, queue: JobQueue) -> list[str]:
    return sorted(row["name"].decode() for row in await consumer_rows(client, queue))


_LEFT_SQL: Final = """
SELECT (SELECT count(*) FROM batches) AS batches,
       (SELECT count(*) FROM batches WHERE status = 'processing') AS unfinalized,
       (SELECT count(*) FROM batch_files
         WHERE status IN ('pending', 'processing') OR lease_expires_at IS NOT NULL) AS open_files,
       (SELECT count(*) FROM events e WHERE NOT EXISTS (
            SELECT 1 FROM deliveries d
            WHERE d.event_id = e.event_id AND d.state = 'delivered')) AS undelivered
"""
_DELIVERIES_SQL: Final = """
SELECT e.batch_id, e.event_id, d.state, d.attempts
FROM events e LEFT JOIN deliveries d USING (event_id)
ORDER BY e.batch_id
"""
# A restarted process comes back once the dead one's delivery leases have run out too:
# time moves for them (a lease is at least 30 s) instead of the run waiting.
_EXPIRE_DELIVERY_LEASES_SQL: Final = """
UPDATE deliveries SET next_attempt_at = now()
WHERE state = 'pending' AND next_attempt_at > now()
"""


async def left_behind(lane: Lane, queue: JobQueue) -> str:
    """What is still to do, as text; empty once every batch is done and nothing is left."""
    row = await lane.check.fetchrow(_LEFT_SQL)
    assert row is not None
    pending, queued, length, _ = await redis_state(lane.redis, queue)
    parts = {
        "batches missing": len(LETTERS) - row["batches"],
        "unfinalized": row["unfinalized"],
        "open files": row["open_files"],
        "pending jobs": pending,
        "queued members": queued,
        "stream entries": length,
        "undelivered events": row["undelivered"],
    }
    return ", ".join(f"{k}={v}" for k, v in parts.items() if v)


async def final_state(
    lane: Lane, tag: str, queue: JobQueue, events: list[MutableMapping[str, Any]]
) -> FinalState:
    batches = {
        _letter(tag, r["batch_id"]): dict(r)
        for r in await lane.check.fetch("SELECT * FROM batches")
    }
    files = {
        (_letter(tag, r["batch_id"]), r["file_id"]): dict(r)
        for r in await lane.check.fetch("SELECT * FROM batch_files")
    }
    summaries: dict[str, list[dict[str, Any]]] = {}
    for r in await lane.check.fetch("SELECT * FROM run_summaries"):
        summaries.setdefault(_letter(tag, r["batch_id"]), []).append(dict(r))
    pending, queued, length, dead = await redis_state(lane.redis, queue)
    read_at = time.monotonic()
    consumers = [
        f"{_owner(row['name'].decode(), events)} pending={row['pending']} idle={row['idle']}ms"
        for row in await consumer_rows(lane.redis, queue)
    ]
    deliveries: dict[str, list[dict[str, Any]]] = {}
    for r in await lane.check.fetch(_DELIVERIES_SQL):
        deliveries.setdefault(_letter(tag, r["batch_id"]), []).append(dict(r))
    ids = {row["event_id"] for rows in deliveries.values() for row in rows}
    acknowledged = {i: n for i, n in lane.receiver.acknowledged.items() if i in ids}
    return FinalState(
        batches,
        files,
        summaries,
        pending,
        queued,
        length,
        dead,
        consumers,
        deliveries,
        acknowledged,
        list(lane.receiver.rejected),
        read_at,
    )


def prunable_since(idle_ms: int, read_at: float, events: list[MutableMapping[str, Any]]) -> float:
    """When a consumer seen idle `idle_ms` at `read_at` became removable by a sweep.

    Idle past the visibility timeout, and nothing pending: entries another consumer
    claimed from it leave it without refreshing its idle time, so not before the last
    reclaim either.
    """
    since = read_at - idle_ms / 1000 + VISIBILITY_TIMEOUT_S
    reclaims = [
        float(e["at"]) for e in events
        if e.get("event") == "jobs_reclaimed" and e["at"] <= read_at
    ]  # fmt: skip
    return max([since, *reclaims])


def swept_since(
    events: list[MutableMapping[str, Any]], since: float, before: float | None = None
) -> bool:
    """Whether a sweep that started at `since` or later finished its consumer repair
    (before `before`, when the listing to judge was asked for).

    Such a sweep removes every consumer that was removable when it started, so one
    still listed after it was left behind. Counted in sweeps, not seconds: a loaded
    machine stretches the sweeps, and a stopping generation runs none. Only sweeps
    that finished before the listing was asked for count: Redis takes the listing at
    some moment between the request and the reply, and a sweep sharing the harness's
    event loop can remove the consumer, and log it, after that moment but before the
    harness reads the reply.
    """
    failed = [
        e for e in events
        if e.get("event") == "sweep_repair_failed" and e.get("repair") == "consumers_removed"
    ]  # fmt: skip
    for e in events:
        if e.get("event") != "sweep_finished" or (before is not None and e["at"] > before):
            continue
        started = float(e["at"]) - float(e.get("duration_ms", 0)) / 1000
        if started < since:
            continue
        same = (f for f in failed if f["generation"] == e["generation"])
        if not any(started <= f["at"] <= e["at"] for f in same):
            return True
    return False


def _letter(tag: str, batch_id: str) -> str:
    return batch_id.removeprefix(f"{tag}-")


# -- one run ------------------------------------------------------------------------------


@dataclass(eq=False)
class Life:
    """One generation of the service and whether its `serve()` has returned."""

    generation: Generation
    service: Service
    finished: anyio.Event = field(default_factory=anyio.Event)


class Run:
    """Drives one run: generations of the service, submission, settling, graceful stop."""

    def __init__(self, lane: Lane, spec: RunSpec, plan: FaultPlan) -> None:
        self.lane, self.spec, self.plan = lane, spec, plan
        self.tag = unique_name("r")
        self.namespace = unique_name("flt")
        self.settings = run_settings(lane.database_url, lane.redis_url, self.namespace)
        self.real = Ports(lane.db, JobQueue(lane.redis, self.namespace))
        self.lives: list[Life] = []
        self.changed = anyio.Event()
        self.errors: list[str] = []
        self.stage = "starting"
        self.events: list[MutableMapping[str, Any]] = []
        self.stale: list[str] = []
        self.t0 = time.monotonic()

    def batch_id(self, letter: str) -> str:
        return f"{self.tag}-{letter}"

    @property
    def current(self) -> Life:
        return self.lives[-1]

    async def serve_generations(self) -> None:
        """Starts a generation; after each crash, waits as a restart would, then another."""
        while True:
            generation = Generation(len(self.lives) + 1)
            # Its own Redis connections, closed when it ends: a dead process's blocked
            # XREADGROUP goes with its socket, and cannot act for it afterwards.
            queue = JobQueue.connect(self.lane.redis_url, self.namespace)
            ports = faulty_ports(Ports(self.real.db, queue), self.plan, generation)
            service = Service(self.settings, ports, Role.ALL)
            life = Life(generation, service)
            self.lives.append(life)
            self.changed.set()
            self.changed = anyio.Event()
            try:
                await self._serve(life)
            finally:
                with anyio.CancelScope(shield=True):
                    await queue.close()
                life.finished.set()
            if not generation.dead:
                return
            await self._await_restart()

    async def _serve(self, life: Life) -> None:
        token = CURRENT_GENERATION.set(life.generation)
        life.generation.on_death.append(partial(_close_listeners, life.service))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_death, life.generation, tg.cancel_scope)
                await life.service.serve()
                tg.cancel_scope.cancel()
        except* Crash:
            pass  # the generation died; what it left behind is the next one's problem
        finally:
            CURRENT_GENERATION.reset(token)

    async def _await_restart(self) -> None:
        # A restarted process comes back once the dead one's leases have run out (its
        # liveness timeout); coming back sooner only adds the consumer's claim interval.
        await wait_for(
            self._dead_leases_expired, timeout_s=RESTART_TIMEOUT_S, what="dead leases expire"
        )
        await sql(self.lane.database_url, _EXPIRE_DELIVERY_LEASES_SQL)

    async def _dead_leases_expired(self) -> bool:
        queue = self.real.queue
        try:
            pending = await self.lane.redis.xpending(queue.stream, queue.group)
        except redis_errors.ResponseError:
            return True
        count = int(pending["pending"])
        if not count:
            return True
        idle_ms = int(VISIBILITY_TIMEOUT_S * 1000)
        aged = await self.lane.redis.xpending_range(
            queue.stream, queue.group, "-", "+", count, idle=idle_ms
        )
        return len(aged) >= count

    async def close_generations(self) -> None:
        """Closes every generation's Redis client again, once nothing uses them.

        Each was closed when its generation ended, but a submit of the harness racing
        a death may still have been connecting on it: redis-py's pool skips a connection
        whose connect is in progress when it disconnects, and that connection then came
        up on a closed client, for the garbage collector to warn about later, in
        whichever test was running (an unclosed `TcpConnection` failed a sweep so).
        """
        for life in self.lives:
            await life.service.ports.queue.close()

    async def live(self) -> Life:
        """The generation alive now, waiting for a restart if needed."""
        with anyio.fail_after(RESTART_TIMEOUT_S + SETTLE_TIMEOUT_S):
            while not self.lives or self.current.generation.dead:
                await self.changed.wait()
        return self.current

    async def submit_all(self) -> None:
        for letter in LETTERS:
            await self._submit(letter)

    async def _submit(self, letter: str) -> None:
        """Submits as a user would: on an error, again with the same batch id."""
        deadline = DEADLINE_S if letter == "C" else None
        for _ in range(SUBMIT_TRIES):
            life = await self.live()
            ports = life.service.ports
            try:
                await submit(
                    ports.db, ports.queue, scenario_files(letter),
                    batch_id=self.batch_id(letter), deadline_s=deadline,
                )  # fmt: skip
                return
            except (RetryableError, Crash):
                continue
            except Exception:
                # The generation died under the call and its connections were closed:
                # the user's submit failed with it, and is retried on the next one.
                if not life.generation.dead:
                    raise
        self.errors.append(f"batch {letter} could not be submitted in {SUBMIT_TRIES} tries")

    async def settle(self) -> str:
        """Waits until nothing is left to do; returns what is left if that never happens."""
        try:
            await wait_for(self._settled, timeout_s=SETTLE_TIMEOUT_S, what="the run to settle")
        except AssertionError:
            return await left_behind(self.lane, self.real.queue) or "settled too late"
        return ""

    async def _settled(self) -> bool:
        return not self.current.generation.dead and not await left_behind(
            self.lane, self.real.queue
        )

    async def stale_consumers(self) -> list[str]:
        """Consumers of stopped generations still in the group after a sweep could remove them.

        Each is waited for until a sweep of the live generation that started once it was
        removable has finished (see `swept_since`): one still listed then was left behind.
        """
        overdue: list[str] = []
        seen: dict[str, tuple[int, int, float]] = {}  # name -> (pending, idle ms, read at)
        # When each was first seen with nothing pending: a sweep removes only those, and
        # an entry can leave a stopped consumer's list unlogged (another consumer's XACK,
        # or XAUTOCLAIM dropping an entry deleted from the stream), so the reclaim events
        # alone do not say when that happened.
        emptied: dict[str, float] = {}

        async def settled() -> bool:
            live = self.current.service.consumer
            asked_at = time.monotonic()
            listed = await consumer_rows(self.lane.redis, self.real.queue)
            # After the reply: Redis measured each idle time at or before this moment, so
            # the removable-since estimate is never earlier than the truth (a sweep that
            # starts in between would otherwise be blamed for a consumer not yet idle).
            read_at = time.monotonic()
            rows = [
                row for row in listed if live is None or row["name"].decode() != live.consumer
            ]  # fmt: skip
            for row in rows:
                seen[row["name"].decode()] = (int(row["pending"]), int(row["idle"]), read_at)
                if int(row["pending"]):
                    emptied.pop(row["name"].decode(), None)
                else:
                    emptied.setdefault(row["name"].decode(), read_at)
            overdue[:] = [
                name for row in rows
                if (name := row["name"].decode()) in emptied
                and swept_since(self.events, max(
                    emptied[name], prunable_since(int(row["idle"]), read_at, self.events)
                ), before=asked_at)
            ]  # fmt: skip
            return not rows or bool(overdue)

        try:
            await wait_for(settled, timeout_s=SETTLE_TIMEOUT_S, what="stale consumers leave")
        except AssertionError:
            names = await group_consumers(self.lane.redis, self.real.queue)
            live = self.current.service.consumer
            overdue = [n for n in names if live is None or n != live.consumer]
        return [self._why_stale(name, seen.get(name), emptied.get(name)) for name in overdue]

    def _why_stale(
        self, name: str, seen: tuple[int, int, float] | None, emptied: float | None
    ) -> str:
        """A stale consumer with what the harness saw of it and what the sweeps did."""
        t = partial(_relative, self.t0)
        if seen is None:
            return f"{_owner(name, self.events)} [never seen]"
        pending, idle_ms, read_at = seen
        since = prunable_since(idle_ms, read_at, self.events)
        story = [
            f"{e['event']}@gen{e.get('generation')}@{t(float(e['at']))}"
            + (f"(-{e.get('duration_ms')}ms)" if e["event"] == "sweep_finished" else "")
            for e in self.events
            if (e.get("event") == "sweep_finished" and float(e["at"]) >= since - 1.0)
            or e.get("consumer") == name
            or name in str(e.get("consumers", ""))
            or e.get("event") in ("sweep_repair_failed", "jobs_reclaimed")
        ]
        return (
            f"{_owner(name, self.events)} [last seen {t(read_at)} pending={pending}"
            f" idle={idle_ms}ms; empty since {t(emptied)}; removable since {t(since)};"
            f" {', '.join(story)}]"
        )

    async def stop(self) -> bool:
        """Stops the live generation gracefully; a crash while stopping means another go."""
        with anyio.move_on_after(STOP_TIMEOUT_S + RESTART_TIMEOUT_S + SETTLE_TIMEOUT_S):
            while True:
                life = await self.live()
                life.service.stop.set()
                await life.finished.wait()
                if not life.generation.dead:
                    return True
                # Restarted while stopping: the new generation gets the same chance to
                # finish and to clear stopped consumers as the first one did.
                await self.live()
                if not await self.settle():
                    self.stale += await self.stale_consumers()
        return False


def _owner(name: str, events: list[MutableMapping[str, Any]]) -> str:
    for event in events:
        if event.get("event") == "consumer_started" and event.get("consumer") == name:
            return f"{name} (generation {event['generation']})"
    return name


def _relative(t0: float, at: float | None) -> str:
    return "-" if at is None else f"{at - t0:.2f}s"


def _close_listeners(service: Service) -> None:
    """A dead process's listening socket goes with it, unregistered from the loop.

    Cancelled, uvicorn never closes its asyncio servers and the API actor then closes
    their socket under the loop's selector; the next socket to get that descriptor fails
    to connect (ENOENT from epoll). Closing the servers first keeps the loop sound.
    """
    server = getattr(service.api, "_server", None)
    for listener in getattr(server, "servers", []):
        listener.close()


async def _cancel_on_death(generation: Generation, scope: anyio.CancelScope) -> None:
    await generation.died.wait()
    scope.cancel()


class RunHung(Exception):
    """A run outlived every deadline of its stages: the harness or the service hangs."""


async def execute(lane: Lane, spec: RunSpec, plan: FaultPlan) -> RunRecord:
    """Runs the scenario once under `plan` and records its end state; resets the lane."""
    run = Run(lane, spec, plan)
    context = RunContext(run.tag, run.events)
    token = CURRENT_RUN.set(context)
    started = time.monotonic()
    try:
        with anyio.move_on_after(RUN_LIMIT_S):
            return await _drive(run, context, started)
        raise RunHung(f"[{spec.label()}] still {run.stage} after {RUN_LIMIT_S} s")
    finally:
        CURRENT_RUN.reset(token)
        handlers.forget({run.batch_id(letter) for letter in LETTERS})
        with anyio.CancelScope(shield=True):
            await run.close_generations()
        await lane.reset(run.namespace)


# A stream entry no worker can take: the consumer must dead-letter it exactly once.
GARBAGE_JOB: Final = {"job": "{not json"}


async def _drive(run: Run, context: RunContext, started: float) -> RunRecord:
    # Through the lane's own pool, before any generation: every event fans out to it.
    receiver = run.lane.receiver
    await webhooks.create(run.lane.db, receiver.url, secret=receiver.secret)
    await run.lane.redis.xadd(run.real.queue.stream, GARBAGE_JOB)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(run.serve_generations)
        run.stage = "submitting"
        await run.submit_all()
        run.stage = "settling"
        left = await run.settle()
        run.stage = "waiting for stopped consumers to leave"
        run.stale = await run.stale_consumers() if not left else []
        run.stage = "stopping"
        if not await run.stop():
            run.errors.append(f"the last generation did not stop within {STOP_TIMEOUT_S} s")
            tg.cancel_scope.cancel()
    run.stage = "reading the end state"
    final = await final_state(run.lane, run.tag, run.real.queue, context.events)
    finalized = {
        letter: sum(
            1
            for e in context.events
            if e.get("event") == "batch_finalized" and e.get("batch_id") == run.batch_id(letter)
        )
        for letter in LETTERS
    }
    return RunRecord(
        spec=run.spec, plan=run.plan, generations=len(run.lives), settled=not left,
        left_before_stop=left, stale_consumers=run.stale, final=final,
        journal=list(handlers.runs_of({run.batch_id(x) for x in LETTERS})),
        finalized_events=finalized, duration_s=time.monotonic() - started, errors=run.errors,
        events=run.events,
    )  # fmt: skip
