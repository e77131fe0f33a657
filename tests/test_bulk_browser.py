"""Bulk decisions in the console (issue 25, item 5), at 390 x 844 (a phone) and 1280 x 800.

Debian's chromium (Playwright) runs the real console against the real gateway;
raw WebSocket clients play three sleds, so the test sees exactly the answers
the sleds get. "Select all identical" must pick the cards with the same tool
and the same input on every sled, and nothing else (not the same input under
another tool, not another input on the same sled); "Approve N" must yield one
audit row and one answer per card, after a confirmation.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from protocol import input_sha256
from sled_gateway import Gateway
from tests.support import browser as browser_support

pytestmark = pytest.mark.timeout(120)

FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
UI_WAIT_MS = int(3 * T * 1000)
TOKEN = "bulk-t0ken"
SLEDS = ("sled-a", "sled-b", "sled-c")
CLEAN = {"command": "rm -rf build", "description": "Clean the build"}
OTHER = {"command": "rm -rf /", "description": "Clean the build"}

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)


class Page:
    """A 390 x 844 page whose confirmations are answered ``self.accept`` and recorded."""

    def __init__(self, browser: Any, width: int = 390, height: int = 844) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.accept = True
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        if dialog.type == "confirm" and self.accept:
            dialog.accept()
        else:
            dialog.dismiss()


@pytest.fixture
def ui(browser: Any, request: pytest.FixtureRequest) -> Iterator[Page]:
    page = Page(browser, *getattr(request, "param", (390, 844)))
    try:
        yield page
    finally:
        page.context.close()
    assert page.errors == [], f"JavaScript errors in the console page: {page.errors}"


@pytest.fixture
def gw() -> Iterator[Gateway]:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def frame(kind: str, req_id: str = "", payload: Any = None) -> str:
    return json.dumps({"type": kind, "req_id": req_id, "payload": payload})


def session_of(gw: Gateway, project: str) -> int:
    sled = next((s for s in gw.state()["sleds"] if s["project"] == project), None)
    return sled["session"] if sled and sled["state"] != "disconnected" else 0


@contextmanager
def open_sled(gw: Gateway, project: str) -> Iterator[ClientConnection]:
    with connect(gw.url_for_sleds()) as ws:
        before = session_of(gw, project)
        ws.send(frame("identity", "identity", {"project": project}))
        gw.wait_for(lambda s: session_of(gw, project) not in (0, before), T)
        yield ws


@pytest.fixture
def sleds(gw: Gateway) -> Iterator[dict[str, ClientConnection]]:
    with ExitStack() as stack:
        yield {p: stack.enter_context(open_sled(gw, p)) for p in SLEDS}


def card_selector(project: str, req_id: str, tool_input: Any) -> str:
    return (
        f'.card[data-project="{project}"][data-req-id="{req_id}"]'
        f'[data-input-sha256="{input_sha256(tool_input)}"]'
    )


def ask(ui: Page, ws: ClientConnection, project: str, req_id: str, tool: str, inp: Any) -> Any:
    ws.send(frame("perm_request", req_id, {"tool_name": tool, "tool_input": inp}))
    return ui.page.wait_for_selector(card_selector(project, req_id, inp), timeout=UI_WAIT_MS)


def selected(ui: Page) -> list[tuple[str, str]]:
    """(sled, request) of every card whose checkbox is ticked."""
    return sorted(
        (c.get_attribute("data-project"), c.get_attribute("data-req-id"))
        for c in ui.page.query_selector_all(".card")
        if c.query_selector("input[data-bulk-pick]").is_checked()
    )


def answer_of(ws: ClientConnection) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(ws.recv(timeout=T))
    return answer


def assert_tap_target(handle: Any) -> None:
    box = handle.bounding_box()
    assert box is not None and box["height"] >= 44 and box["width"] >= 44, box


def assert_nothing_too_wide(ui: Page) -> None:
    wide = ui.page.evaluate(
        "() => [...document.querySelectorAll('.card *, .card, #bulk-bar, #bulk-bar *')]"
        ".filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)"
        ".map(e => e.className || e.tagName)"
    )
    assert wide == [], wide


@pytest.mark.parametrize("ui", [(390, 844), (1280, 800)], indirect=True, ids=["phone", "desk"])
def test_all_identical_selects_exactly_the_identical_ones_and_approve_3_decides_3(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    ui.page.goto(gw.console_url())
    a1 = ask(ui, sleds["sled-a"], "sled-a", "r1", "Bash", CLEAN)
    ask(ui, sleds["sled-b"], "sled-b", "r1", "Bash", CLEAN)
    ask(ui, sleds["sled-c"], "sled-c", "r9", "Bash", CLEAN)
    ask(ui, sleds["sled-a"], "sled-a", "r2", "Bash", OTHER)  # another input, same sled
    ask(ui, sleds["sled-b"], "sled-b", "t1", "Task", CLEAN)  # the same input, another tool

    same = a1.query_selector("button[data-bulk-identical]")
    assert same.inner_text() == "Select all identical (3)"
    assert_tap_target(same)
    assert_tap_target(a1.query_selector(".bulk-pick"))
    assert ui.page.query_selector("#bulk-bar").is_hidden()
    same.click()
    assert selected(ui) == [("sled-a", "r1"), ("sled-b", "r1"), ("sled-c", "r9")]
    approve = ui.page.query_selector("#bulk-bar button[data-bulk=approve]")
    assert approve.is_visible() and approve.inner_text() == "Approve 3"
    assert ui.page.query_selector("#bulk-bar button[data-bulk=deny]").inner_text() == "Deny 3"
    assert_tap_target(approve)
    assert_nothing_too_wide(ui)

    # Refused at the confirmation: nothing is decided.
    ui.accept = False
    approve.click()
    assert len(ui.dialogs) == 1 and "Approve 3 requests" in ui.dialogs[0]
    ui.page.wait_for_timeout(300)
    assert gw.audit() == [] and len(ui.page.query_selector_all(".card")) == 5

    ui.accept = True
    approve.click()
    assert len(ui.dialogs) == 2 and "1 different input on 3 sleds" in ui.dialogs[1]
    for project in SLEDS:
        answer = answer_of(sleds[project])
        assert answer["payload"]["approved"] is True
        assert answer["payload"]["always_allow"] is False
    ui.page.wait_for_function(
        "() => document.querySelectorAll('.card').length === 2", timeout=UI_WAIT_MS
    )
    rows = gw.audit()
    assert sorted((r["project"], r["req_id"], r["decision"]) for r in rows) == [
        ("sled-a", "r1", "approve"),
        ("sled-b", "r1", "approve"),
        ("sled-c", "r9", "approve"),
    ]
    assert all(r["by"] == "console" for r in rows)
    assert gw.is_pending("sled-a", "r2") and gw.is_pending("sled-b", "t1")
    # The live stream may take the cards away before the bulk POST's answer reaches the
    # page; the banner is written when that answer is read.
    ui.page.wait_for_function(
        "() => document.getElementById('banner').textContent.length > 0", timeout=UI_WAIT_MS
    )
    assert "Approved 3 of 3." in ui.page.inner_text("#banner")
    assert ui.page.query_selector("#bulk-bar").is_hidden()


def test_picked_cards_are_denied_together_without_a_confirmation(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    ui.page.goto(gw.console_url())
    first = ask(ui, sleds["sled-a"], "sled-a", "d1", "Bash", CLEAN)
    second = ask(ui, sleds["sled-c"], "sled-c", "d2", "Bash", OTHER)
    keep = ask(ui, sleds["sled-b"], "sled-b", "d3", "Bash", {"command": "ls"})
    assert first.query_selector("button[data-bulk-identical]").is_hidden()  # one of its kind
    first.query_selector(".bulk-pick").click()
    second.query_selector(".bulk-pick").click()
    assert selected(ui) == [("sled-a", "d1"), ("sled-c", "d2")]
    ui.page.click("#bulk-bar button[data-bulk=deny]")
    assert answer_of(sleds["sled-a"])["payload"]["approved"] is False
    assert answer_of(sleds["sled-c"])["payload"]["approved"] is False
    assert ui.dialogs == []
    ui.page.wait_for_function(
        "() => document.querySelectorAll('.card').length === 1", timeout=UI_WAIT_MS
    )
    assert keep.is_visible()
    rows = gw.audit()
    assert sorted((r["req_id"], r["decision"]) for r in rows) == [("d1", "deny"), ("d2", "deny")]


def test_a_card_decided_elsewhere_is_reported_and_the_others_still_decided(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    ui.page.goto(gw.console_url())
    for project in SLEDS:
        ask(ui, sleds[project], project, "s1", "Bash", CLEAN)
    ui.page.click('.card[data-project="sled-a"] button[data-bulk-identical]')
    assert len(selected(ui)) == 3
    # The view is frozen (its live stream closed) so sled-b's card is still shown when
    # someone else denies that request through the library; then Approve 3.
    ui.page.evaluate("() => live.close()")
    gw.decide("sled-b", "s1", "deny")
    assert answer_of(sleds["sled-b"])["payload"]["approved"] is False
    ui.page.click("#bulk-bar button[data-bulk=approve]")
    for project in ("sled-a", "sled-c"):
        assert answer_of(sleds[project])["payload"]["approved"] is True
    ui.page.wait_for_function(
        "() => document.querySelectorAll('.card').length === 0", timeout=UI_WAIT_MS
    )
    shown = ui.page.inner_text("#banner")
    assert "Approved 2 of 3." in shown and "s1 of sled-b" in shown and "already deny" in shown
    decisions = sorted((r["project"], r["decision"]) for r in gw.audit())
    assert decisions == [("sled-a", "approve"), ("sled-b", "deny"), ("sled-c", "approve")]


def test_sled_text_in_a_bulk_card_stays_text(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    xss = {"command": "echo <img src=x onerror=alert(1)>"}
    ui.page.goto(gw.console_url())
    for project in ("sled-a", "sled-b"):
        ask(ui, sleds[project], project, "<b>x</b>", "<i>Bash</i>", xss)
    ui.page.click('.card[data-project="sled-a"] button[data-bulk-identical]')
    ui.accept = True
    ui.page.click("#bulk-bar button[data-bulk=approve]")
    for project in ("sled-a", "sled-b"):
        assert answer_of(sleds[project])["payload"]["approved"] is True
    assert ui.page.locator("img, b, i").count() == 0
    assert ui.dialogs and all("<" not in d for d in ui.dialogs)


def test_a_cut_down_card_is_selectable_only_once_its_whole_input_is_shown(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    big = {"file_path": "/srv/big.txt", "content": "x\n" * 12_000}  # over /api/state's 16 KiB
    ui.page.goto(gw.console_url())
    cut_a = ask(ui, sleds["sled-a"], "sled-a", "w1", "Write", big)
    cut_b = ask(ui, sleds["sled-b"], "sled-b", "w1", "Write", big)
    for card in (cut_a, cut_b):
        assert card.query_selector("input[data-bulk-pick]").is_disabled()
        assert card.query_selector("button[data-bulk-identical]").is_hidden()
    cut_a.query_selector("button[data-show-whole]").click()
    ui.page.wait_for_selector(
        '.card[data-project="sled-a"] button[data-action=approve]', timeout=UI_WAIT_MS
    )
    assert cut_a.query_selector("input[data-bulk-pick]").is_enabled()
    # sled-b's card was not shown whole: "identical" does not reach it.
    assert cut_a.query_selector("button[data-bulk-identical]").is_hidden()
    assert cut_b.query_selector("input[data-bulk-pick]").is_disabled()
    cut_a.query_selector(".bulk-pick").click()
    assert selected(ui) == [("sled-a", "w1")]
    ui.page.click("#bulk-bar button[data-bulk=approve]")  # one: no confirmation
    assert answer_of(sleds["sled-a"])["payload"]["approved"] is True
    assert ui.dialogs == []
    assert gw.is_pending("sled-b", "w1")


ATTACK_PAGE = """<!doctype html><title>free gift</title>
<form id="f" method="POST" enctype="text/plain" action="%(target)s">
<input name='{"decision": "approve", "items": %(items)s, "x": "' value='"}'>
</form>
<script>
window.sent = fetch(%(target_js)s, {method: 'POST', mode: 'no-cors', credentials: 'include',
  headers: {'Content-Type': 'text/plain'}, body: %(body_js)s})
  .then(r => 'answered ' + r.type, e => 'failed ' + e);
