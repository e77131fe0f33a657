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
