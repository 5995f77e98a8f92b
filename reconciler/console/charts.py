"""Small line charts as SVG drawn on the server: no script, no library, no network.

A chart is a list of polylines in a fixed viewBox; a gap in the data (a minute with
nothing finalized, for a latency) breaks the line instead of drawing a false zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

WIDTH: Final = 600
HEIGHT: Final = 120
PAD: Final = 4  # keeps the stroke inside the box at the extremes


@dataclass(frozen=True, slots=True)
class Chart:
    lines: tuple[str, ...]  # each an SVG `points` attribute
    dots: tuple[tuple[float, float], ...]  # lone values, between two gaps
    peak: float  # the value the top of the box stands for
    last: float | None  # the newest value, None when the last step has no data
    unit: str
    width: int = WIDTH
    height: int = HEIGHT


def line(values: Sequence[float | None], unit: str) -> Chart:
    """Values oldest first, evenly spaced across the width; None is a gap."""
    known = [v for v in values if v is not None]
    peak = max(known, default=0.0) or 1.0
    step = (WIDTH - 2 * PAD) / max(1, len(values) - 1)
    runs: list[list[tuple[float, float]]] = [[]]
    for index, value in enumerate(values):
        if value is None:
            runs.append([])
            continue
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * value / peak
        runs[-1].append((round(PAD + index * step, 1), round(y, 1)))
    lines = tuple(" ".join(f"{x},{y}" for x, y in run) for run in runs if len(run) > 1)
    dots = tuple(run[0] for run in runs if len(run) == 1)
    return Chart(lines, dots, peak, values[-1] if values else None, unit)
