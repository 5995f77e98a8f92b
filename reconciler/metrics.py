"""Every metric of the contract, defined once.

Actors update these from the code paths that do the work. The batch gauges are read
from the database, so every replica reports the same truth: aggregate them with max.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, cast

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

TRIGGERS: Final = ("event", "sweep", "demand", "deadline", "operator")
OPERATOR_ACTION_NAMES: Final = ("cancel", "retry_failed")
DEAD_LETTER_REASONS: Final = ("malformed", "unknown_batch")
ACTORS: Final = ("consumer", "detector", "finalizer", "sweeper", "monitor", "delivery", "api")
SINKS: Final = ("webhook", "hook")
DELIVERY_OUTCOMES: Final = ("delivered", "failed", "dead")
SWEEP_REPAIR_KINDS: Final = (
    "finalized",
    "deadline",
    "lease_reclaimed",
    "lease_exhausted",
    "requeued",
    "retention_deleted",
)
_LATENCY_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip

BATCHES_STUCK: Final = Gauge(
    "reconciler_batches_stuck",
    "Batches whose every file is terminal but which are not finalized after the grace period.",
)
BATCHES_IN_PROGRESS: Final = Gauge("reconciler_batches_in_progress", "Batches not yet finalized.")
OLDEST_UNFINALIZED_AGE: Final = Gauge(
    "reconciler_oldest_unfinalized_batch_age_seconds",
    "Age of the oldest batch not yet finalized, 0 when none.",
)
FINALIZATIONS: Final = Counter(
    "reconciler_finalizations",
    "Finalization attempts by what woke them and what came of it.",
    ["trigger", "outcome"],
)
FINALIZATION_LATENCY: Final = Histogram(
    "reconciler_finalization_latency_seconds",
    "From a batch's last file completion to its finalization commit.",
    ["trigger"],
    buckets=_LATENCY_BUCKETS_S,
)
# How the client writes a bucket's `le` label (untyped in prometheus-client).
_go_float: Final = cast(Callable[[float], str], floatToGoString)


class AttemptTally:
    """`reconciler_files_processed_total` and `reconciler_file_processing_seconds`,
    kept as plain numbers and read by the registry at each scrape.

    They move once per file: prometheus-client's Counter and Histogram take a lock per
    update (three per file, 2.3 us against 0.3 here). The executor updates them from the
    event loop's thread alone. A scrape may read them from another thread: each number
    is read whole, and one taken during an update may show a bucket moved before the
    sum, as the client's own histogram may across its separately locked buckets.
    """

    OUTCOMES: Final = ("succeeded", "failed", "retried")

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = (*buckets, math.inf)
        self._labels = [_go_float(b) for b in self._bounds]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._outcomes = dict.fromkeys(self.OUTCOMES, 0)
        self._created = time.time()

    def attempted(self, seconds: float, outcome: str) -> None:
        """One attempt's handler time, and what came of it."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds
        self._outcomes[outcome] += 1

    def collect(self) -> Iterator[Metric]:
        files = CounterMetricFamily(
            "reconciler_files_processed",
            "File attempts by outcome: succeeded, failed (final) or retried.",
            labels=["outcome"],
        )
        for outcome, count in self._outcomes.items():
            files.add_metric([outcome], count, created=self._created)
        yield files
        seconds = HistogramMetricFamily(
            "reconciler_file_processing_seconds", "Handler time per file attempt."
        )
        cumulative = list(itertools.accumulate(self._counts))
        seconds.add_metric([], list(zip(self._labels, cumulative, strict=True)), self._sum)
        seconds.samples.append(
            Sample("reconciler_file_processing_seconds_created", {}, self._created)
        )
        yield seconds


ATTEMPTS: Final = AttemptTally(_LATENCY_BUCKETS_S)
REGISTRY.register(ATTEMPTS)

JOBS_REDELIVERED: Final = Counter(
    "reconciler_jobs_redelivered", "Jobs claimed back from a consumer that stopped."
)
JOBS_DEAD_LETTERED: Final = Counter(
    "reconciler_jobs_dead_lettered", "Jobs moved to the dead-letter stream.", ["reason"]
)
QUEUE_PENDING: Final = Gauge(
    "reconciler_queue_pending_jobs", "Jobs on the stream not yet acknowledged."
)
SWEEP_DURATION: Final = Histogram(
    "reconciler_sweep_duration_seconds", "Time of one sweeper pass.", buckets=_LATENCY_BUCKETS_S
)
SWEEP_REPAIRS: Final = Counter(
    "reconciler_sweep_repairs",
    "Repairs made by the sweeper, by kind.",
    ["kind"],
)
ACTOR_RESTARTS: Final = Counter(
    "reconciler_actor_restarts", "Actors restarted after a crash.", ["actor"]
)

DELIVERIES: Final = Counter(
    "reconciler_deliveries",
    "Delivery attempts by sink and outcome: delivered, failed (due again) or dead (given up).",
    ["sink", "outcome"],
)
DELIVERY_LATENCY: Final = Histogram(
    "reconciler_delivery_latency_seconds",
    "From a batch's finalization to its event acknowledged by a sink.",
    ["sink"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 259200),
)
OLDEST_UNDELIVERED_AGE: Final = Gauge(
    "reconciler_oldest_undelivered_event_age_seconds",
    "Age of the oldest event not yet delivered to one of its sinks, 0 when none.",
)

OPERATOR_ACTIONS: Final = Counter(
    "reconciler_operator_actions",
    "Operator actions that took effect (cancel, retry_failed), each with an audit row.",
    ["action"],
)

RETENTION_DELETED: Final = Counter(
    "reconciler_retention_deleted",
    "Finalized batches deleted by retention (RECONCILER_RETENTION_DAYS), with all their rows.",
)


def preinitialize() -> None:
    """Exports every label combination at zero so dashboards and rates start at once."""
    for trigger in TRIGGERS:
        FINALIZATION_LATENCY.labels(trigger)
        for outcome in (
            "finalized", "not_ready", "busy", "already_finalized", "not_found", "error",
        ):  # fmt: skip
            FINALIZATIONS.labels(trigger, outcome)
    for kind in SWEEP_REPAIR_KINDS:
        SWEEP_REPAIRS.labels(kind)
    for reason in DEAD_LETTER_REASONS:
        JOBS_DEAD_LETTERED.labels(reason)
    for actor in ACTORS:
        ACTOR_RESTARTS.labels(actor)
    for action in OPERATOR_ACTION_NAMES:
        OPERATOR_ACTIONS.labels(action)
    for sink in SINKS:
        DELIVERY_LATENCY.labels(sink)
        for outcome in DELIVERY_OUTCOMES:
            DELIVERIES.labels(sink, outcome)
