"""The one retry policy for calls to Postgres and Redis that must not be dropped.

A call that fails with RetryableError is tried again with exponential backoff; with a
`stop` event it gives up (raising `Stopping`) once the service is stopping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import anyio
import structlog

from reconciler.errors import RetryableError

T = TypeVar("T")
RETRY_DELAY_S: Final = 0.1
RETRY_MAX_DELAY_S: Final = 5.0


class Stopping(Exception):
    """The service is stopping: a stoppable retry gives up."""


async def persist(
    call: Callable[[], Awaitable[T]],
    event: str,
    log: Any = None,
    stop: anyio.Event | None = None,
    **fields: Any,
) -> T:
    """Calls until it succeeds, logging `event` with `fields` and the delay on each failure."""
    logger = log or structlog.get_logger("reconciler.retry")
    delay = RETRY_DELAY_S
    while True:
        try:
            return await call()
        except RetryableError as exc:
            logger.warning(event, error=str(exc), retry_in_s=delay, **fields)
        if stop is not None and stop.is_set():
            raise Stopping
        await anyio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_DELAY_S)
