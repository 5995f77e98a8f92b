"""The invariants every run of the sweep must leave holding, whatever call failed.

Each check returns Violations naming the invariant, a short stable `kind` (what the
summary groups by) and the detail; the run label says the mode, N and the call at N.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final

from reconciler import reasons
from tests.faults import handlers
from tests.faults.handlers import HandlerRun
from tests.faults.scenario import (
    LETTERS,
    MAX_ATTEMPTS,
    RunRecord,
    prunable_since,
    special_file,
    swept_since,
)

HANDLER_ERROR: Final = f"RuntimeError: {handlers.FAILURE_MESSAGE}"


@dataclass(frozen=True)
class Violation:
    invariant: str
    kind: str
    run: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.run} {self.kind}: {self.detail}"


def check(record: RunRecord) -> list[Violation]:
    """Every violation of I1-I6 (and of non-vacuity) in one run."""
    found: list[tuple[str, str, str]] = [
        *_harness(record),
        *_finalized_once(record),
        *_counted_once(record),
        *_allowed_failures(record),
        *_attempts(record),
        *_nothing_left(record),
        *_delivered(record),
        *_not_vacuous(record),
    ]
    label = record.label()
    return [Violation(inv, kind, label, detail) for inv, kind, detail in found]


Found = Iterator[tuple[str, str, str]]


def _harness(record: RunRecord) -> Found:
    for error in record.errors:
        yield "H", "harness", error
    if record.left_before_stop:
        yield "I5", "never settled", f"left before the stop: {record.left_before_stop}"


def _finalized_once(record: RunRecord) -> Found:
    for letter in LETTERS:
        batch = record.final.batches.get(letter)
        if batch is None:
            yield "I1", "batch missing", f"batch {letter} does not exist"
            continue
        if batch["status"] == "processing":
            yield "I1", "not finalized", f"batch {letter} is still processing"
        summaries = len(record.final.summaries.get(letter, []))
        if summaries != 1:
            yield "I1", "summary rows != 1", f"batch {letter} has {summaries} run_summaries rows"
        events = record.finalized_events[letter]
        if events > 1:
            yield "I1", "finalized twice", f"batch {letter}: {events} batch_finalized events"


def _counted_once(record: RunRecord) -> Found:
    for letter, batch in record.final.batches.items():
        rows = Counter(f["status"] for (b, _), f in record.final.files.items() if b == letter)
        ok, bad = batch["files_succeeded"], batch["files_failed"]
        if ok + bad != batch["total_files"]:
            yield "I2", "counters != total", f"{letter}: {ok} + {bad} != {batch['total_files']}"
        if (ok, bad) != (rows["succeeded"], rows["failed"]):
            detail = f"counters {ok}/{bad}, rows {rows['succeeded']}/{rows['failed']}"
            yield "I2", "counters != rows", f"{letter}: {detail}"
        for summary in record.final.summaries.get(letter, []):
            counts = (summary["files_succeeded"], summary["files_failed"])
            if counts != (rows["succeeded"], rows["failed"]):
                yield "I2", "summary != rows", f"{letter}: summary {counts}, rows {dict(rows)}"


def runs_by_file(journal: list[HandlerRun]) -> dict[tuple[str, str], list[HandlerRun]]:
    found: dict[tuple[str, str], list[HandlerRun]] = {}
    for run in journal:
        letter = run.batch_id.rsplit("-", 1)[1]
        found.setdefault((letter, run.file_id), []).append(run)
    return found


def _allowed_failures(record: RunRecord) -> Found:
    runs = runs_by_file(record.journal)
    for key, row in sorted(record.final.files.items()):
        yield from _file_outcome(key, row, len(runs.get(key, [])))


def _file_outcome(key: tuple[str, str], row: dict[str, Any], ran: int) -> Found:
    letter, file_id = key
    name, status, error = f"{letter}/{file_id}", row["status"], row["error"]
    lost_last = error == reasons.LAST_ATTEMPT_LOST and ran >= MAX_ATTEMPTS
    if status == "succeeded" and ran == 0:
        yield "I3", "succeeded without a handler run", name
    if letter == "C":
        if status not in ("succeeded", "failed") or (status == "failed" and error != _TIMED_OUT):
            yield "I3", "C file not succeeded/timed out", f"{name}: {status}, {error!r}"
    elif file_id == special_file("A"):
        if status != "failed" or not (error == HANDLER_ERROR or lost_last):
            yield "I3", "fail_always: wrong outcome", f"{name}: {status}, {error!r}, ran {ran}x"
    elif status != "succeeded" and not lost_last:
        yield "I3", "file failed", f"{name}: {status}, {error!r}, ran {ran}x"


_TIMED_OUT: Final = reasons.TIMED_OUT


def _attempts(record: RunRecord) -> Found:
    # Every generation but the last ended in a crash (the last is stopped gracefully).
    last = record.generations
    for (letter, file_id), runs in sorted(runs_by_file(record.journal).items()):
        name = f"{letter}/{file_id}"
        seen = [r.attempt for r in runs]
        # A crash while the file was in flight (running, between attempts, or done but
        # not yet written) may cost a run: count the crashed generations it ran in.
        crashes = len({r.generation for r in runs if r.generation < last})
        if len(runs) > MAX_ATTEMPTS + crashes:
            yield "I4", "too many handler runs", f"{name}: {len(runs)} runs, attempts {seen}"
        if not _increasing(runs):
            yield "I4", "attempts not increasing", f"{name}: attempts {seen}"
        elif sorted(set(seen)) != list(range(1, max(seen) + 1)):
            # An attempt is written only once its handler has started: none is skipped.
            yield "I4", "attempt spent without a run", f"{name}: attempts {seen}"


def _increasing(runs: list[HandlerRun]) -> bool:
    """Each attempt number is higher than the last, or repeats it across a crash only.

    An attempt is written after its handler starts (with its outcome, for a file done
    within one flush); a crash before that write runs the same attempt again.
    """
    for before, after in pairwise(runs):
        repeat_after_crash = (
            after.attempt == before.attempt and after.generation > before.generation
        )
        if after.attempt < before.attempt or (
            after.attempt == before.attempt and not repeat_after_crash
        ):
            return False
    return True


def _nothing_left(record: RunRecord) -> Found:
    final = record.final
    if final.pending:
        yield "I5", "pending entries", f"{final.pending} in the group after the stop"
    if final.queued:
        yield "I5", "queued members", f"{final.queued} in {{ns}}:queued after the stop"
    if final.stream_length:
        yield "I5", "stream entries", f"{final.stream_length} jobs still on the stream"
    if final.dead_letters != 1:
        # The scenario puts one garbage entry on the stream: dead-lettered once, no more.
        yield "I5", "dead letters != 1", f"{final.dead_letters} jobs dead-lettered"
    if record.stale_consumers:
        yield "I5", "stopped consumers before stop", ", ".join(record.stale_consumers)
    left = [c for c in final.consumers if _prunable(c, record)]
    if left:
        story = "; ".join(_story(record, name.split(" ", 1)[0]) for name in left)
        yield "I5", "consumers after graceful stop", f"{'; '.join(left)} | {story}"
    for (letter, file_id), row in sorted(final.files.items()):
        if row["status"] == "processing" or row["lease_expires_at"] is not None:
            detail = f"{row['status']}, lease {row['lease_expires_at']}"
            yield "I5", "file left in flight", f"{letter}/{file_id}: {detail}"


def _delivered(record: RunRecord) -> Found:
    """I6: each finalized batch has one event, delivered to the webhook and acknowledged
    by the receiver at least once (a crash between the 2xx and its record may repeat
    it; receivers deduplicate on the id), every request signed as the receiver checks."""
    final = record.final
    for letter in LETTERS:
        batch = final.batches.get(letter)
        if batch is None or batch["status"] == "processing":
            continue  # an I1 already
        events = final.deliveries.get(letter, [])
        if len(events) != 1:
            yield "I6", "events != 1", f"batch {letter} has {len(events)} events with deliveries"
            continue
        (event,) = events
        if event["state"] != "delivered":
            yield "I6", "not delivered", f"batch {letter}: delivery {event['state']}"
        if not final.acknowledged.get(event["event_id"]):
            yield "I6", "never acknowledged", f"batch {letter}: {event['event_id']}"
    for rejected in final.rejected:
        yield "I6", "signature rejected", rejected


def _prunable(consumer: str, record: RunRecord) -> bool:
    """Whether a consumer still listed after the last graceful stop should be gone.

    The last generation's stop removes its own consumer. A stopped generation's consumer
    is removed by a sweep once idle past the visibility timeout with nothing pending: it
    should be gone only if a sweep started after that and finished before the end. Its
    idle time at the end also counts the last stop, during which no sweep runs.
    """
    if f"(generation {record.generations})" in consumer:
        return True
    idle = re.search(r"idle=(\d+)ms", consumer)
    if idle is None:
        return True
    since = prunable_since(int(idle[1]), record.final.read_at, record.events)
    return swept_since(record.events, since)


_LIFECYCLE: Final = frozenset(
    "consumer_started consumer_stopped consumers_removed jobs_released leases_released"
    " release_failed release_gave_up actor_crashed".split()
)


def _story(record: RunRecord, consumer: str) -> str:
    """What the logs say about one consumer, to tell why it is still in the group."""
    told = [
        f"{e.get('event')}@gen{e.get('generation')}"
        for e in record.events
        if e.get("event") in _LIFECYCLE
        and (e.get("consumer") == consumer or consumer in str(e.get("consumers", "")))
    ]
    return f"{consumer}: {', '.join(told) or 'no log events'}"


def _not_vacuous(record: RunRecord) -> Found:
    # Only the clean run must show every behaviour: a faulted run may legitimately time
    # the slow file out before it starts, and a skipped attempt is already an I4.
    if record.spec.mode != "clean":
        return
    runs = runs_by_file(record.journal)
    once = [r.attempt for r in runs.get(("B", special_file("B")), [])]
    if not {1, 2} <= set(once):
        yield "V", "fail_once did not run attempts 1 and 2", f"B/b0 attempts {once}"
    if not runs.get(("C", special_file("C"))):
        yield "V", "slow file never ran", "C/c0 has no handler run"
    repeated = {i: n for i, n in record.final.acknowledged.items() if n != 1}
    if len(record.final.acknowledged) != len(LETTERS) or repeated:
        detail = f"{record.final.acknowledged}"
        yield "V", "clean run: not every event acknowledged once", detail
