"""Debian's chromium, driven headless by Playwright, for the tests a person's clicks
(and a hostile page's requests) need.

One place for the binary, its flags and the skip reason: without the
background-networking flags chromium fills a closed network with refused
connections, and Playwright must never download a browser of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = os.environ.get("SLED_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (
            f"Debian's chromium is not installed at {CHROMIUM}: run "
            "`bash scripts/install-browser.sh` as root (apt-get install chromium)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: install the test extra (bash scripts/test.sh)"
    return None


def sync_api() -> Any:
    """``playwright.sync_api``, or skip the calling test with the reason."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import playwright.sync_api

    return playwright.sync_api


@contextmanager
def launch(extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """A headless chromium (a Playwright ``Browser``), closed on exit."""
    api = sync_api()
    with api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args], timeout=60_000
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def fresh_page(browser: Any) -> Iterator[Any]:
    """A page in a context of its own (no cookies shared between tests), closed on exit."""
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


#: The console's two layouts: a desk's window and a phone's (an iPhone 12-14's CSS pixels).
DESKTOP = {"width": 1100, "height": 700}
PHONE = {"width": 390, "height": 844}


@contextmanager
def watched_page(browser: Any, viewport: dict[str, int] = DESKTOP) -> Iterator[Any]:
    """A page in a context of its own, closed on exit; the test fails if the page threw a
    JavaScript error meanwhile (an uncaught one is a console bug even when the test's
    clicks still worked)."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors in the console page: {errors}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for a test module (a module needing other flags defines its own)."""
    with launch() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A desktop-sized watched page (:func:`watched_page`)."""
    with watched_page(browser) as fresh:
        yield fresh
