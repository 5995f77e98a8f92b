"""The HTTP API as a FastAPI app: batches, summaries, probes and /metrics.

Every error is JSON `{"error": ..., "detail": ...}`; validation failures are 422 with
the reason, dependency outages 503, and nothing ever answers with a stack trace.
FastAPI derives request validation and the OpenAPI document from the same models.
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import anyio
import structlog
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from reconciler import batches, delivery_routes, migrations, operator_routes, stream_routes
from reconciler.api_models import (
    ID_MAX_CHARS,
    NO_NUL,
    BatchIn,
    ErrorBody,
    Explanation,
    HealthBody,
    Page,
    Progress,
    Summary,
)
from reconciler.config import Settings
from reconciler.console import routes as console
from reconciler.database import Database
from reconciler.errors import (
    BatchConflict,
    BatchNotFound,
    InvalidBatch,
    MisconfiguredDependency,
    RetryableError,
    TerminalError,
)
from reconciler.finalization import Outcome, finalize
from reconciler.notifications import Notifications
from reconciler.queue import JobQueue
from reconciler.summary_cache import SummaryCache
from reconciler.supervisor import Health

log = structlog.get_logger("reconciler.api")

RETRY_AFTER_S: Final = 2
PROBE_TIMEOUT_S: Final = 2.0
PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500

BatchId = Annotated[
    str,
    Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL, description="The batch's id."),
]

Cursor = Annotated[
    str | None,
    Query(
        description="Only batches created before this ISO 8601 date-time (UTC if no offset).",
        json_schema_extra={"format": "date-time"},
    ),
]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error answers."""
    return {code: {"model": ErrorBody} for code in codes}


