"""Live updates: the console follows ``GET /api/events`` instead of polling ``/api/state``.

Debian's chromium (Playwright) runs the real console against the real gateway;
a raw WebSocket client plays the sled; httpx reads the event stream directly
for the server-side limits (auth, the cap, the request deadline, shutdown).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from sled_gateway import Gateway
from tests.support import browser as browser_support
from tests.test_binding_browser import (
    PROJECT,
    TOKEN,
    UI_WAIT_MS,
    T,
    ask,
    open_sled,
)

pytestmark = pytest.mark.timeout(120)

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)
sync_api = browser_support.sync_api()


@pytest.fixture
def gw() -> Iterator[Gateway]:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3, request_timeout=1.0).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def card(req_id: str) -> str:
    return f'.card[data-project="{PROJECT}"][data-req-id="{req_id}"]'


def state_requests(log: list[str]) -> list[str]:
    return [u for u in log if "/api/state" in u]


def next_state(lines: Iterator[str]) -> dict[str, Any]:
    """The next ``event: state`` document of an SSE stream."""
    kind = ""
    for line in lines:
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:") and kind == "state":
            return json.loads(line[5:])
    raise AssertionError("the stream ended")


def test_a_new_request_shows_within_a_second_without_polling(gw: Gateway, page: Any) -> None:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(gw.console_url())
    sync_api.expect(page.locator("#summary")).not_to_contain_text("loading", timeout=UI_WAIT_MS)
    with open_sled(gw) as ws:
        time.sleep(2.5)  # the old console polled once a second: it would have by now
        before = len(state_requests(requests))
        started = time.monotonic()
        ask(ws, "live-1", "Bash", {"command": "echo live"})
        page.wait_for_selector(card("live-1"), timeout=UI_WAIT_MS)
        took = time.monotonic() - started
        assert took < 1.0, f"the card took {took:.2f} s"
        assert before == 0, state_requests(requests)
        assert state_requests(requests) == [], "no /api/state requests: the stream carries it"
        assert page.locator("#live").is_hidden()


def test_the_console_survives_a_gateway_restart(page: Any) -> None:
    first = Gateway(token=TOKEN, heartbeat_interval=0.3, operator_token="op-" + TOKEN).start()
    port = first.port
    try:
        page.goto(first.console_url())
        sync_api.expect(page.locator("#summary")).not_to_contain_text("loading", timeout=UI_WAIT_MS)
    finally:
        first.stop()
    sync_api.expect(page.locator("#live")).to_be_visible(timeout=UI_WAIT_MS)
    second = Gateway(
        token=TOKEN, heartbeat_interval=0.3, operator_token="op-" + TOKEN, port=port
    ).start()
    try:
        with open_sled(second) as ws:
            ask(ws, "while-down", "Bash", {"command": "echo missed"})
            # Console sessions end with the gateway process: the page says so, stays
            # offline, and keeps its cards; it is not reloaded.
            sync_api.expect(page.locator("#banner")).to_contain_text(
                "session ended", timeout=UI_WAIT_MS
            )
            assert page.locator("#live").is_visible()
            # The person opens the URL with the token again (another tab of the same
            # browser); the open page reconnects by itself and catches up.
            assert page.context.request.get(second.console_url()).ok
            page.wait_for_selector(card("while-down"), timeout=UI_WAIT_MS)
            sync_api.expect(page.locator("#live")).to_be_hidden(timeout=UI_WAIT_MS)
            sync_api.expect(page.locator("#banner")).to_be_hidden(timeout=UI_WAIT_MS)
    finally:
        second.stop()


def test_events_need_the_operator(gw: Gateway) -> None:
    answer = httpx.get(f"{gw.http_url}/api/events", timeout=T)
    assert answer.status_code == 401
    assert "error" in answer.json()


def test_streams_over_the_cap_get_503(gw: Gateway) -> None:
    gw._app.routes.live.max_streams = 2  # the default 32, made small to reach it
    readers = []  # an httpx line iterator closes its response when it is collected
    with ExitStack() as stack:
        for _ in range(2):
            r = stack.enter_context(
                httpx.stream(
                    "GET", f"{gw.http_url}/api/events", headers=gw.api_headers(), timeout=T
                )
            )
            assert r.status_code == 200
            readers.append(r.iter_lines())
            next_state(readers[-1])
        over = httpx.get(f"{gw.http_url}/api/events", headers=gw.api_headers(), timeout=T)
        assert over.status_code == 503
        assert "too many" in over.json()["error"]


def test_a_stream_outlives_the_request_deadline_and_follows_changes(gw: Gateway) -> None:
    with httpx.stream("GET", f"{gw.http_url}/api/events", headers=gw.api_headers(), timeout=T) as r:
        lines = r.iter_lines()
        first = next_state(lines)
        time.sleep(2.0)  # twice the gateway's request_timeout
        with open_sled(gw) as ws:
            ask(ws, "late", "Bash", {"command": "true"})
            while True:
                doc = next_state(lines)
                assert doc["version"] > first["version"]
                if any(p["req_id"] == "late" for p in doc["pending"]):
                    break


def test_changes_are_coalesced(gw: Gateway) -> None:
    with httpx.stream("GET", f"{gw.http_url}/api/events", headers=gw.api_headers(), timeout=T) as r:
        lines = r.iter_lines()
        next_state(lines)
        with open_sled(gw) as ws:
            started = time.monotonic()
            for i in range(200):
                ask(ws, f"burst-{i}", "Bash", {"command": f"echo {i}"})
            docs = 0
            while True:
                doc = next_state(lines)
                docs += 1
                if doc["counts"]["pending"] >= 200:
                    break
            took = time.monotonic() - started
        assert docs <= 10 * took + 2, f"{docs} documents in {took:.2f} s"


def test_shutdown_with_an_open_stream_is_quick() -> None:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3).start()
    try:
        opened = httpx.stream(
            "GET", f"{gateway.http_url}/api/events", headers=gateway.api_headers(), timeout=T
        )
        r = opened.__enter__()
        lines = r.iter_lines()  # kept: collecting it would close the stream
        next_state(lines)
        started = time.monotonic()
        gateway.stop()
        took = time.monotonic() - started
        assert took < 1.5, f"stopping took {took:.2f} s with a console stream open"
        list(lines)  # ends without an error: the stream was finished, not cut
        opened.__exit__(None, None, None)
    finally:
        gateway.stop()
