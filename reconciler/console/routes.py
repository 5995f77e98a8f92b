"""The web console's pages and forms under /ui/, rendered on the server with Jinja2.

Reads go through `console.pages`, actions through `operations` (the same cancel and
retry as the API and CLI, with the same audit row). Every POST carries the CSRF token
of the session cookie (see `console.auth`); with RECONCILER_API_TOKEN set, every page
asks for the token first.
"""

from __future__ import annotations

import time
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import parse_qs, quote, urlencode

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from reconciler import dead_letters, operations
from reconciler.api_models import FILE_ID_MAX_CHARS, ID_MAX_CHARS, NO_NUL
from reconciler.console import filters, pages
from reconciler.console.auth import COOKIE, COOKIE_PATH, SESSION_MAX_AGE_S, Keys
from reconciler.errors import ActionRefused, BatchConflict, BatchNotFound, InvalidBatch
from reconciler.operator_routes import actor

if TYPE_CHECKING:
    from reconciler.routes import Context

HERE: Final = FilePath(__file__).parent
MAX_FORM_BYTES: Final = 16 * 1024
# Scripts, styles and images from the console itself only: no inline script at all.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
CSRF_REFUSED: Final = (
    "the form's CSRF token is missing or does not match this session: reload the page and try again"
)
NOTICES: Final = {
    "cancelled": "Cancelled: finalized by operator; its unfinished files failed as cancelled.",
    "retried": "Created: this batch runs the failed files of its parent again.",
}
REFUSALS: Final[dict[type[Exception], int]] = {
    BatchNotFound: 404,
    ActionRefused: 409,
    BatchConflict: 409,
    InvalidBatch: 422,
}
ANY_TEXT: Final = r"^[^\x00]*$"  # a filter left empty in the form means "any"
Text = Annotated[str | None, Query(max_length=ID_MAX_CHARS, pattern=ANY_TEXT)]
Cursor = Annotated[str | None, Query(max_length=2 * ID_MAX_CHARS, pattern=ANY_TEXT)]
BatchId = Annotated[str, Path(min_length=1, max_length=ID_MAX_CHARS, pattern=NO_NUL)]
FileCursor = Annotated[str | None, Query(max_length=FILE_ID_MAX_CHARS, pattern=ANY_TEXT)]
StreamId = Annotated[str | None, Query(pattern=r"^\d+-\d+$", max_length=64)]


class LoginNeeded(Exception):
    """A page asked for without a valid session while the token guards the console."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class Visit:
    """One request's session: its nonce, and the cookie to set when it is a new one."""

    def __init__(self, request: Request, keys: Keys) -> None:
        self.started = time.perf_counter()
        self.keys = keys
        self.nonce = keys.session_nonce(request.cookies.get(COOKIE))
        self.new_cookie: str | None = None
        if self.nonce is None and not keys.guarded:
            self.new_cookie = keys.new_session()
            self.nonce = keys.session_nonce(self.new_cookie)

    @property
    def csrf(self) -> str:
        return self.keys.csrf_token(self.nonce) if self.nonce else ""


class Console:
    """The templates and keys every console route renders and checks with."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.keys = Keys(ctx.settings.api_token)
        self.recent = pages.Recent()
        self.templates = Jinja2Templates(directory=HERE / "templates")
        filters.register(self.templates.env)

    def render(
        self, request: Request, visit: Visit, name: str, status: int = 200, **values: Any
    ) -> Response:
        values.update(guarded=self.keys.guarded, csrf=visit.csrf, path=request.url.path)
        answer = self.templates.TemplateResponse(request, name, values, status_code=status)
        answer.headers.update(SECURITY_HEADERS)
        answer.headers["Server-Timing"] = f"page;dur={_elapsed_ms(visit):.1f}"
        if visit.new_cookie is not None:
            set_cookie(request, answer, visit.new_cookie)
        return answer

    def error(self, request: Request, visit: Visit, status: int, message: str) -> Response:
        return self.render(request, visit, "error.html", status, message=message)

    def visit(self, request: Request) -> Visit:
        """The session of a page view; asks for the token first when there is none."""
        visit = Visit(request, self.keys)
        if visit.nonce is None:
            query = f"?{request.url.query}" if request.url.query else ""
            raise LoginNeeded(request.url.path + query)
        return visit

    async def posted(self, request: Request) -> tuple[Visit, dict[str, str]]:
        """The session and form of a POST; `CsrfRefused` unless its token matches."""
        visit = Visit(request, self.keys)
        form = await form_of(request)
        if not self.keys.csrf_ok(visit.nonce, form.get("csrf", "")):
            raise CsrfRefused(visit)
        return visit, form


class CsrfRefused(Exception):
    """A POST whose form token does not match its session cookie: answered 403."""

    def __init__(self, visit: Visit) -> None:
        super().__init__("csrf")
        self.visit = visit


def _elapsed_ms(visit: Visit) -> float:
    """The server's time on the page so far: reads and rendering (`Server-Timing`)."""
    return (time.perf_counter() - visit.started) * 1000


def set_cookie(request: Request, answer: Response, value: str) -> None:
    """The session cookie: never readable by scripts, never sent from another site."""
    answer.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each); an oversized one is empty."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode(errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a console path only, never another site."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target
    return "/ui/"


def batch_url(batch_id: str) -> str:
    return f"/ui/batches/{quote(batch_id, safe='')}"


def with_query(request: Request, **changes: str) -> str:
    """This page's URL with some query parameters replaced."""
    params = dict(request.query_params)
    params.update(changes)
    return f"{request.url.path}?{urlencode(params)}"


