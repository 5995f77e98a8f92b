"""Runs the handler on one file: timeout per attempt, retries with backoff.

Whatever the handler does (raise, hang, return something unserializable, kill its
thread) ends as an Attempted value with a readable reason; nothing escapes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import structlog

from reconciler import metrics
from reconciler.database import nulls_folded
from reconciler.handlers import Handler, is_async
from reconciler.jobs import FileJob

log = structlog.get_logger("reconciler.execution")

RETRY_BASE_DELAY_S: Final = 0.2
RETRY_MAX_DELAY_S: Final = 10.0
MAX_ERROR_CHARS: Final = 2000
MAX_RESULT_BYTES: Final = 256 * 1024
# Called before each retry: records the next attempt as started and returns the job
# carrying its number, or None when the file must not run again here.
NextAttempt = Callable[[FileJob], Awaitable[FileJob | None]]


# Not frozen: one is made per file, and a frozen dataclass's __init__ costs 4x.
@dataclass(slots=True)
class Attempted:
    """The final word on one file: its result as JSON text, or the last error."""

    ok: bool
    result: str | None
    error: str | None
    duration_s: float | None
    attempts: int


def outcome_columns(rows: Sequence[tuple[str, str, Attempted]]) -> tuple[list[Any] | None, ...]:
    """The parameters of the `record_outcomes` statement, one list per column (results
    and errors as NULL when every one is: a fast batch of successes has neither)."""
    return (
        [batch_id for batch_id, _, _ in rows],
        [file_id for _, file_id, _ in rows],
        [a.ok for _, _, a in rows],
        nulls_folded([a.result for _, _, a in rows]),
        nulls_folded([a.error for _, _, a in rows]),
        [a.duration_s for _, _, a in rows],
        [a.attempts for _, _, a in rows],
    )


class HandlerCrashed(Exception):
    """The handler raised something that is not an Exception (SystemExit, ...)."""


def retry_delay_s(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter after the given failed attempt."""
    ceiling = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
    return float(ceiling * (0.5 + rng() / 2))


def describe(exc: BaseException) -> str:
    """A one-line reason for a failure, safe to store in a text column."""
    if isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        message = _message(exc)
        text = message if isinstance(exc, HandlerCrashed) else f"{type(exc).__name__}: {message}"
    text = text.replace("\x00", "\\0")
    # Unpaired surrogates (undecodable file names) cannot be stored: escape them.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:MAX_ERROR_CHARS]


