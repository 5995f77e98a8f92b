"""The console's server-drawn charts: scaling, gaps and lone points."""

from __future__ import annotations

from reconciler.console import charts


def test_values_scale_to_the_peak_and_a_gap_breaks_the_line() -> None:
    """The peak touches the top, zero the bottom; None splits the polyline in two."""
    chart = charts.line([0.0, 2.0, None, 1.0, 2.0], "files/s")
    assert chart.peak == 2.0 and chart.last == 2.0
    assert len(chart.lines) == 2 and chart.dots == ()
    first = [tuple(map(float, p.split(","))) for p in chart.lines[0].split()]
    assert first[0][1] == charts.HEIGHT - charts.PAD  # zero at the bottom
    assert first[1][1] == charts.PAD  # the peak at the top


def test_a_lone_value_is_a_dot_and_no_data_is_an_empty_chart() -> None:
    """One known value between gaps draws a dot; all gaps draw nothing and say so."""
    lone = charts.line([None, 3.0, None], "s")
    assert lone.lines == () and len(lone.dots) == 1 and lone.last is None
    empty = charts.line([None, None], "s")
    assert (empty.lines, empty.dots, empty.peak) == ((), (), 1.0)
