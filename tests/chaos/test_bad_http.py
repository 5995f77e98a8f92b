"""Scenario 6, the HTTP side: ids with SQL metacharacters, unicode, 10 kB ids and huge
bodies against a real replica: no 5xx, and a rejected request writes nothing.
(Schemathesis over the whole OpenAPI document lives in tests/api.)"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final
from urllib.parse import quote

import httpx
import pytest

from reconciler.config import Settings
from reconciler.jobs import MAX_JOB_BYTES
from tests.chaos.harness import SIZE, Fleet, queue_counts, started
from tests.helpers import sql, wait_for

pytestmark = pytest.mark.timeout(SIZE.test_timeout_s)
HUGE_BYTES: Final = 20 * 1024 * 1024  # past the 16 MiB body cap
TEN_KB: Final = 10 * 1024
STORED_AS_SENT: Final = [
    "'; DROP TABLE batches; --",
    "x' OR '1'='1",
    'quote " and \\ backslash',
    "$1 %s %% _ * ? ; -- # @",
    "批次-🧪-çà",
    "e\u0301",  # NFD: must stay distinct from the NFC one below
    "\u00e9",
    "\u202eright-to-left",
    "zero\u200bwidth",
    "👩\u200d👩\u200d👧",
]


@pytest.fixture
async def http(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    port = await started(fleet.start(0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client


def _batch(batch_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"files": [{"file_id": "f", "uri": "mem://f"}], **fields}
    if batch_id is not None:
        body["batch_id"] = batch_id
    return body


async def _written(settings: Settings) -> tuple[int, int, int, int]:
    rows = await sql(
        settings.database_url or "",
        "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batch_files),"
        " (SELECT count(*) FROM run_summaries)",
    )
    _, length = await queue_counts(settings.redis_url or "", settings.namespace)
    return int(rows[0][0]), int(rows[0][1]), int(rows[0][2]), length


def _rejected_bodies() -> Iterator[tuple[str, bytes]]:
    """(what, raw JSON body) pairs that must be refused with a 4xx."""
    long_id = "i" * TEN_KB
    yield "10 kB batch_id", json.dumps(_batch(long_id)).encode()
    yield "10 kB run_id", json.dumps(_batch(run_id=long_id)).encode()
    yield "10 kB file_id", json.dumps({"files": [{"file_id": long_id, "uri": "u"}]}).encode()
    yield "NUL in batch_id", json.dumps(_batch("a\x00b")).encode()
    yield "slash in batch_id", json.dumps(_batch("a/b")).encode()
    yield "lone surrogate", b'{"batch_id": "a\\ud800", "files": []}'
    yield "deep metadata", ('{"files": [], "metadata": ' + "[" * 2000 + "]" * 2000 + "}").encode()
    yield "not JSON", b"{'files': []"
    yield "wrong types", b'{"batch_id": 5, "files": "none"}'
    yield "huge number", b'{"files": [], "deadline_s": 1e999}'
    yield "huge body", json.dumps(_batch(metadata={"x": "y" * HUGE_BYTES})).encode()


async def test_hostile_ids_are_stored_as_sent_and_read_back(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """Ids full of SQL metacharacters and unicode are data: stored verbatim, read back."""
    for batch_id in STORED_AS_SENT:
        created = await http.post("/api/batches", json=_batch(batch_id))
        assert created.status_code == 201, (batch_id, created.text)
        path = f"/api/batches/{quote(batch_id, safe='')}"
        read = await http.get(path)
        assert read.status_code == 200 and read.json()["batch_id"] == batch_id
        assert (await http.get(path + "/explain")).status_code == 200
    rows = await sql(settings.database_url or "", "SELECT batch_id FROM batches")
    assert sorted(r[0] for r in rows) == sorted(STORED_AS_SENT)


async def test_hostile_bodies_get_4xx_and_write_nothing(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """10 kB ids, NUL, slashes, lone surrogates, deep nesting, garbage, 20 MB bodies: a 4xx
    with a JSON error, and not one row or job written."""
    before = await _written(settings)
    for what, raw in _rejected_bodies():
        answer = await http.post(
            "/api/batches", content=raw, headers={"content-type": "application/json"}
        )
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:300])
        assert set(answer.json()) == {"error", "detail"}, what
    chunked = await http.post("/api/batches", content=_chunks(HUGE_BYTES))
    assert chunked.status_code == 413
    for path in (f"/api/batches/{'i' * TEN_KB}", f"/api/batches/{'i' * TEN_KB}/summary"):
        assert (await http.get(path)).status_code == 422
    assert await _written(settings) == before


async def _chunks(total: int) -> AsyncIterator[bytes]:
    """A body with no Content-Length, sent in pieces."""
    yield b'{"files": [], "metadata": {"x": "'
    piece = b"y" * 65536
    for _ in range(total // len(piece)):
        yield piece
    yield b'"}}'


async def test_a_file_id_of_1024_wide_characters_is_a_4xx(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """1024 four-byte characters fit the documented file_id limit: 201, or a 422 that
    writes nothing, never a 500."""
    rng = random.Random(7)
    wide = "".join(chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(1024))
    before = await _written(settings)
    answer = await http.post("/api/batches", json={"files": [{"file_id": wide, "uri": "u"}]})
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert await _written(settings) == before


async def test_a_payload_too_big_for_a_job_is_refused_or_fails_its_file(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """A 1 MiB payload: refused with a 4xx that writes nothing, or accepted and its batch
    finalizes with the file failed for a readable reason."""
    body = {
        "batch_id": "big",
        "files": [{"file_id": "f", "uri": "u", "payload": "x" * MAX_JOB_BYTES}],
    }
    before = await _written(settings)
    answer = await http.post("/api/batches", json=body)
    if 400 <= answer.status_code < 500:
        assert await _written(settings) == before
        return
    assert answer.status_code == 201
    await wait_for(lambda: _finalized(http, "big"), timeout_s=15, what="the big batch")


async def _finalized(http: httpx.AsyncClient, batch_id: str) -> bool:
    progress = (await http.get(f"/api/batches/{batch_id}")).json()
    return bool(progress["status"] != "processing")
