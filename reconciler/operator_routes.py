"""The HTTP API of operator actions: cancel, retry the failed files, the audit, and the
dead letters.

Installed by `routes.create_app` next to the batches API, with the same bearer check
on the mutating endpoints and the same JSON error shape. The actor an audit row names
is the API token's name (`RECONCILER_API_TOKEN_NAME`), never the token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from reconciler import batches, dead_letters, operations
from reconciler.api_models import (
    ID_MAX_CHARS,
    NO_NUL,
    Audit,
    CancelIn,
    DeadLetters,
    ErrorBody,
    Progress,
    RetryIn,
)
from reconciler.errors import ActionRefused

if TYPE_CHECKING:
    from reconciler.routes import Context

ANONYMOUS_ACTOR: Final = "anonymous"
BatchId = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL, description="The batch.")
]
Limit = Annotated[int, Query(ge=1, le=dead_letters.MAX_PAGE_SIZE)]
After = Annotated[
    str | None,
    Query(pattern=r"^\d+-\d+$", max_length=64, description="The last entry id seen."),
]
_RETRIED: Final[dict[int | str, dict[str, Any]]] = {
    201: {"model": Progress, "description": "The new batch of the failed files, enqueued."},
    200: {"model": Progress, "description": "Repeated with the same batch_id: nothing new."},
}
_CANCELLED: Final[dict[int | str, dict[str, Any]]] = {
    200: {"model": Progress, "description": "Finalized now; unfinished files cancelled."}
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


def actor(ctx: Context) -> str:
    """Who the audit says acted: the token's name when a token guards the API."""
    if ctx.settings.api_token is None:
        return ANONYMOUS_ACTOR
    return f"token:{ctx.settings.api_token_name}"


def install(
    app: FastAPI,
    ctx: Context,
    guarded: list[Any],
    refusals: tuple[int, ...],
    only_query: Callable[..., Any],
) -> None:
    """Adds cancel, retry-failed, audit and /api/dead-letters to the app."""

    @app.exception_handler(ActionRefused)
    async def refused(_: Request, exc: ActionRefused) -> JSONResponse:
        return JSONResponse({"error": "action refused", "detail": str(exc)}, status_code=409)

    _install_actions(app, ctx, [*guarded, only_query()], refusals)
    _install_reads(app, ctx, only_query)


def _install_actions(
    app: FastAPI, ctx: Context, mutating: list[Any], refusals: tuple[int, ...]
) -> None:
    @app.post(
        "/api/batches/{batch_id}/cancel",
        dependencies=mutating,
        responses={**_errors(*refusals, 404, 409, 422, 503), **_CANCELLED},
    )
    async def cancel(batch_id: BatchId, body: CancelIn) -> JSONResponse:
        """Finalizes the batch now (`operator`); its unfinished files fail as cancelled."""
        await operations.cancel(ctx.db, batch_id, body.reason, actor(ctx))
        return JSONResponse(await batches.progress(ctx.db, batch_id))

    @app.post(
        "/api/batches/{batch_id}/retry-failed",
        status_code=201,
        dependencies=mutating,
        responses={**_errors(*refusals, 404, 409, 422, 503), **_RETRIED},
    )
    async def retry_failed(batch_id: BatchId, body: RetryIn) -> JSONResponse:
        """A new batch of the finalized batch's failed files, in the same run."""
        retried = await operations.retry_failed(
            ctx.db, ctx.queue, batch_id, body.reason, actor(ctx), new_batch_id=body.batch_id
        )
        progress = await batches.progress(ctx.db, retried.batch_id)
        return JSONResponse(progress, status_code=201 if retried.created else 200)


def _install_reads(app: FastAPI, ctx: Context, only_query: Callable[..., Any]) -> None:
    @app.get(
        "/api/batches/{batch_id}/audit",
        dependencies=[only_query()],
        responses={**_errors(404, 422, 503), 200: {"model": Audit}},
    )
    async def audit(batch_id: BatchId) -> JSONResponse:
        """Every operator action on the batch: action, reason, actor, time."""
        items = await operations.audit(ctx.db, batch_id)
        return JSONResponse({"batch_id": batch_id, "items": items})

    @app.get(
        "/api/dead-letters",
        dependencies=[only_query("limit", "after")],
        responses={**_errors(422, 503), 200: {"model": DeadLetters}},
    )
    async def list_dead_letters(
        limit: Limit = dead_letters.PAGE_SIZE, after: After = None
    ) -> JSONResponse:
        """Dead-lettered jobs oldest first, each with its reason and the start of its job."""
        return JSONResponse(await dead_letters.listed(ctx.queue, limit, after))
