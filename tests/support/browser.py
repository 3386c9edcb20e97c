"""Debian's headless Chromium driven by Playwright (the Python package; it downloads no browser:
it launches /usr/bin/chromium), with screenshots written for a person to look at."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # playwright is imported when a test needs it (skipped without it)
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"


def require_chromium() -> str:
    """The system Chromium; the test is skipped, saying why, when it is not installed."""
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium, Debian package chromium; "
                    "scripts/setup.sh installs it)")
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (playwright.sync_api.Browser) for the duration of the block."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra) is not installed")
    path = require_chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Screenshots into one folder, numbered in the order taken."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def take(self, page: Page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=str(path), full_page=True)
        return path
