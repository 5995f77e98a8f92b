"""The HTTP API of live progress: the two `text/event-stream` endpoints.

Installed by `routes.create_app` next to the batches API. Starlette's streaming
response ends the generator when the client disconnects; pings and replay are ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import FastAPI, Header, Path, Query
from fastapi.responses import Response, StreamingResponse

from reconciler import batches, streams
from reconciler.api_models import ID_MAX_CHARS, NO_NUL, ErrorBody

if TYPE_CHECKING:
    from reconciler.routes import Context

MEDIA_TYPE: Final = "text/event-stream"
# No proxy buffering or caching: each event must reach the client when it is sent.
STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

BatchId = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL, description="The batch.")
]
LastEventId = Annotated[
    str | None,
    Header(alias="Last-Event-ID", max_length=ID_MAX_CHARS, description="Resume after this."),
]
_STREAM: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {MEDIA_TYPE: {}}, "description": "The event stream."},
    204: {"description": "Nothing follows the resumed event: the stream is over."},
    404: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


def _streaming(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(frames, media_type=MEDIA_TYPE, headers=STREAM_HEADERS)


def install(app: FastAPI, ctx: Context, plain: list[Any], with_progress: list[Any]) -> None:
    """Adds /api/batches/{batch_id}/events and /api/events to the app."""
    ping_s = ctx.settings.events_ping_interval_s

    @app.get("/api/batches/{batch_id}/events", dependencies=plain, responses=_STREAM)
    async def batch_events(batch_id: BatchId, last_event_id: LastEventId = None) -> Response:
        """`progress` while the batch's files finish, then one `finalized`; then it ends."""
        await batches.progress(ctx.db, batch_id)  # 404 before any stream starts
        done = await streams.finalized_event(ctx.db, batch_id)
        if done is not None and last_event_id == done["event_id"]:
            return Response(status_code=204)  # tells EventSource not to reconnect
        seen = streams.progress_seen(last_event_id)
        frames = streams.batch_stream(ctx.db, ctx.notifications, batch_id, seen, ping_s)
        return _streaming(frames)

    @app.get("/api/events", dependencies=with_progress, responses=_STREAM)
    async def all_events(
        last_event_id: LastEventId = None,
        progress: Annotated[bool, Query(description="Also stream live `progress`.")] = False,
    ) -> Response:
        """Every batch's `finalized` events, resumable; live `progress` with ?progress=1."""
        cursor = await streams.start_cursor(ctx.db, last_event_id)
        frames = streams.all_stream(ctx.db, ctx.notifications, cursor, ping_s, progress)
        return _streaming(frames)
