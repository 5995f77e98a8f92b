"""The HTTP API as a FastAPI app: batches, summaries, probes and /metrics.

Every error is JSON `{"error": ..., "detail": ...}`; validation failures are 422 with
the reason, dependency outages 503, and nothing ever answers with a stack trace.
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import anyio
import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from reconciler import batches, migrations
from reconciler.actors.finalizer import Outcome, finalize
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.errors import BatchConflict, BatchNotFound, InvalidBatch, RetryableError
from reconciler.queue import JobQueue
from reconciler.supervisor import Health

log = structlog.get_logger("reconciler.api")

MAX_BODY_BYTES: Final = 16 * 1024 * 1024
MAX_FILES_PER_BATCH: Final = 100_000
RETRY_AFTER_S: Final = 2
PROBE_TIMEOUT_S: Final = 2.0
PAGE_SIZE: Final = 50
ID_MAX_CHARS: Final = 256


class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    file_id: str = Field(min_length=1, max_length=1024)
    uri: str = Field(min_length=1, max_length=4096)
    payload: Any = None


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    batch_id: str | None = Field(default=None, min_length=1, max_length=ID_MAX_CHARS)
    run_id: str | None = Field(default=None, min_length=1, max_length=ID_MAX_CHARS)
    metadata: dict[str, Any] | None = None
    deadline_s: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)
    files: list[FileIn] = Field(max_length=MAX_FILES_PER_BATCH)

    @model_validator(mode="after")
    def _unique_file_ids(self) -> BatchIn:
        seen: set[str] = set()
        for spec in self.files:
            if spec.file_id in seen:
                raise ValueError(f"duplicate file_id {spec.file_id!r}")
            seen.add(spec.file_id)
        return self


@dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    db: Database
    queue: JobQueue
    health: Health
    stop: anyio.Event


def error(status: int, message: str, detail: Any = None, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def create_app(ctx: Context, *, batches_api: bool = True) -> FastAPI:
    """The ASGI app over the given ports; probes and /metrics are always served."""
    app = FastAPI(title="batch-reconciler", version="0.1.0", docs_url=None, redoc_url=None)
    _install_errors(app)
    _install_body_limit(app)
    if batches_api:
        _install_batches(app, ctx)
    _install_probes(app, ctx)
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return error(422, "invalid request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
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

    @app.exception_handler(RetryableError)
    async def unavailable(_: Request, exc: RetryableError) -> JSONResponse:
        log.warning("request_dependency_unavailable", error=str(exc))
        return error(503, "a dependency is unavailable, retry later", None, **_retry_after())

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("request_failed", error=str(exc), exc_info=True)
        return error(500, "internal error")


def _install_body_limit(app: FastAPI) -> None:
    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error(413, "request body too large", f"at most {MAX_BODY_BYTES} bytes")
        response: Response = await call_next(request)
        return response


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def _auth(ctx: Context) -> Any:
    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        token = ctx.settings.api_token
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    return Depends(require_token)


def _install_batches(app: FastAPI, ctx: Context) -> None:
    grace = ctx.settings.stuck_grace_s

    @app.post("/api/batches", status_code=201, dependencies=[_auth(ctx)])
    async def create_batch(body: BatchIn) -> JSONResponse:
        files = [batches.FileSpec(f.file_id, f.uri, f.payload) for f in body.files]
        submitted = await batches.submit(
            ctx.db, ctx.queue, files, batch_id=body.batch_id, run_id=body.run_id,
            metadata=body.metadata, deadline_s=body.deadline_s,
        )  # fmt: skip
        progress = await batches.progress(ctx.db, submitted.batch_id)
        return JSONResponse(progress, status_code=201 if submitted.created else 200)

    @app.get("/api/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return await batches.progress(ctx.db, batch_id)

    @app.get("/api/batches/{batch_id}/summary")
    async def get_summary(batch_id: str) -> JSONResponse:
        return await _summary(ctx, batch_id)

    @app.get("/api/batches/{batch_id}/explain")
    async def explain(batch_id: str) -> dict[str, Any]:
        return await batches.explain(ctx.db, batch_id, grace)

    @app.get("/api/batches")
    async def list_batches(
        status: Literal["processing", "completed", "completed_with_errors"] | None = None,
        stuck: bool = False,
        before: dt.datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
    ) -> dict[str, Any]:
        items = await batches.page(
            ctx.db, status=status, stuck_only=stuck, grace_s=grace, before=before, limit=limit
        )
        next_before = items[-1]["created_at"] if len(items) == limit else None
        return {"items": items, "next_before": next_before}


async def _summary(ctx: Context, batch_id: str) -> JSONResponse:
    found = await batches.summary(ctx.db, batch_id)
    if found is not None:
        return JSONResponse(found)
    progress = await batches.progress(ctx.db, batch_id)
    if _finalizable(progress):
        result = await finalize(ctx.db, batch_id, "demand")
        if result.outcome in (Outcome.FINALIZED, Outcome.ALREADY_FINALIZED):
            found = await batches.summary(ctx.db, batch_id)
            if found is not None:
                return JSONResponse(found)
    return JSONResponse(progress, status_code=202, headers=_retry_after())


def _finalizable(progress: dict[str, Any]) -> bool:
    done = progress["files_succeeded"] + progress["files_failed"] == progress["total_files"]
    deadline = progress.get("deadline_at")
    overdue = deadline is not None and dt.datetime.fromisoformat(deadline) <= dt.datetime.now(
        dt.UTC
    )
    return done or overdue


def _install_probes(app: FastAPI, ctx: Context) -> None:
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        # Liveness looks only inside the process: a Postgres blink must not restart pods.
        body = {"status": "ok" if ctx.health.alive() else "failing", "actors": ctx.health.running}
        return JSONResponse(body, status_code=200 if ctx.health.alive() else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if ctx.stop.is_set():
            return error(503, "shutting down")
        problems = await _readiness_problems(ctx)
        if problems:
            return error(503, "not ready", problems)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _readiness_problems(ctx: Context) -> dict[str, str]:
    problems: dict[str, str] = {}
    with anyio.move_on_after(PROBE_TIMEOUT_S) as scope:
        try:
            if await migrations.pending(ctx.db):
                problems["schema"] = "migrations pending: run `reconciler migrate`"
        except RetryableError:
            problems["postgres"] = "unreachable"
    if scope.cancelled_caught:
        problems["postgres"] = "timed out"
    with anyio.move_on_after(PROBE_TIMEOUT_S) as scope:
        try:
            await ctx.queue.ping()
        except RetryableError:
            problems["redis"] = "unreachable"
    if scope.cancelled_caught:
        problems["redis"] = "timed out"
    return problems
