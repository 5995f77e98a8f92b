"""The handler runner: retries, timeouts, crashes and results, without any service."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.execution import (
    Attempted,
    Executor,
    describe,
    outcome_columns,
    retry_delay_s,
    to_json,
)
from reconciler.jobs import FileJob

JOB = FileJob("b", "f", "/nowhere")


class _Run:
    """An executor for one handler whose `execute` always reaches a final word."""

    def __init__(self, handler: Any, attempts: int, timeout_s: float) -> None:
        self._executor = Executor(handler, timeout_s=timeout_s, max_attempts=attempts, threads=2)

    async def execute(self, job: FileJob) -> Attempted:
        done = await self._executor.execute(job)
        assert done is not None
        return done


def _executor(handler: Any, attempts: int = 3, timeout_s: float = 1.0) -> _Run:
    return _Run(handler, attempts, timeout_s)


async def test_sync_handler_result_is_json_text() -> None:
    """A sync handler runs in a thread and its dict becomes JSON text."""
    done = await _executor(lambda job: {"n": 1, "id": job.file_id}).execute(JOB)
    assert (done.ok, done.result, done.attempts) == (True, '{"n":1,"id":"f"}', 1)


async def test_retries_until_success(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler failing twice succeeds on its third attempt."""
    monkeypatch.setattr("reconciler.execution.RETRY_BASE_DELAY_S", 0.001)
    seen: list[int] = []

    def flaky(job: FileJob) -> None:
        seen.append(job.attempt)
        if job.attempt < 3:
            raise ValueError("not yet")

    done = await _executor(flaky).execute(JOB)
    assert done.ok and done.attempts == 3 and seen == [1, 2, 3]


async def test_gives_up_after_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last error is kept once the attempts are spent."""
    monkeypatch.setattr("reconciler.execution.RETRY_BASE_DELAY_S", 0.001)

    def broken(job: FileJob) -> None:
        raise OSError(f"disk {job.attempt}")

    done = await _executor(broken, attempts=2).execute(JOB)
    assert (done.ok, done.error, done.attempts) == (False, "OSError: disk 2", 2)


async def test_async_handler_timeout() -> None:
    """An async handler that never returns is cut at the timeout."""
    import anyio

    async def hang(job: FileJob) -> None:
        await anyio.sleep_forever()

    done = await _executor(hang, attempts=1, timeout_s=0.05).execute(JOB)
    assert (done.ok, done.error) == (False, "timed out")


async def test_each_attempt_is_cut_at_its_own_deadline() -> None:
    """One timer serves every running attempt: an attempt that ended leaves it armed
    for a later one, which is cut at its own deadline, not earlier; attempts that hang
    together are all cut, and one that returns in time is not."""
    import anyio

    timeout_s = 0.2

    async def hang(job: FileJob) -> None:
        if job.file_id != "quick":
            await anyio.sleep_forever()

    run = _Run(hang, 1, timeout_s)
    assert (await run.execute(FileJob("b", "quick", "/x"))).ok  # arms the timer
    await anyio.sleep(timeout_s / 2)
    done: dict[str, Attempted] = {}

    async def one(file_id: str) -> None:
        done[file_id] = await run.execute(FileJob("b", file_id, "/x"))

    with anyio.fail_after(5):  # an attempt the timer missed would hang forever
        async with anyio.create_task_group() as tg:
            for file_id in ("late-1", "late-2", "quick"):
                tg.start_soon(one, file_id)
    assert done["quick"].ok
    for file_id in ("late-1", "late-2"):
        late = done[file_id]
        assert (late.ok, late.error) == (False, "timed out")
        assert late.duration_s is not None and late.duration_s >= timeout_s


async def test_a_stop_during_an_attempt_is_not_a_timeout() -> None:
    """Cancelled from outside (a stop), the attempt ends with the cancellation, never with
    a "timed out" failure."""
    import anyio

    started = anyio.Event()

    async def hang(job: FileJob) -> None:
        started.set()
        await anyio.sleep_forever()

    results: list[Attempted] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            results.append(await _executor(hang, attempts=1, timeout_s=30).execute(JOB))

        tg.start_soon(run)
        await started.wait()
        tg.cancel_scope.cancel()
    assert results == [], "the stop's cancellation went on; no final word was made"


async def test_a_handler_that_outlives_its_timer_leaves_no_cancellation_behind() -> None:
    """A handler that swallows the timeout's cancellation and returns keeps its result,
    and no cancellation is left pending for the worker's next await."""
    import asyncio

    async def stubborn(job: FileJob) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "late"
        return "on time"

    done = await _executor(stubborn, attempts=1, timeout_s=0.05).execute(JOB)
    assert (done.ok, done.result) == (True, '"late"')
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # would raise CancelledError if a cancellation were pending


