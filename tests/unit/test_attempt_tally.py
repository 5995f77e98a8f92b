"""The attempt tally scrapes as the Counter and Histogram it replaces would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.metrics import AttemptTally


def _scraped(tally: AttemptTally) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(tally)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_each_attempt_lands_in_its_bucket_and_outcome() -> None:
    """A bound is inclusive (0.5 counts under le=0.5); past the last bound is +Inf only."""
    tally = AttemptTally((0.1, 0.5))
    for seconds, outcome in ((0.05, "succeeded"), (0.5, "failed"), (0.7, "retried")):
        tally.attempted(seconds, outcome)
    tally.attempted(0.1, "succeeded")
    name = "reconciler_file_processing_seconds"
    assert _scraped(tally) == {
        ("reconciler_files_processed_total", (("outcome", "succeeded"),)): 2,
        ("reconciler_files_processed_total", (("outcome", "failed"),)): 1,
        ("reconciler_files_processed_total", (("outcome", "retried"),)): 1,
        (f"{name}_bucket", (("le", "0.1"),)): 2,
        (f"{name}_bucket", (("le", "0.5"),)): 3,
        (f"{name}_bucket", (("le", "+Inf"),)): 4,
        (f"{name}_count", ()): 4,
        (f"{name}_sum", ()): 0.05 + 0.5 + 0.7 + 0.1,
    }


def test_a_fresh_tally_exports_every_outcome_at_zero() -> None:
    """Dashboards and rates start at once, as with the labels preinitialized."""
    scraped = _scraped(AttemptTally((1.0,)))
    outcomes = {k[1][0][1]: v for k, v in scraped.items() if k[0].endswith("processed_total")}
    assert outcomes == {"succeeded": 0, "failed": 0, "retried": 0}