def _message(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # an exception whose __str__ raises still needs a reason
        return f"{type(exc).__name__} (its message could not be rendered)"


def to_json(result: Any) -> str | None:
    """The handler's result as JSON text, or ValueError saying why it cannot be."""
    if result is None:
        return None
    try:
        text = json.dumps(result, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"result is not JSON-serializable: {exc}") from None
    if "\\u0000" in text:
        raise ValueError("result contains a NUL character, which Postgres cannot store")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("result contains an unpaired surrogate, which is not UTF-8") from None
    if size > MAX_RESULT_BYTES:
        raise ValueError(f"result is {size} bytes, more than {MAX_RESULT_BYTES}")
    return text


class Deadlines:
    """The timeout of every attempt running in the loop, kept by one timer.

    Neither anyio's fail_after nor asyncio.timeout: the service runs on asyncio (uvloop)
    only, and a timer per attempt (what asyncio.timeout arms) costs 3-5 us to arm and
    cancel on uvloop, more than the rest of a no-op file's attempt. Here an attempt
    writes its deadline in a dict; one timer, armed for the earliest deadline, cancels
    the tasks past theirs and re-arms for the next. Attempts start in deadline order
    (one timeout for all), so a new one never moves the timer.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> its deadline
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> tuple[asyncio.Task[Any], int]:
        """The calling task's attempt begins: it is cancelled at its deadline unless
        `end` comes first. Returns the task and its cancellation count at the start."""
        loop, task = self._current()
        deadline = loop.time() + self._timeout_s
        self._running[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return task, task.cancelling()

    def timed_out(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """Asked on CancelledError: whether it is the deadline's, with no other
        cancellation pending (a stop's goes on), as asyncio.timeout decides."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= cancelling

    def end(self, task: asyncio.Task[Any]) -> None:
        del self._running[task]
        if task in self._expired:  # past its deadline, but it ended before the cancel
            self._expired.discard(task)
            task.uncancel()

    def _expire(self) -> None:
        assert self._loop is not None
        self._timer = None
        now = self._loop.time()
        upcoming = None
        for task, deadline in self._running.items():
            if deadline <= now:
                if task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        if upcoming is not None:
            self._timer = self._loop.call_at(upcoming, self._expire)

    def _current(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]:
        """The running loop and task; the loop is looked up once (on Python 3.11 each
        lookup is a getpid), again only if this runs in another loop now."""
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:
            loop = self._loop = asyncio.get_running_loop()
            self._running.clear()
            self._expired.clear()
            self._timer = None
            task = asyncio.current_task(loop)
        assert task is not None
        return loop, task


class Executor:
    """Calls one handler with the service's timeout and retry policy."""

    def __init__(self, handler: Handler, *, timeout_s: float, max_attempts: int, threads: int):
        self._handler = handler
        self._async = is_async(handler)
        self._max_attempts = max_attempts
        self._threads = anyio.CapacityLimiter(threads)
        self._deadlines = Deadlines(timeout_s)

    async def execute(
        self, job: FileJob, next_attempt: NextAttempt | None = None
    ) -> Attempted | None:
        """Attempts the file until it succeeds or its attempts are spent.

        `job.attempt` is the attempt already recorded as started; None means
        `next_attempt` declined a retry (stopping, or the file was settled elsewhere).
        """
        while True:
            started = time.perf_counter()
            try:
                result = await self._attempt(job)
            except Exception as exc:
                elapsed = time.perf_counter() - started
                if job.attempt >= self._max_attempts:
                    return self._failed(job, exc, elapsed)
                await self._back_off(job, exc, elapsed)
                following = await (next_attempt or _next)(job)
                if following is None:
                    return None
                job = following
                continue
            elapsed = time.perf_counter() - started
            metrics.ATTEMPTS.attempted(elapsed, "succeeded")
            return Attempted(True, result, None, elapsed, job.attempt)

    async def _attempt(self, job: FileJob) -> str | None:
        task, cancelling = self._deadlines.start()
        try:
            if self._async:
                raw = await _guarded_async(self._handler, job)
            else:
                raw = await anyio.to_thread.run_sync(
                    _guarded, self._handler, job, abandon_on_cancel=True, limiter=self._threads
                )
        except asyncio.CancelledError:
            if self._deadlines.timed_out(task, cancelling):
                raise TimeoutError from None
            raise
        finally:
            self._deadlines.end(task)
        return to_json(raw)

    def _failed(self, job: FileJob, exc: Exception, elapsed: float) -> Attempted:
        metrics.ATTEMPTS.attempted(elapsed, "failed")
        reason = describe(exc)
        log.warning(
            "file_failed",
            batch_id=job.batch_id, file_id=job.file_id, attempts=job.attempt, error=reason,
        )  # fmt: skip
        return Attempted(False, None, reason, elapsed, job.attempt)

    async def _back_off(self, job: FileJob, exc: Exception, elapsed: float) -> None:
        metrics.ATTEMPTS.attempted(elapsed, "retried")
        delay = retry_delay_s(job.attempt)
        log.info(
            "file_retry_scheduled",
            batch_id=job.batch_id, file_id=job.file_id, attempt=job.attempt,
            delay_s=round(delay, 3), error=describe(exc),
        )  # fmt: skip
        await anyio.sleep(delay)


async def _next(job: FileJob) -> FileJob:
    return job.with_attempt(job.attempt + 1)


async def _guarded_async(handler: Handler, job: FileJob) -> Any:
    # Only the service's own cancellation may pass; a handler raising SystemExit,
    # KeyboardInterrupt or a stray CancelledError fails its file instead.
    try:
        return await handler(job)
    except Exception:
        raise
    except asyncio.CancelledError:
        if _being_cancelled():
            raise
        raise HandlerCrashed("handler raised CancelledError without being cancelled") from None
    except BaseException as exc:
        raise HandlerCrashed(f"handler crashed: {type(exc).__name__}: {_message(exc)}") from None


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _guarded(handler: Handler, job: FileJob) -> Any:
    # A thread that raises SystemExit or KeyboardInterrupt must not take the service down.
    try:
        return handler(job)
    except Exception:
        raise
    except BaseException as exc:
        raise HandlerCrashed(f"handler crashed its thread: {type(exc).__name__}: {exc}") from None
