"""POST /api/batches, progress, explain and the list, over real HTTP to a running app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from structlog.testing import capture_logs

from reconciler.app import Ports, Role
from reconciler.batches import FileSpec
from reconciler.config import Settings
from tests.api.served import assert_error, body, serving
from tests.helpers import files, record, sql

# Bodies that must be refused with 422, each with a word the reason must contain.
INVALID_BODIES: list[tuple[str, Any, str]] = [
    ("empty file_id", {"files": [{"file_id": "", "uri": "u"}]}, "at least 1 character"),
    (
        "duplicate file ids",
        {"files": [{"file_id": "a", "uri": "u"}, {"file_id": "a", "uri": "v"}]},
        "duplicate file_id",
    ),
    ("file_id of the wrong type", {"files": [{"file_id": 5, "uri": "u"}]}, "valid string"),
    ("files not a list", {"files": {"file_id": "a"}}, "valid list"),
    ("files missing", {"batch_id": "b"}, "Field required"),
    ("unknown top-level field", {"files": [], "priority": 1}, "Extra inputs"),
    ("unknown file field", {"files": [{"file_id": "a", "uri": "u", "size": 1}]}, "Extra inputs"),
    ("negative deadline", {"files": [], "deadline_s": -1}, "greater than 0"),
    ("deadline as text", {"files": [], "deadline_s": "60"}, "valid number"),
    ("metadata not an object", {"files": [], "metadata": [1]}, "valid dictionary"),
    ("slash in batch_id", {"batch_id": "a/b", "files": []}, "pattern"),
    ("batch_id too long", {"batch_id": "b" * 257, "files": []}, "at most 256"),
    ("NUL in uri", {"files": [{"file_id": "a", "uri": "u\x00"}]}, "NUL"),
    ("NUL in payload", {"files": [{"file_id": "a", "uri": "u", "payload": "\x00"}]}, "NUL"),
    ("NUL in metadata key", {"files": [], "metadata": {"k\x00": 1}}, "NUL"),
    (
        "nested too deep",
        {"files": [], "metadata": {"m": json.loads("[" * 40 + "]" * 40)}},
        "deeper",
    ),
    ("body not an object", [1, 2], "valid dictionary"),
    ("file_id over 1024 bytes", {"files": [{"file_id": "\U0001f600" * 300, "uri": "u"}]}, "bytes"),
    (
        "job over 1 MiB",
        {"files": [{"file_id": "a", "uri": "u", "payload": "x" * 1024 * 1024}]},
        "more than 1048576",
    ),
]
# Bodies JSON encoders refuse to write, sent as raw text.
INVALID_TEXTS: list[tuple[str, str, str]] = [
    ("malformed JSON", '{"files": [', "JSON decode error"),
    ("NaN in payload", '{"files": [{"file_id": "a", "uri": "u", "payload": NaN}]}', "finite"),
    ("1e999 in metadata", '{"files": [], "metadata": {"x": 1e999}}', "finite"),
    (
        "lone surrogate",
        '{"files": [{"file_id": "a", "uri": "u", "payload": "\\ud800"}]}',
        "Unicode",
    ),
    ("lone surrogate in id", '{"files": [{"file_id": "\\udfff", "uri": "u"}]}', "Unicode"),
]
HOSTILE_IDS = [
    "' OR '1'='1",
    "x'; DROP TABLE batches; --",
    "ünïcødé ☃ 批次",
    "%00",
    "a%00b",
    "%ff%fe",
    "%2e%2e",
    "*",
    "\\",
    "b" * 10_000,
]


async def _count(settings: Settings, table: str) -> int:
    rows = await sql(settings.database_url or "", f"SELECT count(*) FROM {table}")
    return int(rows[0][0])


async def test_post_creates_201_and_same_files_again_is_200_creating_nothing(
    settings: Settings, ports: Ports
) -> None:
    """POST answers 201 with the batch; the same batch_id and files again 200, nothing new."""
    request = body(files(3), batch_id="nightly-1", metadata={"team": "data"})
    async with serving(settings, ports, Role.API) as api:
        created = await api.http.post("/api/batches", json=request)
        request["files"].reverse()  # the same files in another order are the same batch
        again = await api.http.post("/api/batches", json=request)
    assert created.status_code == 201, created.text
    assert again.status_code == 200, again.text
    batch = created.json()
    assert (batch["batch_id"], batch["status"], batch["total_files"]) == (
        "nightly-1",
        "processing",
        3,
    )
    assert batch["files_pending"] == 3 and batch["metadata"] == {"team": "data"}
    assert again.json()["batch_id"] == "nightly-1"
    assert (await _count(settings, "batches"), await _count(settings, "batch_files")) == (1, 3)
    assert await ports.queue.length() == 3


async def test_post_without_batch_id_gets_a_generated_one(settings: Settings, ports: Ports) -> None:
    """Without a batch_id the service names the batch; an empty batch completes at once."""
    async with serving(settings, ports, Role.API) as api:
        created = await api.http.post("/api/batches", json={"files": []})
    assert created.status_code == 201
    batch = created.json()
    assert batch["batch_id"].startswith("batch-")
    assert (batch["status"], batch["finalized_by"]) == ("completed", "event")


async def test_same_batch_id_with_different_files_is_409(settings: Settings, ports: Ports) -> None:
    """Resubmitting a batch_id with other files is a 409 conflict and changes nothing."""
    async with serving(settings, ports, Role.API) as api:
        first = await api.http.post("/api/batches", json=body(files(2), batch_id="b1"))
        other = await api.http.post("/api/batches", json=body(files(3), batch_id="b1"))
        changed = body(files(2), batch_id="b1")
        changed["files"][0]["payload"] = {"sleep_s": 1}
        payload_differs = await api.http.post("/api/batches", json=changed)
    assert first.status_code == 201
    assert "b1" in assert_error(other, 409)
    assert_error(payload_differs, 409)
    assert await _count(settings, "batch_files") == 2


async def test_invalid_bodies_are_422_with_the_reason(settings: Settings, ports: Ports) -> None:
    """Every kind of invalid body is a 422 whose detail says what is wrong, and where."""
    async with serving(settings, ports, Role.API) as api:
        for name, request, reason in INVALID_BODIES:
            response = await api.http.post("/api/batches", json=request)
            assert reason in json.dumps(assert_error(response, 422)), (name, response.text)
        for name, text, reason in INVALID_TEXTS:
            response = await api.http.post(
                "/api/batches", content=text, headers={"content-type": "application/json"}
            )
            assert reason in json.dumps(assert_error(response, 422)), (name, response.text)
    assert await _count(settings, "batches") == 0


async def test_oversize_body_is_413_declared_or_streamed(settings: Settings, ports: Ports) -> None:
    """A body over 16 MiB is refused with 413, whether its length is declared or chunked."""
    big = json.dumps(body(files(1), metadata={"blob": "x" * (16 * 1024 * 1024)})).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1024 * 1024):
            yield big[start : start + 1024 * 1024]

    async with serving(settings, ports, Role.API) as api:
        declared = await api.http.post(
            "/api/batches", content=big, headers={"content-type": "application/json"}
        )
        streamed = await api.http.post(
            "/api/batches", content=chunked(), headers={"content-type": "application/json"}
        )
        still_serving = await api.http.get("/healthz")
    assert_error(declared, 413)
    assert_error(streamed, 413)
    assert still_serving.status_code == 200
    assert await _count(settings, "batches") == 0


async def test_array_payloads_are_stored_as_sent(settings: Settings, ports: Ports) -> None:
    """A file's payload may be any JSON value, a JSON array included, and is kept as sent."""
    specs = [FileSpec("a", "u", [5]), FileSpec("b", "v", [1, {"k": [2]}])]
    async with serving(settings, ports, Role.API) as api:
        created = await api.http.post("/api/batches", json=body(specs, batch_id="arrays"))
    assert created.status_code == 201, created.text
    rows = await sql(
        settings.database_url or "", "SELECT payload::text FROM batch_files ORDER BY file_id"
    )
    assert [json.loads(row[0]) for row in rows] == [[5], [1, {"k": [2]}]]