async def test_sync_handler_timeout_abandons_its_thread() -> None:
    """A blocking handler is cut at the timeout; its thread is left to finish alone."""
    import threading

    release = threading.Event()

    def block(job: FileJob) -> None:
        release.wait(5)

    try:
        done = await _executor(block, attempts=1, timeout_s=0.05).execute(JOB)
    finally:
        release.set()
    assert (done.ok, done.error) == (False, "timed out")


async def test_thread_killing_handler_is_a_failure() -> None:
    """SystemExit raised in the handler's thread fails the file, not the service."""

    def exits(job: FileJob) -> None:
        raise SystemExit(3)

    done = await _executor(exits, attempts=1).execute(JOB)
    assert done.error == "handler crashed its thread: SystemExit: 3"


async def test_unserializable_result_fails_the_file() -> None:
    """A result JSON cannot hold is a failure with the reason."""
    done = await _executor(lambda job: {"when": object()}, attempts=1).execute(JOB)
    assert not done.ok and "not JSON-serializable" in (done.error or "")


async def test_declined_retry_ends_without_a_word() -> None:
    """When the next attempt cannot be recorded, the executor stops and says nothing."""
    seen: list[int] = []

    def broken(job: FileJob) -> None:
        seen.append(job.attempt)
        raise OSError("disk")

    async def declined(job: FileJob) -> FileJob | None:
        return None

    executor = Executor(broken, timeout_s=1.0, max_attempts=3, threads=2)
    assert await executor.execute(JOB, declined) is None
    assert seen == [1]


def test_to_json_rejects_nul_and_nan() -> None:
    """Values Postgres jsonb refuses are rejected before the write."""
    with pytest.raises(ValueError, match="NUL"):
        to_json({"s": "a\x00b"})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        to_json({"x": float("nan")})
    assert to_json(None) is None


def test_backoff_grows_and_is_capped() -> None:
    """Delays double per attempt, stay within jitter bounds and never pass the cap."""
    assert retry_delay_s(1, lambda: 1.0) == pytest.approx(0.2)
    assert retry_delay_s(2, lambda: 0.0) == pytest.approx(0.2)
    assert retry_delay_s(30, lambda: 1.0) == pytest.approx(10.0)


def test_describe_strips_nul_and_bounds_length() -> None:
    """Error text is storable: no NUL byte, at most 2000 characters."""
    text = describe(ValueError("x\x00" + "y" * 5000))
    assert "\x00" not in text and len(text) == 2000


def test_outcome_columns_send_a_column_of_nulls_as_one_null() -> None:
    """Results and errors that are all NULL go as NULL; a column with one value goes whole."""
    ok = Attempted(True, None, None, 0.1, 1)
    failed = Attempted(False, None, "boom", 0.2, 2)
    expected = (["b", "b"], ["f1", "f2"], [True, True], None, None, [0.1, 0.1], [1, 1])
    assert outcome_columns([("b", "f1", ok), ("b", "f2", ok)]) == expected
    columns = outcome_columns([("b", "f1", ok), ("b", "f2", failed)])
    assert columns[3] is None and columns[4] == [None, "boom"]
