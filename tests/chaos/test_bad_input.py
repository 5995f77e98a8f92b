"""Scenario 6, the queue side: garbage on the job stream and handlers that raise, hang,
return what cannot be stored or crash their thread. Each ends as a dead letter or a
failed file with a readable reason, the consumer keeps going, the batch finalizes."""

from __future__ import annotations

import json
from typing import Any, Final

import pytest
import redis.asyncio as aioredis

from reconciler.app import Ports
from reconciler.config import Settings
from reconciler.jobs import MAX_JOB_BYTES
from tests.acceptance.processes import with_env
from tests.chaos.harness import (
    SIZE,
    Fleet,
    assert_nothing_lost_or_duplicated,
    report,
    settled_audit,
    started,
)
from tests.helpers import files, finalized, sql, submit, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
QUICK: Final = {"min_s": 0.001, "max_s": 0.005, "fail_rate": 0.0}
PIN_TIMEOUT_S: Final = 10.0  # a file ends within 1.5 s: 2 attempts of 0.5 s, backoff


def _job(**body: Any) -> dict[str, Any]:
    return {"job": json.dumps(body)}


GARBAGE: Final[dict[str, dict[str, Any]]] = {
    "not_json": {"job": "{not json"},
    "no_job_field": {"something": "else"},
    "missing_field": _job(batch_id="good", uri="mem://x"),
    "wrong_types": {"job": json.dumps({"batch_id": 7, "file_id": ["x"], "uri": None})},
    "not_an_object": {"job": "[1, 2, 3]"},
    "unknown_field": _job(batch_id="good", file_id="f00000", uri="mem://f0", extra=1),
    "not_utf8": {"job": b"\xff\xfe{\x00"},
    "oversized": {"job": "x" * (MAX_JOB_BYTES + 1)},
    "oversized_json": _job(batch_id="good", file_id="big", uri="u", payload="x" * MAX_JOB_BYTES),
    "unknown_batch": _job(batch_id="no-such-batch", file_id="f", uri="mem://f"),
    "unknown_file": _job(batch_id="good", file_id="no-such-file", uri="mem://f"),
}
UNSTORABLE_IDS: Final[dict[str, dict[str, Any]]] = {
    "nul_in_id": {"job": '{"batch_id": "good", "file_id": "a\\u0000b", "uri": "u"}'},
    "lone_surrogate_in_id": {"job": '{"batch_id": "good\\ud800", "file_id": "f", "uri": "u"}'},
}
SYNC_EXPECTED: Final = {
    "ok": ("succeeded", None),
    "raise": ("failed", "ValueError: row 7: bad amount"),
    "raise_timeout": ("failed", "timed out"),
    "hang": ("failed", "timed out"),
    "result_set": ("failed", "not JSON-serializable"),
    "result_object": ("failed", "not JSON-serializable"),
    "result_nan": ("failed", "not JSON-serializable"),
    "result_nul": ("failed", "NUL character"),
    "result_huge": ("failed", "bytes, more than"),
    "result_deep": ("failed", "RecursionError"),
    "system_exit": ("failed", "handler crashed its thread: SystemExit"),
    "keyboard_interrupt": ("failed", "handler crashed its thread: KeyboardInterrupt"),
    "base_exception": ("failed", "handler crashed its thread: Crash: thread killed"),
}
ASYNC_EXPECTED: Final = {
    key: SYNC_EXPECTED[key]
    for key in ("ok", "raise", "raise_timeout", "hang", "result_set", "result_nan", "result_huge")
}