async def test_token_guards_mutations_while_reads_stay_open(
    settings: Settings, ports: Ports
) -> None:
    """With RECONCILER_API_TOKEN set, POST needs the bearer token (401 otherwise); GETs don't."""
    guarded = replace(settings, api_token="s3cret-token")
    request = body(files(1), batch_id="guarded")
    async with serving(guarded, ports, Role.API) as api:
        missing = await api.http.post("/api/batches", json=request)
        wrong = await api.http.post(
            "/api/batches", json=request, headers={"Authorization": "Bearer s3cret-tokeN"}
        )
        basic = await api.http.post(
            "/api/batches", json=request, headers={"Authorization": "Basic s3cret-token"}
        )
        right = await api.http.post(
            "/api/batches", json=request, headers={"Authorization": "bearer s3cret-token"}
        )
        reads = [
            await api.http.get(path)
            for path in ("/api/batches/guarded", "/api/batches", "/api/batches/guarded/explain")
        ]
    for refused in (missing, wrong, basic):
        assert_error(refused, 401)
        assert refused.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 201, right.text
    assert [r.status_code for r in reads] == [200, 200, 200]


async def test_progress_is_200_and_unknown_batch_404(settings: Settings, ports: Ports) -> None:
    """GET /api/batches/{id} answers the progress fields of the contract, or 404."""
    async with serving(settings, ports, Role.API) as api:
        await api.http.post("/api/batches", json=body(files(2), batch_id="p1"))
        await record(ports, "p1", ["f00000"], ok=False)
        found = await api.http.get("/api/batches/p1")
        unknown = await api.http.get("/api/batches/nope")
    assert found.status_code == 200
    progress = found.json()
    expected = {"batch_id": "p1", "status": "processing", "total_files": 2, "files_pending": 1}
    assert expected.items() <= progress.items()
    assert (progress["files_failed"], progress["files_succeeded"]) == (1, 0)
    for field in ("files_processing", "created_at", "last_file_completed_at", "completed_at"):
        assert field in progress
    assert progress["finalized_by"] is None
    assert "nope" in assert_error(unknown, 404)


