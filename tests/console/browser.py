"""A real headless Chromium (Debian's package, driven by Playwright) for the console tests.

No browser is ever downloaded: Playwright starts the `chromium` binary that
`scripts/ensure-tools` installs, and the tests skip, saying why, where there is none.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest

VIEWPORT: Final = {"width": 1280, "height": 800}
SCREENSHOTS: Final = Path(__file__).resolve().parents[2] / "docs" / "img"
UPDATE_ENV: Final = "RECONCILER_UPDATE_SCREENSHOTS"


def chromium_path() -> str:
    """The browser binary, or a skip that says how to get it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH: scripts/ensure-tools installs Debian's package")
    return found


class Page:
    """A browser tab that records every console error and uncaught exception."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location}")

    async def shot(self, name: str) -> None:
        """Writes docs/img/console-NAME.png when asked to (so a CI run leaves no change)."""
        if os.environ.get(UPDATE_ENV) == "1":
            await self.page.screenshot(path=str(SCREENSHOTS / f"console-{name}.png"))


@asynccontextmanager
async def browser_page(base_url: str) -> AsyncIterator[Page]:
    """One tab of a fresh headless Chromium, its URLs relative to the service."""
    executable = chromium_path()
    async_api = pytest.importorskip("playwright.async_api", reason="pip package playwright")
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = await browser.new_context(base_url=base_url, viewport=VIEWPORT)
            context.set_default_timeout(10_000)
            yield Page(await context.new_page())
            await context.close()
        finally:
            await browser.close()