_CREATED: Final[dict[int | str, dict[str, Any]]] = {
    201: {"model": Progress, "description": "Created and enqueued."},
    200: {"model": Progress, "description": "Same batch_id and files as before: nothing new."},
}
_NOT_YET: Final[dict[str, Any]] = {
    "model": Progress,
    "description": "Files remain, or another replica holds the finalization: the progress; "
    "ask again after `Retry-After` seconds.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}


@dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    db: Database
    queue: JobQueue
    health: Health
    stop: anyio.Event
    notifications: Notifications


def error(status: int, message: str, detail: Any = None, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def create_app(ctx: Context, *, batches_api: bool = True) -> FastAPI:
    """The ASGI app over the given ports; probes and /metrics are always served."""
    app = FastAPI(
        title="batch-reconciler",
        version="0.1.0",
        description="Batches of file-processing work, each finalized exactly once.",
        docs_url=None,
        redoc_url=None,
    )
    _install_errors(app)
    if batches_api:
        _install_batches(app, ctx)
        delivery_routes.install(app, ctx, *_auth(ctx), plain=[_only_query()])
        operator_routes.install(app, ctx, *_auth(ctx), only_query=_only_query)
        stream_routes.install(app, ctx, [_only_query()], [_only_query("progress")])
        console.install(app, ctx)
    _install_probes(app, ctx)
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid request", [_reason(e) for e in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a body json.loads cannot read (bad UTF-8, too deep, ...).
            reason = f"JSON decode error: {type(exc.__cause__).__name__}"
            detail = [{"loc": ["body"], "msg": reason, "type": "json_invalid"}]
            return error(422, "invalid request", detail)
        return error(exc.status_code, str(exc.detail), None, **(exc.headers or {}))

    @app.exception_handler(BatchNotFound)
    async def not_found(_: Request, exc: BatchNotFound) -> JSONResponse:
        return error(404, "batch not found", str(exc))

    @app.exception_handler(BatchConflict)
    async def conflict(_: Request, exc: BatchConflict) -> JSONResponse:
        return error(409, "batch exists with different files", str(exc))

    @app.exception_handler(InvalidBatch)
    async def invalid_batch(_: Request, exc: InvalidBatch) -> JSONResponse:
        return error(422, "invalid batch", str(exc))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        # Starlette answers with this, then re-raises: the API actor's guard logs it.
        return error(500, "internal error")

    @app.exception_handler(RetryableError)
    async def unavailable(_: Request, exc: RetryableError) -> JSONResponse:
        log.warning("request_dependency_unavailable", error=str(exc))
        return error(503, "a dependency is unavailable, retry later", None, **_retry_after())


def _reason(e: Any) -> dict[str, Any]:
    return {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


_BEARER: Final = HTTPBearer(
    auto_error=False, description="Required when RECONCILER_API_TOKEN is set."
)


def _auth(ctx: Context) -> tuple[list[Any], tuple[int, ...]]:
    """The bearer check and its 401, only when a token is configured, so the OpenAPI
    document says exactly what this deployment requires."""
    token = ctx.settings.api_token
    if token is None:
        return [], ()

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    return [Depends(require_token)], (401,)


def _only_query(*known: str) -> Any:
    """Rejects query parameters the endpoint does not know: a typo must not go unseen."""

    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(known))
        if unknown:
            raise RequestValidationError(
                [{"loc": ("query", name), "msg": "unknown query parameter", "type": "extra"}
                 for name in unknown]
            )  # fmt: skip

    return Depends(check)


def _install_batches(app: FastAPI, ctx: Context) -> None:
    grace = ctx.settings.stuck_grace_s
    cache = SummaryCache()
    plain = [_only_query()]
    guarded, refusals = _auth(ctx)

    @app.post(
        "/api/batches", status_code=201, dependencies=[*guarded, *plain],
        responses={**_errors(*refusals, 409, 413, 422, 503), **_CREATED},
    )  # fmt: skip
    async def create_batch(body: BatchIn) -> JSONResponse:
        """Creates a batch and enqueues one job per file; idempotent on `batch_id`."""
        files = [batches.FileSpec(f.file_id, f.uri, f.payload) for f in body.files]
        submitted = await batches.submit(
            ctx.db, ctx.queue, files, batch_id=body.batch_id, run_id=body.run_id,
            metadata=body.metadata, deadline_s=body.deadline_s,
        )  # fmt: skip
        progress = await batches.progress(ctx.db, submitted.batch_id)
        return JSONResponse(progress, status_code=201 if submitted.created else 200)

    @app.get(
        "/api/batches/{batch_id}", dependencies=plain,
        responses={**_errors(404, 422, 503), 200: {"model": Progress}},
    )  # fmt: skip
    async def get_batch(batch_id: BatchId) -> JSONResponse:
        """The batch's progress: file counts by state, timestamps, how it was finalized."""
        return JSONResponse(await batches.progress(ctx.db, batch_id))

    @app.get(
        "/api/batches/{batch_id}/summary", dependencies=plain,
        responses={**_errors(404, 422, 503), 200: {"model": Summary}, 202: _NOT_YET},
    )  # fmt: skip
    async def get_summary(batch_id: BatchId) -> Response:
        """The run summary; finalizes a batch whose files are all done (trigger `demand`)."""
        hit = cache.get(batch_id)
        if hit is not None:
            return Response(hit, media_type="application/json")
        return await _summary(ctx, cache, batch_id)

    @app.get(
        "/api/batches/{batch_id}/explain", dependencies=plain,
        responses={**_errors(404, 422, 503), 200: {"model": Explanation}},
    )  # fmt: skip
    async def explain(batch_id: BatchId) -> JSONResponse:
        """Every finalization condition, whether it holds, and the files that block it."""
        return JSONResponse(await batches.explain(ctx.db, batch_id, grace))

    @app.get(
        "/api/batches", dependencies=[_only_query("status", "stuck", "before", "limit")],
        responses={**_errors(422, 503), 200: {"model": Page}},
    )  # fmt: skip
    async def list_batches(
        status: Literal["processing", "completed", "completed_with_errors"] | None = None,
        stuck: Annotated[bool, Query(description="Only complete, unfinalized batches.")] = False,
        before: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    ) -> JSONResponse:
        """A page of batches, newest first; follow `next_before` for the next page."""
        items = await batches.page(
            ctx.db, status=status, stuck_only=stuck, grace_s=grace,
            before=_as_utc(before), limit=limit,
        )  # fmt: skip
        next_before = items[-1]["created_at"] if len(items) == limit else None
        return JSONResponse({"items": items, "next_before": next_before})


def _as_utc(cursor: str | None) -> dt.datetime | None:
    """The `before` cursor as an aware UTC datetime; anything else is a 422."""
    if cursor is None:
        return None
    try:
        if "T" not in cursor.upper():
            raise ValueError("a date-time needs a time")
        moment = dt.datetime.fromisoformat(cursor.upper().replace("Z", "+00:00"))
        return moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError) as exc:
        raise RequestValidationError(
            [{"loc": ("query", "before"), "msg": f"not an ISO 8601 date-time: {exc}",
              "type": "datetime_parsing"}]
        ) from None  # fmt: skip


async def _summary(ctx: Context, cache: SummaryCache, batch_id: str) -> JSONResponse:
    found = await batches.summary(ctx.db, batch_id)
    answer = JSONResponse(found) if found is not None else await _finalize_on_demand(ctx, batch_id)
    if answer.status_code == 200:
        cache.put(batch_id, bytes(answer.body))
    return answer


async def _finalize_on_demand(ctx: Context, batch_id: str) -> JSONResponse:
    """The summary after finalizing now if every file is done, else a 202 with progress."""
    progress = await batches.progress(ctx.db, batch_id)
    if _finalizable(progress):
        result = await finalize(ctx.db, batch_id, "demand")
        if result.outcome in (Outcome.FINALIZED, Outcome.ALREADY_FINALIZED):
            found = await batches.summary(ctx.db, batch_id)
            if found is not None:
                return JSONResponse(found)
    return JSONResponse(progress, status_code=202, headers=_retry_after())


def _finalizable(progress: dict[str, Any]) -> bool:
    """Every file is terminal, or the deadline passed: finalizing now would succeed."""
    done = progress["files_succeeded"] + progress["files_failed"] == progress["total_files"]
    deadline = progress.get("deadline_at")
    now = dt.datetime.now(dt.UTC)
    return done or (deadline is not None and dt.datetime.fromisoformat(deadline) <= now)


def _install_probes(app: FastAPI, ctx: Context) -> None:
    @app.get("/healthz", responses={200: {"model": HealthBody}, 503: {"model": HealthBody}})
    async def healthz() -> JSONResponse:
        """Liveness: the loop answers and every actor runs (dependencies are not checked)."""
        # Liveness looks only inside the process: a Postgres blink must not restart pods.
        body = {"status": "ok" if ctx.health.alive() else "failing", "actors": ctx.health.running}
        return JSONResponse(body, status_code=200 if ctx.health.alive() else 503)

    @app.get("/readyz", responses={**_errors(503), 200: {"description": "Ready for traffic."}})
    async def readyz() -> JSONResponse:
        """Readiness: Postgres and Redis answer and the schema is current; 503 when draining."""
        if ctx.stop.is_set():
            return error(503, "shutting down")
        problems = await _readiness_problems(ctx)
        if problems:
            return error(503, "not ready", problems)
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    )
    async def metrics_text() -> Response:
        """Every metric in the Prometheus text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _readiness_problems(ctx: Context) -> dict[str, str]:
    """What is not ready, by dependency; both are asked at once, each within the timeout."""
    problems: dict[str, str] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_check_postgres, ctx, problems)
        tg.start_soon(_check_redis, ctx, problems)
    return problems


async def _check_postgres(ctx: Context, problems: dict[str, str]) -> None:
    with anyio.move_on_after(PROBE_TIMEOUT_S) as scope:
        try:
            if await migrations.pending(ctx.db):
                problems["schema"] = "migrations pending: run `reconciler migrate`"
        except RetryableError as exc:
            problems["postgres"] = _unreachable(exc)
        except TerminalError as exc:
            problems["postgres"] = f"failing: {exc}"
    if scope.cancelled_caught:
        problems["postgres"] = "timed out"


async def _check_redis(ctx: Context, problems: dict[str, str]) -> None:
    with anyio.move_on_after(PROBE_TIMEOUT_S) as scope:
        try:
            await ctx.queue.ping()
        except RetryableError as exc:
            problems["redis"] = _unreachable(exc)
        except TerminalError as exc:
            problems["redis"] = f"failing: {exc}"
    if scope.cancelled_caught:
        problems["redis"] = "timed out"


def _unreachable(exc: RetryableError) -> str:
    """What readiness says of a dependency that does not answer: what to fix, if known."""
    return str(exc) if isinstance(exc, MisconfiguredDependency) else "unreachable"