</script>"""


class AttackerSite:
    """A real HTTP server on another loopback port (the same site, another origin)."""

    def __init__(self, html: str) -> None:
        payload = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_page_on_another_port_cannot_bulk_approve_with_the_console_cookie(
    gw: Gateway, ui: Page, sleds: dict[str, ClientConnection]
) -> None:
    """The operator's browser is logged in (the cookie is not port-scoped); a page on
    another local port posts a text/plain bulk approve by fetch and by a plain form."""
    ui.page.goto(gw.console_url())
    for project in SLEDS:
        ask(ui, sleds[project], project, "v1", "Bash", CLEAN)
    items = json.dumps(
        [{"project": p, "req_id": "v1", "input_sha256": input_sha256(CLEAN)} for p in SLEDS]
    )
    target = f"{gw.http_url}/api/permissions/decide"
    site = AttackerSite(
        ATTACK_PAGE
        % {
            "target": target,
            "target_js": json.dumps(target),
            "items": items,
            "body_js": json.dumps(json.dumps({"decision": "approve", "items": json.loads(items)})),
        }
    )
    try:
        attacker = ui.context.new_page()
        attacker.goto(site.url)
        sent = attacker.evaluate("window.sent")
        # It went out; the answer is opaque, or (Cross-Origin-Resource-Policy) withheld.
        assert sent in ("answered opaque", "failed TypeError: Failed to fetch"), sent
        with attacker.expect_navigation(timeout=UI_WAIT_MS):
            attacker.evaluate("document.getElementById('f').submit()")
        shown = json.loads(attacker.inner_text("body", timeout=UI_WAIT_MS))
        assert "refused" in shown["error"], shown
        attacker.wait_for_timeout(300)
        assert gw.audit() == []
        assert all(gw.is_pending(p, "v1") for p in SLEDS)
        for project in SLEDS:
            with pytest.raises(TimeoutError):
                sleds[project].recv(timeout=0.3)
    finally:
        site.close()