def install(app: FastAPI, ctx: Context) -> None:
    """Adds /ui/ (pages, forms, login) and /ui/static/ to the app."""
    console = Console(ctx)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(LoginNeeded)
    async def login_needed(_: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse(f"/ui/login?{urlencode({'next': exc.target})}", status_code=303)

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused) -> Response:
        return console.error(request, exc.visit, 403, CSRF_REFUSED)

    _install_login(app, console)
    _install_overview(app, console)
    _install_batches(app, console)
    _install_actions(app, console)


def _install_login(app: FastAPI, console: Console) -> None:
    keys = console.keys

    @app.get("/ui/login", include_in_schema=False)
    async def login_form(request: Request, next: Cursor = None) -> Response:
        visit = Visit(request, keys)
        return console.render(request, visit, "login.html", target=safe_next(next))

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await form_of(request)
        target = safe_next(form.get("next"))
        if not keys.right_token(form.get("token", "")):
            visit = Visit(request, keys)
            return console.render(request, visit, "login.html", 401, target=target, wrong=True)
        answer = RedirectResponse(target, status_code=303)
        set_cookie(request, answer, keys.new_session())
        return answer

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await console.posted(request)
        answer = RedirectResponse("/ui/login" if keys.guarded else "/ui/", status_code=303)
        answer.delete_cookie(COOKIE, path=COOKIE_PATH)
        return answer


def _install_overview(app: FastAPI, console: Console) -> None:
    ctx = console.ctx

    @app.get("/ui", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/", status_code=308)

    @app.get("/ui/", include_in_schema=False)
    async def overview(request: Request) -> Response:
        visit = console.visit(request)
        grace = ctx.settings.stuck_grace_s
        found = await pages.overview(ctx.db, ctx.queue, grace, console.recent)
        return console.render(request, visit, "overview.html", o=found, window_s=pages.WINDOW_S)

    @app.get("/ui/dead-letters", include_in_schema=False)
    async def dead_letter_page(request: Request, after: StreamId = None) -> Response:
        visit = console.visit(request)
        found = await dead_letters.listed(ctx.queue, dead_letters.PAGE_SIZE, after)
        more = with_query(request, after=found["next"]) if found["next"] else None
        return console.render(request, visit, "dead_letters.html", page=found, more=more)


def _install_batches(app: FastAPI, console: Console) -> None:
    ctx = console.ctx
    grace = ctx.settings.stuck_grace_s

    @app.get("/ui/batches", include_in_schema=False)
    async def batch_list(
        request: Request,
        status: Text = None,
        stuck: bool = False,
        run: Text = None,
        q: Text = None,
        after: Cursor = None,
    ) -> Response:
        visit = console.visit(request)
        which = pages.BatchFilter(status or None, stuck, run or None, q or None)
        if which.status is not None and which.status not in pages.BATCH_STATUSES:
            return console.error(request, visit, 422, f"no batch status {status!r}")
        try:
            items, next_after = await pages.batch_page(ctx.db, which, grace, after)
        except ValueError as exc:
            return console.error(request, visit, 422, f"bad `after`: {exc}")
        more = with_query(request, after=next_after) if next_after else None
        values: dict[str, Any] = {
            "items": items,
            "which": which,
            "more": more,
            "statuses": pages.BATCH_STATUSES,
        }
        return console.render(request, visit, "batches.html", **values)

    @app.get("/ui/batches/{batch_id}", include_in_schema=False)
    async def batch_page(
        request: Request, batch_id: BatchId, files: Text = None, after: FileCursor = None
    ) -> Response:
        visit = console.visit(request)
        if files and files not in pages.FILE_STATUSES:
            return console.error(request, visit, 422, f"no file status {files!r}")
        try:
            found = await pages.batch_detail(ctx.db, batch_id, grace, files or None, after or "")
        except BatchNotFound as exc:
            return console.error(request, visit, 404, str(exc))
        more = with_query(request, after=found["files_next"]) if found["files_next"] else None
        notice = NOTICES.get(request.query_params.get("notice", ""))
        values: dict[str, Any] = {"b": found, "files_status": files, "more": more, "notice": notice}
        return console.render(request, visit, "batch.html", statuses=pages.FILE_STATUSES, **values)


def _install_actions(app: FastAPI, console: Console) -> None:
    ctx = console.ctx

    @app.post("/ui/batches/{batch_id}/cancel", include_in_schema=False)
    async def cancel(request: Request, batch_id: BatchId) -> Response:
        visit, form = await console.posted(request)
        try:
            await operations.cancel(ctx.db, batch_id, form.get("reason", ""), actor(ctx))
        except tuple(REFUSALS) as exc:
            return console.error(request, visit, REFUSALS[type(exc)], str(exc))
        return RedirectResponse(batch_url(batch_id) + "?notice=cancelled", status_code=303)

    @app.post("/ui/batches/{batch_id}/retry-failed", include_in_schema=False)
    async def retry_failed(request: Request, batch_id: BatchId) -> Response:
        visit, form = await console.posted(request)
        reason = form.get("reason", "")
        try:
            retried = await operations.retry_failed(ctx.db, ctx.queue, batch_id, reason, actor(ctx))
        except tuple(REFUSALS) as exc:
            return console.error(request, visit, REFUSALS[type(exc)], str(exc))
        return RedirectResponse(batch_url(retried.batch_id) + "?notice=retried", status_code=303)
