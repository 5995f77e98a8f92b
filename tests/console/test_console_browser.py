"""The web console in a real headless Chromium against the running service.

Live progress without a reload, cancel and retry-failed through the buttons (the
database and the audit change), the token's login form and the CSRF refusal; no page
logs a console error. With RECONCILER_UPDATE_SCREENSHOTS=1 it writes docs/img/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler import jobs
from reconciler.app import Ports, Role
from reconciler.batches import FileSpec
from reconciler.config import Settings
from tests.api.served import serving
from tests.console.browser import Page, browser_page
from tests.helpers import sql, submit, wait_for

pytest.importorskip("playwright.async_api", reason="pip package playwright (test extra)")
from playwright.async_api import Dialog, expect

HANDLER = "tests.console.handlers:gated"
FINALIZE_MS = 15_000
TOKEN = "browser-token-value"
FORGED = "form[action$='/cancel'] input[name=csrf]"  # the cancel form's CSRF field


def gated(settings: Settings) -> Settings:
    return replace(settings, handler=HANDLER, concurrency=8, file_timeout_s=60.0)


def specs(tmp: Path, name: str, count: int, error: str | None = None) -> list[FileSpec]:
    """Files that each wait for their own release file, failing with `error` if given."""
    payload = {"release": ""}
    found = []
    for i in range(count):
        payload = {"release": str(tmp / f"{name}-{i}.release")}
        if error:
            payload["error"] = error
        found.append(FileSpec(f"{name}-{i:02d}.csv", f"file:///data/{name}/{i}.csv", payload))
    return found


def release(tmp: Path, name: str, *indexes: int) -> None:
    for i in indexes:
        (tmp / f"{name}-{i}.release").touch()


async def status_of(database_url: str, batch_id: str) -> tuple[Any, ...]:
    rows = await sql(
        database_url, "SELECT status, finalized_by FROM batches WHERE batch_id = $1", batch_id
    )
    return tuple(rows[0])


async def accept_dialogs(dialog: Dialog) -> None:
    await dialog.accept()


async def test_pages_progress_live_and_the_buttons_act(
    settings: Settings, ports: Ports, database_url: str, tmp_path: Path
) -> None:
    """Every page loads clean; bars move as files finish; cancel and retry hit the audit."""
    run = {"run_id": "nightly-2026-12-01"}
    live = await submit(ports, specs(tmp_path, "live", 4), batch_id="orders-2026-12-01", **run)
    doomed = await submit(ports, specs(tmp_path, "doomed", 3), batch_id="invoices-stalled", **run)
    bad = specs(tmp_path, "bad", 3, error="IsADirectoryError: not a file")
    failing = await submit(ports, bad, batch_id="exports-nightly", **run)
    ghost = jobs.encode("deleted-batch", "ghost.csv", "file:///data/ghost.csv", None)
    await ports.queue.enqueue([ghost], [jobs.member("deleted-batch", "ghost.csv")])
    release(tmp_path, "bad", 0, 1, 2)
    try:
        async with (
            serving(gated(settings), ports, Role.ALL) as served,
            browser_page(str(served.http.base_url)) as tab,
        ):
            await wait_for(lambda: _finalized(database_url, failing.batch_id), what="failing")
            await _watch_progress(tab, tmp_path, live.batch_id)
            await _cancel(tab, database_url, doomed.batch_id)
            await _retry(tab, database_url, failing.batch_id)
            await _other_pages(tab)
            assert tab.errors == []
    finally:
        release(tmp_path, "live", 0, 1, 2, 3)
        release(tmp_path, "doomed", 0, 1, 2)


async def _finalized(database_url: str, batch_id: str) -> bool:
    return bool((await status_of(database_url, batch_id))[0] != "processing")


async def _watch_progress(tab: Page, tmp: Path, batch_id: str) -> None:
    page = tab.page
    await page.goto("/ui/batches")
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    await expect(row.locator("[data-count]")).to_have_text("0/4")
    await page.evaluate("window.notReloaded = true")
    release(tmp, "live", 0)
    await expect(row.locator("[data-count]")).to_have_text("1/4")
    await tab.shot("batches")
    release(tmp, "live", 1, 2, 3)
    await expect(row.locator("[data-count]")).to_have_text("4/4")
    # The page reads the batch again once it is complete; a busy host may be slow to
    # finalize it, so this wait is longer than the others.
    await expect(row.locator("[data-status]")).to_have_text("completed", timeout=FINALIZE_MS)
    await expect(row.locator("[data-finalized-by]")).to_have_text("event")
    assert await page.evaluate("window.notReloaded") is True, "the page was reloaded"


async def _cancel(tab: Page, database_url: str, batch_id: str) -> None:
    page = tab.page
    await page.goto(f"/ui/batches/{batch_id}")
    await expect(page.locator("[data-live-batch] [data-status]")).to_have_text("processing")
    await tab.shot("batch-processing")
    page.once("dialog", accept_dialogs)
    await page.fill("#cancel-reason", "upstream export was truncated")
    await page.click("text=Cancel batch")
    await expect(page.locator(".notice")).to_contain_text("Cancelled")
    assert await status_of(database_url, batch_id) == ("completed_with_errors", "operator")
    audit = page.locator("[data-audit]")
    await expect(audit).to_contain_text("cancel")
    await expect(audit).to_contain_text("upstream export was truncated")


async def _retry(tab: Page, database_url: str, batch_id: str) -> None:
    page = tab.page
    await page.goto(f"/ui/batches/{batch_id}?files=failed")
    await expect(page.locator("td.err").first).to_contain_text("IsADirectoryError")
    await tab.shot("batch")
    page.once("dialog", accept_dialogs)
    await page.fill("#retry-reason", "the folder is a file again")
    await page.click("text=Retry failed files")
    await expect(page.locator(".notice")).to_contain_text("failed files of its parent")
    children = await sql(
        database_url, "SELECT total_files FROM batches WHERE parent_batch_id = $1", batch_id
    )
    assert [tuple(c) for c in children] == [(3,)]
    await page.goto(f"/ui/batches/{batch_id}")
    await expect(page.locator("[data-audit]")).to_contain_text("retry_failed")
    await expect(page.locator("[data-audit]")).to_contain_text("the folder is a file again")


async def _other_pages(tab: Page) -> None:
    page = tab.page
    await page.goto("/ui/")
    await expect(page.locator("h1")).to_have_text("Overview")
    await expect(page.locator("figure svg polyline").first).to_be_attached()
    await tab.shot("overview")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Overview"
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")  # the Batches link, from the keyboard alone
    await expect(page.locator("h1")).to_have_text("Batches")
    await page.goto("/ui/dead-letters")
    await expect(page.locator("h1")).to_have_text("Dead letters")
    await expect(page.locator("table")).to_contain_text("ghost.csv")
    await tab.shot("dead-letters")
    await page.goto("/ui/batches?stuck=true")
    await expect(page.locator("h1")).to_have_text("Batches")


async def test_with_a_token_the_console_asks_for_it_and_refuses_a_form_without_csrf(
    settings: Settings, ports: Ports, database_url: str, tmp_path: Path
) -> None:
    """The login form first; then a cancel whose CSRF field was removed is a 403."""
    batch = await submit(ports, specs(tmp_path, "held", 1), batch_id="guarded-batch")
    guarded = replace(gated(settings), api_token=TOKEN, api_token_name="on-call")
    try:
        async with (
            serving(guarded, ports, Role.ALL) as served,
            browser_page(str(served.http.base_url)) as tab,
        ):
            page = tab.page
            await page.goto(f"/ui/batches/{batch.batch_id}")
            await expect(page.locator("h1")).to_have_text("Log in")
            await tab.shot("login")
            await page.fill("#token", TOKEN)
            await page.click("button:text('Log in')")
            await expect(page.locator("h1")).to_contain_text(batch.batch_id)
            await page.locator(FORGED).evaluate("field => field.remove()")
            page.once("dialog", accept_dialogs)
            await page.fill("#cancel-reason", "forged")
            async with page.expect_response(lambda r: r.request.method == "POST") as posted:
                await page.click("text=Cancel batch")
            assert (await posted.value).status == 403
            await expect(page.locator(".error")).to_contain_text("CSRF")
            assert await status_of(database_url, batch.batch_id) == ("processing", None)
            tab.errors = [e for e in tab.errors if "403" not in e]  # the refusal itself
            assert tab.errors == []
    finally:
        release(tmp_path, "held", 0)
