"""Handlers the chaos runs point RECONCILER_HANDLER at.

`workload` is the realistic one: 1-50 ms of work, 5% of attempts fail, and every call
is appended to a journal file so a run can count how often each file really ran.
`sync_misbehave` and `async_misbehave` do whatever the payload's `do` says: raise,
hang forever, return something that cannot be stored, or crash their thread.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable
from typing import Any, Final

import anyio
import anyio.lowlevel

from reconciler.jobs import FileJob

RESULT_LIMIT_BYTES: Final = 256 * 1024
UNDECODABLE_NAME: Final = "report-\udcff.csv"  # what os.fsdecode makes of a non-UTF-8 name


def _spec(job: FileJob) -> dict[str, Any]:
    return job.payload if isinstance(job.payload, dict) else {}


def _journal(job: FileJob) -> None:
    """Appends one line per call; O_APPEND keeps lines whole across processes."""
    path = _spec(job).get("journal")
    if path:
        line = f"{job.batch_id}\t{job.file_id}\t{job.attempt}\t{os.getpid()}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


async def workload(job: FileJob) -> dict[str, Any]:
    """Works 1-50 ms (payload `min_s`/`max_s`), fails `fail_rate` of the attempts."""
    spec = _spec(job)
    _journal(job)
    await anyio.sleep(
        random.uniform(float(spec.get("min_s", 0.001)), float(spec.get("max_s", 0.05)))
    )
    if random.random() < float(spec.get("fail_rate", 0.05)):
        raise RuntimeError("chaos: injected failure")
    return {"files": 1}


class Unprintable(Exception):
    """An exception whose message cannot even be rendered."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ failed too")


class Crash(BaseException):
    """Neither an Exception nor an exit: what a thread killer might raise."""


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _raise(exc: BaseException) -> Any:
    raise exc


_BEHAVIOURS: Final[dict[str, Callable[[], Any]]] = {
    "ok": lambda: {"ok": 1},
    "raise": lambda: _raise(ValueError("row 7: bad amount")),
    "raise_unprintable": lambda: _raise(Unprintable()),
    "raise_undecodable": lambda: _raise(FileNotFoundError(f"not found: {UNDECODABLE_NAME}")),
    "raise_timeout": lambda: _raise(TimeoutError("upstream timed out")),
    "result_set": lambda: {"ids": {1, 2}},
    "result_object": lambda: object(),
    "result_nan": lambda: {"ratio": float("nan")},
    "result_nul": lambda: {"name": "a\x00b"},
    "result_huge": lambda: {"blob": "x" * (RESULT_LIMIT_BYTES + 1)},
    "result_deep": lambda: _nested(5000),
    "result_undecodable": lambda: {"name": UNDECODABLE_NAME},
    "system_exit": lambda: _raise(SystemExit(3)),
    "keyboard_interrupt": lambda: _raise(KeyboardInterrupt()),
    "base_exception": lambda: _raise(Crash("thread killed")),
}


def sync_misbehave(job: FileJob) -> Any:
    """Runs in a worker thread; `hang` blocks that thread forever."""
    do = str(_spec(job).get("do", "ok"))
    if do == "hang":
        threading.Event().wait()
    return _BEHAVIOURS[do]()


async def async_misbehave(job: FileJob) -> Any:
    """Runs on the event loop; `hang` never returns, `cancelled` raises CancelledError."""
    do = str(_spec(job).get("do", "ok"))
    if do == "hang":
        await anyio.sleep_forever()
    if do == "cancelled":
        raise asyncio.CancelledError("a library gave up")
    await anyio.lowlevel.checkpoint()
    return _BEHAVIOURS[do]()