async def _xadd(redis_url: str, stream: str, entries: dict[str, dict[str, Any]]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        for fields in entries.values():
            await client.xadd(stream, fields)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def _dead_reasons(redis_url: str, stream: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: Any = await client.xrange(stream)
    finally:
        await client.aclose()
    return [fields[b"reason"].decode() for _, fields in entries]


async def _wait_finalized(settings: Settings, batch_id: str) -> None:
    await wait_for(
        lambda: finalized(settings, batch_id), timeout_s=PIN_TIMEOUT_S, what=f"batch {batch_id}"
    )


async def _outcomes(settings: Settings, batch_id: str) -> dict[str, tuple[str, str | None]]:
    rows = await sql(
        settings.database_url or "",
        "SELECT file_id, status, error FROM batch_files WHERE batch_id = $1",
        batch_id,
    )
    return {r["file_id"]: (r["status"], r["error"]) for r in rows}


async def _garbage_run(
    settings: Settings, ports: Ports, fleet: Fleet, garbage: dict[str, dict[str, Any]]
) -> list[str]:
    """A good batch with garbage around its jobs; returns the dead-letter reasons."""
    await _xadd(settings.redis_url or "", ports.queue.stream, garbage)
    await submit(ports, files(SIZE.files, QUICK), batch_id="good")
    await _xadd(settings.redis_url or "", ports.queue.stream, garbage)
    await started(fleet.start(0))
    await wait_for(lambda: finalized(settings, "good"), timeout_s=PIN_TIMEOUT_S, what="good")
    await submit(ports, files(SIZE.files, QUICK), batch_id="after")
    await wait_for(lambda: finalized(settings, "after"), timeout_s=PIN_TIMEOUT_S, what="after")
    found = await settled_audit(
        settings.database_url or "", settings.redis_url or "", settings.namespace, 10
    )
    assert_nothing_lost_or_duplicated(found)
    return await _dead_reasons(settings.redis_url or "", ports.queue.dead)


async def test_garbage_stream_entries_are_dead_lettered_and_work_goes_on(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Entries that are not JSON, miss or mistype fields, are over 1 MiB or name unknown
    batches or files: each is dead-lettered with a reason, the good batches finalize."""
    reasons = await _garbage_run(settings, ports, fleet, GARBAGE)
    report("bad_stream_entries", faults=f"{2 * len(GARBAGE)} garbage entries",
           dead_letters=len(reasons))  # fmt: skip
    assert len(reasons) == 2 * len(GARBAGE)
    assert all(reason.strip() for reason in reasons)
    text = "\n".join(reasons)
    for expected in (
        "not JSON",
        "no 'job' field",
        "must be a non-empty string",
        "must be a JSON object",
        "unknown fields",
        "more than",
        "no such batch",
    ):
        assert expected in text, expected  # fmt: skip


async def test_entries_with_unstorable_ids_are_dead_lettered(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Jobs whose ids hold a NUL or a lone surrogate: dead-lettered, and the good jobs read
    alongside them still run."""
    reasons = await _garbage_run(settings, ports, fleet, UNSTORABLE_IDS)
    assert len(reasons) == 2 * len(UNSTORABLE_IDS)


async def _handler_run(
    settings: Settings, ports: Ports, fleet: Fleet, handler: str, behaviours: list[str]
) -> dict[str, tuple[str, str | None]]:
    """One file per behaviour, then a plain batch: returns the first batch's outcomes."""
    fleet.env = with_env(
        fleet.env, RECONCILER_HANDLER=f"tests.chaos.handlers:{handler}",
        RECONCILER_FILE_TIMEOUT_S="0.5", RECONCILER_MAX_ATTEMPTS="2",
    )  # fmt: skip
    for do in behaviours:
        await submit(ports, files(1, {"do": do}, prefix=do), batch_id=f"bad-{do}")
    await started(fleet.start(0))
    for do in behaviours:
        await _wait_finalized(settings, f"bad-{do}")
    await submit(ports, files(3, {"do": "ok"}), batch_id="after")
    await _wait_finalized(settings, "after")
    found: dict[str, tuple[str, str | None]] = {}
    for do in behaviours:
        found.update(await _outcomes(settings, f"bad-{do}"))
    return found


def _check(outcomes: dict[str, tuple[str, str | None]], expected: dict[str, Any]) -> None:
    for do, (status, reason) in expected.items():
        got_status, got_error = outcomes[f"{do}00000"]
        assert got_status == status, (do, got_status, got_error)
        assert reason is None or reason in (got_error or ""), (do, got_error)


async def test_misbehaving_sync_handlers_fail_their_files_with_a_reason(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Sync handlers that raise, hang, return unstorable results or kill their thread:
    each file fails with a readable reason, every batch finalizes, work goes on."""
    outcomes = await _handler_run(settings, ports, fleet, "sync_misbehave", list(SYNC_EXPECTED))
    report("bad_sync_handlers", faults=f"{len(SYNC_EXPECTED)} handler behaviours",
           failed=sum(1 for s, _ in outcomes.values() if s == "failed"))  # fmt: skip
    _check(outcomes, SYNC_EXPECTED)


async def test_misbehaving_async_handlers_fail_their_files_with_a_reason(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """Async handlers that raise, hang or return unstorable results: each file fails with
    a readable reason and every batch finalizes."""
    outcomes = await _handler_run(settings, ports, fleet, "async_misbehave", list(ASYNC_EXPECTED))
    _check(outcomes, ASYNC_EXPECTED)


@pytest.mark.parametrize(
    ("handler", "behaviours"),
    [
        ("async_misbehave", ["system_exit", "cancelled", "base_exception"]),
        ("sync_misbehave", ["raise_unprintable"]),
    ],
)
async def test_handlers_escaping_the_executor_fail_only_their_file(
    settings: Settings, ports: Ports, fleet: Fleet, handler: str, behaviours: list[str]
) -> None:
    """A handler raising what is not an Exception, or an exception without text: its file
    fails, the replica keeps running, and the next batch finalizes."""
    outcomes = await _handler_run(settings, ports, fleet, handler, behaviours)
    assert {status for status, _ in outcomes.values()} == {"failed"}


async def test_undecodable_text_from_a_handler_is_stored_or_fails_the_file(
    settings: Settings, ports: Ports, fleet: Fleet
) -> None:
    """A lone surrogate in a handler's error or result: the file still ends (failed or
    succeeded), and the batch finalizes."""
    behaviours = ["raise_undecodable", "result_undecodable"]
    outcomes = await _handler_run(settings, ports, fleet, "sync_misbehave", behaviours)
    assert {status for status, _ in outcomes.values()} <= {"failed", "succeeded"}
