"""The web console over real HTTP without a browser: pages, login, CSRF, actions."""

from __future__ import annotations

import re
from dataclasses import replace

import httpx

from reconciler.app import Ports, Role
from reconciler.config import Settings
from reconciler.finalization import finalize
from tests.api.served import serving
from tests.helpers import files, record, sql, submit

TOKEN = "console-token-value"


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:2000]
    return found.group(1)


async def test_every_page_answers_html_with_the_batch_in_it(
    settings: Settings, ports: Ports
) -> None:
    """Overview, list (with each filter), detail and dead letters render real data."""
    batch = await submit(ports, files(3), run_id="run-a")
    await record(ports, batch.batch_id, ["f00000"], ok=False)
    async with serving(settings, ports, Role.API) as served:
        http = served.http
        pages = {
            "/ui/": "in progress",
            "/ui/batches": batch.batch_id,
            "/ui/batches?status=processing&run=run-a": batch.batch_id,
            f"/ui/batches?q={batch.batch_id[:8]}": batch.batch_id,
            f"/ui/batches/{batch.batch_id}": "every_file_terminal",
            f"/ui/batches/{batch.batch_id}?files=failed": "f00000",
            "/ui/dead-letters": "No dead letter",
        }
        answers = {path: await http.get(path) for path in pages}
        other_run = await http.get("/ui/batches?run=run-b")
        missing = await http.get("/ui/batches/no-such-batch")
        bad = await http.get("/ui/batches?status=nonsense")
        nul = await http.get("/ui/batches?run=a%00b")
        blank = await http.get("/ui/batches?status=&run=&q=")
        css = await http.get("/ui/static/console.css")
    for path, text in pages.items():
        answer = answers[path]
        assert answer.status_code == 200, (path, answer.text[:500])
        assert answer.headers["content-type"].startswith("text/html")
        assert "script-src" not in answer.headers["content-security-policy"]
        assert text in answer.text, path
    assert batch.batch_id not in other_run.text
    assert (missing.status_code, bad.status_code, css.status_code) == (404, 422, 200)
    assert (nul.status_code, blank.status_code) == (422, 200)


async def test_the_overview_counts_the_hours_finalizations_by_trigger(
    settings: Settings, ports: Ports
) -> None:
    """Two batches finalized by two triggers, then a third: each visit counts them all."""
    first, second, third = [await submit(ports, files(2, prefix=p)) for p in "abc"]
    for batch, prefix in ((first, "a"), (second, "b"), (third, "c")):
        await record(ports, batch.batch_id, [f"{prefix}00000", f"{prefix}00001"])
    await finalize(ports.db, first.batch_id, "event")
    await finalize(ports.db, second.batch_id, "demand")
    async with serving(settings, ports, Role.API) as served:
        before = (await served.http.get("/ui/")).text
        await finalize(ports.db, third.batch_id, "event")
        after = (await served.http.get("/ui/")).text
    rows = r"<tr><td>(\w+)</td><td class=\"num\">(\d+)</td></tr>"
    assert dict(re.findall(rows, before)) == {"demand": "1", "event": "1"}
    assert dict(re.findall(rows, after)) == {"demand": "1", "event": "2"}


async def test_keyset_pages_neither_skip_nor_repeat_batches_created_together(
    settings: Settings, ports: Ports, database_url: str
) -> None:
    """120 batches with one created_at: three pages, each batch on exactly one."""
    await sql(
        database_url,
        "INSERT INTO batches (batch_id, run_id, files_digest, total_files, created_at)"
        " SELECT 'same-' || i, 'r', '', 0, '2026-01-01T00:00:00Z' FROM generate_series(1, 120) i",
    )
    seen: list[str] = []
    async with serving(settings, ports, Role.API) as served:
        url: str | None = "/ui/batches"
        while url is not None:
            page = await served.http.get(url)
            assert page.status_code == 200
            seen += re.findall(r'data-batch-id="(same-\d+)"', page.text)
            more = re.search(r'href="([^"]+)" rel="next"', page.text)
            url = more.group(1).replace("&amp;", "&") if more else None
    assert len(seen) == 120 and len(set(seen)) == 120


async def test_with_a_token_pages_ask_for_it_and_forms_need_the_csrf_token(
    settings: Settings, ports: Ports
) -> None:
    """Redirect to the login form; a wrong token is 401; a POST without its CSRF is 403."""
    batch = await submit(ports, files(2))
    guarded = replace(settings, api_token=TOKEN, api_token_name="ops")
    async with serving(guarded, ports, Role.API) as served:
        http = served.http
        asked = await http.get(f"/ui/batches/{batch.batch_id}")
        wrong = await http.post("/ui/login", data={"token": "nope", "next": "/ui/"})
        login = await http.post("/ui/login", data={"token": TOKEN, "next": "/ui/batches"})
        cookie = login.headers["set-cookie"]
        page = await http.get(f"/ui/batches/{batch.batch_id}")
        cancel = f"/ui/batches/{batch.batch_id}/cancel"
        forged = await http.post(cancel, data={"reason": "forged", "csrf": "0" * 64})
        bare = await http.post(cancel, data={"reason": "forged"})
        done = await http.post(cancel, data={"reason": "runaway", "csrf": csrf_of(page)})
        audit = (await http.get(f"/ui/batches/{batch.batch_id}")).text
    assert asked.status_code == 303 and asked.headers["location"].startswith("/ui/login?next=")
    assert wrong.status_code == 401 and "not the token" in wrong.text
    assert login.status_code == 303 and login.headers["location"] == "/ui/batches"
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    assert (forged.status_code, bare.status_code) == (403, 403)
    assert done.status_code == 303, done.text
    assert "runaway" in audit and "token:ops" in audit and "forged" not in audit


async def test_retry_failed_from_the_form_makes_the_child_batch(
    settings: Settings, ports: Ports
) -> None:
    """Open console: the form's CSRF token still has to match the browser's cookie."""
    batch = await submit(ports, files(2))
    await record(ports, batch.batch_id, ["f00000"], ok=False)
    await record(ports, batch.batch_id, ["f00001"])
    await finalize(ports.db, batch.batch_id, "event")
    async with serving(settings, ports, Role.API) as served:
        http = served.http
        page = await http.get(f"/ui/batches/{batch.batch_id}")
        url = f"/ui/batches/{batch.batch_id}/retry-failed"
        refused = await http.post(url, data={"reason": "again"})
        empty = await http.post(url, data={"reason": " ", "csrf": csrf_of(page)})
        retried = await http.post(url, data={"reason": "again", "csrf": csrf_of(page)})
        child = await http.get(retried.headers["location"])
        parent = await http.get(f"/ui/batches/{batch.batch_id}")
    assert (refused.status_code, empty.status_code, retried.status_code) == (403, 422, 303)
    assert "runs the failed files of its parent" in child.text
    assert "retry_failed" in parent.text and "again" in parent.text
