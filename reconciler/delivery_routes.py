"""The HTTP API of completion callbacks: webhook subscriptions and the delivery log.

Installed by `routes.create_app` next to the batches API, with the same bearer check
on the mutating endpoints and the same JSON error shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response

from reconciler import delivery, webhooks
from reconciler.api_models import (
    ID_MAX_CHARS,
    NO_NUL,
    Deliveries,
    ErrorBody,
    WebhookCreated,
    WebhookIn,
    WebhookList,
)
from reconciler.errors import InvalidWebhook, WebhookNotFound

if TYPE_CHECKING:
    from reconciler.routes import Context

WebhookId = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL, description="The webhook.")
]
BatchId = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL, description="The batch.")
]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


def _error(status: int, message: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status)


def install(
    app: FastAPI, ctx: Context, guarded: list[Any], refusals: tuple[int, ...], plain: list[Any]
) -> None:
    """Adds /api/webhooks and /api/batches/{batch_id}/deliveries to the app."""
    _install_errors(app)
    _install_webhooks(app, ctx, [*guarded, *plain], refusals, plain)

    @app.get(
        "/api/batches/{batch_id}/deliveries",
        dependencies=plain,
        responses={**_errors(404, 422, 503), 200: {"model": Deliveries}},
    )
    async def batch_deliveries(batch_id: BatchId) -> JSONResponse:
        """Every delivery attempt of the batch's events, and where each delivery stands."""
        return JSONResponse(await delivery.of_batch(ctx.db, batch_id))


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(InvalidWebhook)
    async def invalid(_: Request, exc: InvalidWebhook) -> JSONResponse:
        return _error(422, "invalid webhook", str(exc))

    @app.exception_handler(WebhookNotFound)
    async def not_found(_: Request, exc: WebhookNotFound) -> JSONResponse:
        return _error(404, "webhook not found", str(exc))


def _install_webhooks(
    app: FastAPI, ctx: Context, mutating: list[Any], refusals: tuple[int, ...], plain: list[Any]
) -> None:
    @app.post(
        "/api/webhooks",
        status_code=201,
        dependencies=mutating,
        responses={**_errors(*refusals, 422, 503), 201: {"model": WebhookCreated}},
    )
    async def create_webhook(body: WebhookIn) -> JSONResponse:
        """Subscribes a URL to events; the answer is the only one that shows the secret."""
        created = await webhooks.create(
            ctx.db,
            body.url,
            events=body.events,
            secret=body.secret,
            allowed_hosts=ctx.settings.webhook_allowed_hosts,
        )
        return JSONResponse(created, status_code=201)

    @app.get(
        "/api/webhooks",
        dependencies=plain,
        responses={**_errors(503), 200: {"model": WebhookList}},
    )
    async def list_webhooks() -> JSONResponse:
        """Every subscription, without its secret."""
        return JSONResponse({"items": await webhooks.listed(ctx.db)})

    @app.delete(
        "/api/webhooks/{webhook_id}",
        status_code=204,
        dependencies=mutating,
        responses={**_errors(*refusals, 404, 422, 503), 204: {"description": "Deleted."}},
    )
    async def delete_webhook(webhook_id: WebhookId) -> Response:
        """Deletes the subscription; its undelivered deliveries are cancelled."""
        await webhooks.remove(ctx.db, webhook_id)
        return Response(status_code=204)
