"""Output: one JSON line on stdout per run; notes and progress bars on stderr."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_stderr = Console(stderr=True)


def emit(result: dict[str, Any]) -> None:
    """The run's one line of JSON on stdout."""
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    _stderr.print(f"[dim]bench:[/dim] {message}", highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr; yields `update(completed)`."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=_stderr) as bar:
        task = bar.add_task(label, total=total)
        yield lambda completed: bar.update(task, completed=completed)


def spread_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, min, p90 and max of durations given in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "median": ms(statistics.median(ordered)),
        "min": ms(ordered[0]),
        "p90": ms(p90),
        "max": ms(ordered[-1]),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    """p50, p99 (nearest rank), max and n of the values, rounded to 0.001."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "p50": round(rank(0.5), 3),
        "p99": round(rank(0.99), 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }
