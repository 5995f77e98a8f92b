"""Samples a running service with py-spy, and reads the stacks it wrote.

`record` runs py-spy beside the service for the length of a benchmark; `summarize`
turns py-spy's collapsed-stack output (`--format raw`) into the functions where the
time goes, by own time and by time including callees.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from bench.errors import BenchError
from bench.report import note

SAMPLE_RATE_HZ: Final = 100
STOP_TIMEOUT_S: Final = 60.0
_LINE_NUMBER: Final = re.compile(r":\d+\)$")
# Leaves where the loop waits: a native profile's kernel waits, and in a Python-only
# profile uvloop's run loop itself (perf puts uvloop's own code at ~3 % of on-CPU time,
# so such samples are nearly all epoll waits).
IDLE_LEAVES: Final = (
    "epoll_pwait (", "epoll_wait (", "futex", "__futex", "pthread_cond_",
    "Runner.run (asyncio/runners.py)",
)  # fmt: skip


def py_spy() -> str:
    """py-spy next to this Python (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy not found: install it with `.venv/bin/pip install py-spy`")
    return found


@contextmanager
def record(
    pid: int,
    output: Path | None,
    fmt: str = "raw",
    native: bool = False,
    rate_hz: int = SAMPLE_RATE_HZ,
) -> Iterator[None]:
    """Samples `pid` until the block ends (SIGINT makes py-spy write its file).

    Python frames only are sampled without pausing the process; `native` adds the C and
    Cython frames (uvloop, asyncpg's protocol), which needs a short pause per sample.
    """
    if output is None:
        yield
        return
    command = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate_hz),
               "--format", fmt, "--output", str(output),
               "--native" if native else "--nonblocking"]  # fmt: skip
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=STOP_TIMEOUT_S)
        note(f"profile of pid {pid} written to {output} ({err.decode().strip()[-200:]})")


def summarize(stacks: Path, top: int, focus: str = "") -> dict[str, Any]:
    """Top functions by own samples and by samples including callees, in % of busy ones.

    Samples whose leaf is an idle wait (a native profile's epoll_pwait) are counted
    apart. `focus` keeps only the functions whose name or file contains it in the lists
    (say `reconciler/`), still as a share of every busy sample.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = idle = 0
    for frames, count in _read(stacks):
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        packages[package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if focus:
        own = Counter({k: v for k, v in own.items() if focus in k})
        inclusive = Counter({k: v for k, v in inclusive.items() if focus in k})
    return {
        "samples": total + idle,
        "idle_samples": idle,
        "busy_samples": total,
        "own_by_package": _ranked(packages, total, top),
        "own": _ranked(own, total, top),
        "inclusive": _ranked(inclusive, total, top),
    }


def package(frame: str) -> str:
    """`f (anyio/_core/_tasks.py)` is in anyio; `write (libc.so.6)` in libc.so.6."""
    where = frame[frame.rfind("(") + 1 :].rstrip(")")
    return where.split("/", 1)[0].removesuffix(".py")


def _read(stacks: Path) -> Iterator[tuple[list[str], int]]:
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")], int(count)


def _ranked(counts: Counter[str], total: int, top: int) -> list[dict[str, Any]]:
    return [
        {"function": name, "pct": round(100 * n / total, 1), "samples": n}
        for name, n in counts.most_common(top)
    ]