async def test_hostile_ids_in_paths_are_404_or_422_never_5xx(
    settings: Settings, ports: Ports
) -> None:
    """SQL metacharacters, unicode, NUL, bad escapes and 10 kB ids answer 404 or 422."""
    async with serving(settings, ports, Role.API) as api:
        for raw in HOSTILE_IDS:
            batch_id = raw if "%" in raw else quote(raw, safe="")
            for suffix in ("", "/summary", "/explain"):
                response = await api.http.get(f"/api/batches/{batch_id}{suffix}")
                assert response.status_code in (404, 422), (raw[:40], suffix, response.text)
                assert_error(response, response.status_code)
        long_id = await api.http.get(f"/api/batches/{'b' * 10_000}")
    assert_error(long_id, 422)
    assert await _count(settings, "batches") == 0


async def test_list_filters_by_status_and_stuck_and_pages_with_before(
    settings: Settings, ports: Ports
) -> None:
    """GET /api/batches filters on status and stuck and pages newest first via next_before."""
    async with serving(settings, ports, Role.API) as api:
        for n in range(5):
            await api.http.post("/api/batches", json=body(files(1), batch_id=f"L{n}"))
        await api.http.post("/api/batches", json={"batch_id": "empty", "files": []})
        await record(ports, "L1", ["f00000"])  # complete, not finalized: stuck (grace 0)
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"before": cursor} if cursor else {})
            page = (await api.http.get("/api/batches", params=params)).json()
            pages.append([item["batch_id"] for item in page["items"]])
            cursor = page["next_before"]
            if cursor is None:
                break
        completed = (await api.http.get("/api/batches?status=completed")).json()
        processing = (await api.http.get("/api/batches?status=processing")).json()
        stuck = (await api.http.get("/api/batches?stuck=true")).json()
    ordered = [batch_id for page in pages for batch_id in page]
    assert ordered == ["empty", "L4", "L3", "L2", "L1", "L0"]
    assert all(len(page) <= 2 for page in pages)
    assert [i["batch_id"] for i in completed["items"]] == ["empty"]
    assert [i["batch_id"] for i in processing["items"]] == ["L4", "L3", "L2", "L1", "L0"]
    assert [i["batch_id"] for i in stuck["items"]] == ["L1"]


