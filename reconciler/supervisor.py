"""Runs one actor for the life of the service, restarting it with backoff on crashes.

Restarts are counted in `reconciler_actor_restarts_total{actor}` and logged; the
health registry records which actors are up so `/healthz` can tell.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

import anyio
import structlog

from reconciler import metrics
from reconciler.errors import MisconfiguredDependency, RetryableError

log = structlog.get_logger("reconciler.supervisor")

RESTART_DELAY_S: Final = 0.1
RESTART_MAX_DELAY_S: Final = 30.0
# A dependency blinking is not the actor failing: restart it soon, and stay live.
RETRYABLE_MAX_DELAY_S: Final = 5.0
HEALTHY_RUN_S: Final = 60.0


class Actor(Protocol):
    name: str

    async def run(self) -> None: ...


class Health:
    """Which actors are running: written by the supervisor, read by the probes."""

    def __init__(self) -> None:
        self.running: dict[str, bool] = {}
        self.restarts: dict[str, int] = {}

    def alive(self) -> bool:
        return all(self.running.values())


def diagnosed(exc: BaseException) -> MisconfiguredDependency | None:
    """The misconfiguration behind an error (or a task group's first), if one is named."""
    if isinstance(exc, BaseExceptionGroup):
        matched, _ = exc.split(MisconfiguredDependency)
        return None if matched is None else diagnosed(matched.exceptions[0])
    return exc if isinstance(exc, MisconfiguredDependency) else None


def _log_restart(name: str, exc: Exception, retryable: bool, delay: float) -> None:
    """One line per backoff step: what a person must fix when a cause is known."""
    found = diagnosed(exc)
    if found is not None:
        fields = {"cause": found.cause, "error": str(found), "restart_in_s": delay}
        log.warning("actor_waiting_for_dependency", actor=name, **fields)
        return
    fields = {"error": str(exc), "restart_in_s": delay, "exc_info": not retryable}
    log.error("actor_crashed", actor=name, **fields)


def is_retryable(exc: BaseException) -> bool:
    """A RetryableError, or a task group's error made only of them."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(RetryableError)
        return rest is None
    return isinstance(exc, RetryableError)


async def supervise(actor: Actor, health: Health) -> None:
    """Runs `actor.run()` until it returns; restarts it whenever it raises."""
    delay = RESTART_DELAY_S
    while True:
        started = time.monotonic()
        health.running[actor.name] = True
        try:
            await actor.run()
        except Exception as exc:
            retryable = is_retryable(exc)
            health.running[actor.name] = retryable
            health.restarts[actor.name] = health.restarts.get(actor.name, 0) + 1
            metrics.ACTOR_RESTARTS.labels(actor.name).inc()
            if time.monotonic() - started > HEALTHY_RUN_S:
                delay = RESTART_DELAY_S
            _log_restart(actor.name, exc, retryable, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRYABLE_MAX_DELAY_S if retryable else RESTART_MAX_DELAY_S)
            continue
        health.running.pop(actor.name, None)
        return
