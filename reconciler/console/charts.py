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
    lines: list[str] = []
    current: list[str] = []
    for index, value in enumerate(values):
        if value is None:
            _close(lines, current)
            current = []
            continue
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * value / peak
        current.append(f"{PAD + index * step:.1f},{y:.1f}")
    _close(lines, current)
    return Chart(tuple(lines), peak, values[-1] if values else None, unit)


def _close(lines: list[str], current: list[str]) -> None:
    if len(current) == 1:  # a lone point: a short flat stroke, so it shows
        x, y = current[0].split(",")
        current = [current[0], f"{float(x) + 2:.1f},{y}"]
    if current:
        lines.append(" ".join(current))
