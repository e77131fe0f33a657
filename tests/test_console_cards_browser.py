"""Tool-aware pending cards in the console, at a phone's 390 x 844.

Debian's chromium (Playwright) runs the real console against the real gateway;
a raw WebSocket client plays the sled, so the test sees exactly the allow or
deny the sled gets. Every view renders sled text as text: the attack inputs
carry markup and bidi controls, and the page must create no element from them
and show the bidi controls as visible escapes. ``SLED_CONSOLE_PHONE_SCREENSHOT``
names a file to save the Edit card's screenshot to (``docs/`` has the
layout test's: ``tests/test_console_layout_browser.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
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
TOKEN = "cards-t0ken"
PROJECT = "cards-sled"
XSS = "<img src=x onerror=alert(1)>"

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    with browser_support.watched_page(browser, browser_support.PHONE) as page:
        page.on("dialog", on_dialog)
        yield page
    assert dialogs == [], f"a sled's text opened a dialog: {dialogs}"


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
def open_sled(gw: Gateway) -> Iterator[ClientConnection]:
    with connect(gw.url_for_sleds()) as ws:
        before = session_of(gw, PROJECT)
        ws.send(frame("identity", "identity", {"project": PROJECT}))
        gw.wait_for(lambda s: session_of(gw, PROJECT) not in (0, before), T)
        yield ws


@pytest.fixture
def sled(gw: Gateway) -> Iterator[Callable[[], ClientConnection]]:
    with ExitStack() as stack:
        yield lambda: stack.enter_context(open_sled(gw))


def show(
    gw: Gateway, page: Any, ws: ClientConnection, req_id: str, tool: str, tool_input: Any
) -> Any:
    """Ask, and return the card the console shows for exactly this input."""
    ws.send(frame("perm_request", req_id, {"tool_name": tool, "tool_input": tool_input}))
    selector = (
        f'.card[data-project="{PROJECT}"][data-req-id="{req_id}"]'
        f'[data-input-sha256="{input_sha256(tool_input)}"]'
    )
    return page.wait_for_selector(selector, timeout=UI_WAIT_MS)


def rows(card: Any, op: str) -> list[str]:
    return [r.inner_text() for r in card.query_selector_all(f".diff-row.{op}")]


def no_markup_from_the_sled(page: Any) -> None:
    assert page.locator("img").count() == 0, "a sled's text became an element"
    assert page.evaluate("() => document.querySelectorAll('[onerror]').length") == 0


def assert_fits(page: Any, card: Any) -> None:
    """Nothing in the card runs off a 390 px screen."""
    wide = page.evaluate(
        "(card) => [...card.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right"
        " > document.documentElement.clientWidth + 1).map(e => e.className || e.tagName)",
        card,
    )
    assert wide == [], wide


def test_an_edit_is_shown_as_a_diff_and_approved_by_its_button(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    before = "def f():\n    return 1\n\n\nprint(f())"
    after = "def f():\n    return 2\n\n\nprint(f())"
    edit = {"file_path": "/srv/app/main.py", "old_string": before, "new_string": after}
    ws = sled()
    page.goto(gw.console_url())
    card = show(gw, page, ws, "e1", "Edit", edit)
    text = card.inner_text()
    assert card.query_selector("[data-view=edit]") is not None
    assert "/srv/app/main.py" in text
    assert rows(card, "del") == ["-    return 1"]
    assert rows(card, "add") == ["+    return 2"]
    assert "old_string" not in text and "new_string" not in text and "file_path" not in text
    assert '"' not in card.query_selector("[data-field=tool-view]").inner_text(), "no JSON shown"
    assert_fits(page, card)
    if os.environ.get("SLED_CONSOLE_PHONE_SCREENSHOT"):
        page.screenshot(path=os.environ["SLED_CONSOLE_PHONE_SCREENSHOT"])

    card.query_selector("button[data-action=approve]").click()
    answer = json.loads(ws.recv(timeout=T))
    assert answer["req_id"] == "e1" and answer["payload"]["approved"] is True


def test_a_multiedit_shows_each_change_as_a_diff(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    edits = [
        {"old_string": "alpha", "new_string": "beta"},
        {"old_string": "one\ntwo", "new_string": "one\n2\nthree", "replace_all": True},
    ]
    ws = sled()
    page.goto(gw.console_url())
    card = show(gw, page, ws, "m1", "MultiEdit", {"file_path": "/srv/a.txt", "edits": edits})
    text = card.inner_text()
    assert len(card.query_selector_all("[data-edit]")) == 2
    assert "Change 1 of 2" in text and "Change 2 of 2" in text
    assert rows(card, "del") == ["-alpha", "-two"]
    assert rows(card, "add") == ["+beta", "+2", "+three"]
    assert "Replaces every occurrence." in text
    assert "old_string" not in text and "edits" not in text and "replace_all" not in text
    assert_fits(page, card)
    card.query_selector("button[data-action=deny]").click()
    answer = json.loads(ws.recv(timeout=T))
    assert answer["req_id"] == "m1" and answer["payload"]["approved"] is False


def test_a_bash_card_shows_the_command_highlighted_and_its_description(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    command = "npm test && cat 'a|b' | tee out.log > /tmp/x 2>&1; echo done"
    ws = sled()
    page.goto(gw.console_url())
    card = show(
        gw,
        page,
        ws,
        "b1",
        "Bash",
        {"command": command, "description": "Run the tests", "timeout": 60000},
    )
    shown_command = card.query_selector("[data-field=command]")
    assert shown_command.inner_text() == command
    ops = [o.inner_text() for o in shown_command.query_selector_all(".op")]
    assert ops == ["&&", "|", ">", "2>&1", ";"], ops  # the quoted | is not an operator
    assert card.query_selector("[data-field=description]").inner_text() == "Run the tests"
    # A field the view does not know is still shown: it is part of what is approved.
    assert '"timeout": 60000' in card.query_selector("[data-field=other-fields]").inner_text()
    assert_fits(page, card)

    # A quoted string over two lines: the ; and | inside it are not operators.
    script = "echo 'a;\nb|c' && ls"
    card = show(gw, page, ws, "b2", "Bash", {"command": script})
    ops = [o.inner_text() for o in card.query_selector_all("[data-field=command] .op")]
    assert ops == ["&&"], ops


def test_markup_from_a_sled_stays_text_in_every_view(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    ws = sled()
    page.goto(gw.console_url())
    cards = [
        show(
            gw,
            page,
            ws,
            "x1",
            "Edit",
            {"file_path": f"/tmp/{XSS}", "old_string": XSS, "new_string": f"ok {XSS}"},
        ),
        show(gw, page, ws, "x2", "Bash", {"command": f"echo {XSS} && true", "description": XSS}),
        show(gw, page, ws, "x3", "WebFetch", {"url": f"https://evil.example/{XSS}", "prompt": XSS}),
        show(
            gw,
            page,
            ws,
            "x4",
            "MultiEdit",
            {"file_path": "/tmp/a", "edits": [{"old_string": XSS, "new_string": ""}]},
        ),
        show(gw, page, ws, "x5", "Write", {"file_path": "/tmp/w.html", "content": XSS}),
        show(gw, page, ws, "x6", "Read", {"file_path": XSS}),
    ]
    for card in cards:
        assert XSS in card.inner_text()
    assert rows(cards[0], "del") == [f"-{XSS}"] and rows(cards[0], "add") == [f"+ok {XSS}"]
    assert cards[2].query_selector("[data-field=host]").inner_text() == "evil.example"
    no_markup_from_the_sled(page)
    page.wait_for_timeout(300)  # an onerror would have fired by now


def test_bidi_controls_in_a_diff_line_are_shown_escaped(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    ws = sled()
    page.goto(gw.console_url())
    card = show(
        gw,
        page,
        ws,
        "bd",
        "Edit",
        {
            "file_path": "/srv/acl.py",
            "old_string": "allowed = False",
            "new_string": "allowed = True  # \u202e\u2066 eslaF \u2069\u200b",
        },
    )
    added = rows(card, "add")
    assert added == ["+allowed = True  # \\u202e\\u2066 eslaF \\u2069\\u200b"], added
    text = card.inner_text()
    assert not any(ch in text for ch in "\u202e\u2066\u2069\u200b"), ascii(text)
    assert card.query_selector_all(".diff-row.add .esc"), "escapes are marked so they stand out"


def test_a_long_input_folds_and_unfolds(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    content = "\n".join(f"line {i}" for i in range(1, 101))
    ws = sled()
    page.goto(gw.console_url())
    card = show(gw, page, ws, "long", "Write", {"file_path": "/tmp/long.txt", "content": content})
    assert "line 40" in card.inner_text() and "line 41" not in card.inner_text()
    toggle = card.query_selector("button[data-fold]")
    assert toggle.inner_text() == "Show all 100 lines (60 more)"
    toggle.click()
    assert "line 100" in card.inner_text()
    # Whole input, once loaded for a cut-down request, also gets its view (not JSON).
    big = {"file_path": "/tmp/big.py", "old_string": "a\n" * 9000, "new_string": "b\n" * 9000}
    cut = show(gw, page, ws, "big", "Edit", big)
    assert cut.query_selector("button[data-action=approve]") is None
    cut.query_selector("button[data-show-whole]").click()
    approve = '.card[data-req-id="big"] button[data-action=approve]'
    page.wait_for_selector(approve, timeout=UI_WAIT_MS)
    assert cut.query_selector("[data-view=edit]") is not None
    assert "old_string" not in cut.inner_text()
    assert cut.query_selector("button[data-fold]") is not None
    page.click(approve)
    answer = json.loads(ws.recv(timeout=T))
    assert answer["req_id"] == "big" and answer["payload"]["approved"] is True


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


def _subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def test_the_page_diff_is_a_minimal_line_diff(gw: Gateway, page: Any) -> None:
    """The console's own lineDiff: removed rows come from the old text and added rows from
    the new one, in order, and no more of them than a longest common subsequence leaves."""
    import random

    rng = random.Random(25)
    page.goto(gw.console_url())
    for _ in range(60):
        old = [rng.choice("abcde") for _ in range(rng.randrange(0, 30))]
        new = [rng.choice("abcde") for _ in range(rng.randrange(0, 30))]
        got = page.evaluate("([a, b]) => lineDiff(a, b)", ["\n".join(old), "\n".join(new)])
        old_lines, new_lines = old, new  # no line is empty, so joining and splitting keeps them
        removed = [t for op, t in got if op == "-"]
        added = [t for op, t in got if op == "+"]
        assert _subsequence(removed, old_lines) and _subsequence(added, new_lines)
        lcs = _lcs(old_lines, new_lines)
        assert len(removed) == len(old_lines) - lcs and len(added) == len(new_lines) - lcs
    assert page.evaluate("() => lineDiff('', 'x')") == [["+", "x"]]
    assert page.evaluate("() => lineDiff('x\\ny', '')") == [["-", "x"], ["-", "y"]]
    # Over the size bound (4e6 LCS cells) the middle is "all removed, all added", quickly,
    # and the common head and tail stay context.
    olds, news = [f"o{i}" for i in range(2100)], [f"n{i}" for i in range(2100)]
    big_old, big_new = "\n".join(["head", *olds, "tail"]), "\n".join(["head", *news, "tail"])
    got = page.evaluate("([a, b]) => lineDiff(a, b)", [big_old, big_new])
    assert [t for op, t in got if op == "-"] == olds
    assert [t for op, t in got if op == "+"] == news
    assert got[0] == [" ", "head"] and got[-1] == [" ", "tail"]


def test_a_webfetch_card_names_the_host_the_browser_would_reach(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    ws = sled()
    page.goto(gw.console_url())
    fooled = show(
        gw,
        page,
        ws,
        "w1",
        "WebFetch",
        {"url": "https://docs.example.com@evil.example:8443/a", "prompt": "Summarise"},
    )
    assert fooled.query_selector("[data-field=host]").inner_text() == "evil.example:8443"
    assert "url" not in fooled.query_selector("[data-field=tool-view]").inner_text()
    idn = show(gw, page, ws, "w2", "WebFetch", {"url": "https://ex\u0430mple.com/"})  # a Cyrillic a
    assert (
        idn.query_selector("[data-field=host]").inner_text()
        == "ex\u0430mple.com".encode("idna").decode()
    )
    odd = show(gw, page, ws, "w3", "WebFetch", {"url": "javascript:alert(1)"})
    assert odd.query_selector("[data-field=host]").inner_text() == "none: not a web address"
    assert_fits(page, fooled)


def test_a_long_suggested_rule_does_not_widen_the_card(
    gw: Gateway, page: Any, sled: Callable[[], ClientConnection]
) -> None:
    """The "always allow" choice names a rule with a long unbroken path: it wraps; a
    fieldset is as wide as its content unless told otherwise."""
    path = "/srv/" + "a" * 300 + "/config.yaml"
    ws = sled()
    page.goto(gw.console_url())
    card = show(gw, page, ws, "long-rule", "Read", {"file_path": path})
    assert card.query_selector("[data-field=allow-choice]") is not None
    assert_fits(page, card)