async def test_list_rejects_bad_and_unknown_query_parameters(
    settings: Settings, ports: Ports
) -> None:
    """status=bogus, limit=0, a bad cursor, stuck=maybe and unknown parameters are 422."""
    queries = [
        "status=bogus", "limit=0", "limit=501", "before=yesterday", "stuck=maybe",
        "stauts=completed", "before=0001-01-01T00:00:00%2B05:00",
    ]  # fmt: skip
    async with serving(settings, ports, Role.API) as api:
        answers = {query: await api.http.get(f"/api/batches?{query}") for query in queries}
        unknown_on_item = await api.http.get("/api/batches/x/summary?verbose=1")
        naive_cursor = await api.http.get("/api/batches?before=2999-01-01T00:00:00")
    for query, response in answers.items():
        assert query.split("=")[0] in json.dumps(assert_error(response, 422)), query
    assert "verbose" in json.dumps(assert_error(unknown_on_item, 422))
    assert naive_cursor.status_code == 200


async def test_explain_lists_conditions_and_blocking_files_or_404(
    settings: Settings, ports: Ports
) -> None:
    """GET .../explain says which finalization conditions fail and which files block it."""
    async with serving(settings, ports, Role.API) as api:
        await api.http.post("/api/batches", json=body(files(2), batch_id="e1"))
        await record(ports, "e1", ["f00001"])
        found = await api.http.get("/api/batches/e1/explain")
        unknown = await api.http.get("/api/batches/nope/explain")
    assert found.status_code == 200
    report = found.json()
    holds = {c["name"]: c["holds"] for c in report["conditions"]}
    assert holds["every_file_terminal"] is False and holds["no_files_pending"] is False
    assert holds["not_finalized"] is True
    assert [f["file_id"] for f in report["blocking_files"]] == ["f00000"]
    assert "waiting for 1 file" in report["verdict"]
    assert_error(unknown, 404)


async def test_unknown_routes_and_methods_answer_json_errors(
    settings: Settings, ports: Ports
) -> None:
    """Unknown paths are a JSON 404 and wrong methods a JSON 405, like every other error."""
    async with serving(settings, ports, Role.API) as api:
        missing = await api.http.get("/api/nothing-here")
        method = await api.http.delete("/api/batches")
    assert_error(missing, 404)
    assert_error(method, 405)


async def test_unexpected_errors_are_a_json_500_without_a_trace(
    settings: Settings, ports: Ports
) -> None:
    """A bug (here: the view renamed away) answers a JSON 500 and logs request_failed."""
    await sql(settings.database_url or "", "ALTER VIEW batch_status_summary RENAME TO renamed_view")
    async with serving(settings, ports, Role.API) as api:
        with capture_logs() as logs:
            broken = await api.http.get("/api/batches/any")
    assert assert_error(broken, 500) is None
    assert broken.json()["error"] == "internal error"
    assert "renamed" not in broken.text and "batch_status_summary" not in broken.text
    failed = [e for e in logs if e["event"] == "request_failed"]
    assert failed and failed[0]["path"] == "/api/batches/any"
