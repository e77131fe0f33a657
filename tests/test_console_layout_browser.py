"""The console's layout on phones and desks, its keys, and axe-core's accessibility check.

Debian's chromium (Playwright) opens the real console of a real gateway; a raw
WebSocket client plays the sled, so a test sees exactly the allow or deny the
sled gets. Every test starts from one scene: a sled connected, a pending Edit
and Bash card, a rule, a rules check with its parts table, and an audit row
whose input is one long unbroken path. At 360 x 740, 390 x 844 and 1280 x 800
nothing may run off the right edge; at 390 the tap targets are at least 44 px
tall; on a desk ``a`` / ``d`` decide the focused card and never what is typed in
a form. The accessibility check injects the pinned axe-core
(``scripts/install-axe.sh``, into ``.tools/axe-core``) and allows no serious or
critical violation. ``SLED_CONSOLE_LAYOUT_SCREENSHOTS`` names a folder to save
``console.png`` (1280 x 800) and ``console-phone.png`` (390 x 844) of the scene
to (how the two under ``docs/`` are made).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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
TOKEN = "layout-t0ken"
PROJECT = "layout-sled"
AXE = Path(__file__).resolve().parent.parent / ".tools/axe-core/node_modules/axe-core/axe.min.js"
PHONE = (390, 844)
DESK = (1280, 800)
SIZES = [(360, 740), PHONE, DESK]
LONG_PATH = "/srv/" + "unbroken" * 40 + "/settings.yaml"
EDIT = {
    "file_path": "/srv/app/main.py",
    "old_string": "def total(items):\n    return sum(items)\n",
    "new_string": "def total(items):\n    return sum(i.price for i in items)\n",
}
BASH = {"command": "npm test && npm run build > build.log 2>&1", "description": "Test and build"}

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)


@pytest.fixture
def gw() -> Iterator[Gateway]:
    # The raw sled sends no heartbeats: a long interval keeps it "connected", not stale.
    gateway = Gateway(token=TOKEN, heartbeat_interval=30).start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def ws(gw: Gateway) -> Iterator[ClientConnection]:
    with connect(gw.url_for_sleds()) as sled:
        sled.send(frame("identity", "identity", {"project": PROJECT}))
        gw.wait_for(lambda s: any(x["project"] == PROJECT for x in s["sleds"]), T)
        yield sled


def frame(kind: str, req_id: str = "", payload: Any = None) -> str:
    return json.dumps({"type": kind, "req_id": req_id, "payload": payload})


def card_selector(req_id: str, tool_input: Any) -> str:
    return (
        f'.card[data-project="{PROJECT}"][data-req-id="{req_id}"]'
        f'[data-input-sha256="{input_sha256(tool_input)}"]'
    )


def ask(page: Any, ws: ClientConnection, req_id: str, tool: str, tool_input: Any) -> Any:
    """Ask, and return the card the console shows for exactly this input."""
    ws.send(frame("perm_request", req_id, {"tool_name": tool, "tool_input": tool_input}))
    return page.wait_for_selector(card_selector(req_id, tool_input), timeout=UI_WAIT_MS)


def answer(ws: ClientConnection) -> tuple[str, bool]:
    """The next decision the sled gets: (req_id, approved)."""
    got = json.loads(ws.recv(timeout=T))
    return got["req_id"], got["payload"]["approved"]


def nothing_sent(ws: ClientConnection, wait: float = 0.7) -> bool:
    try:
        ws.recv(timeout=wait * FACTOR)
    except TimeoutError:
        return True
    return False


@contextmanager
def console(browser: Any, gw: Gateway, size: tuple[int, int]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(gw.console_url())
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors in the console page: {errors}"


def scene(gw: Gateway, page: Any, ws: ClientConnection) -> tuple[Any, Any]:
    """An audit row (a denied Read of a long path), a rule, a rules check, and a pending
    Edit and Bash card; returns the two cards."""
    ws.send(
        frame("perm_request", "r0", {"tool_name": "Read", "tool_input": {"file_path": LONG_PATH}})
    )
    gw.wait_for(lambda s: gw.is_pending(PROJECT, "r0"), T)
    gw.decide(PROJECT, "r0", "deny", by="layout-test")
    assert answer(ws) == ("r0", False)
    page.wait_for_selector('#audit tr[data-req-id="r0"]', timeout=UI_WAIT_MS)

    edit = ask(page, ws, "e1", "Edit", EDIT)
    bash = ask(page, ws, "b1", "Bash", BASH)

    page.fill("#grammar-form input[name=rule]", "Bash(npm test:*)")
    page.fill("#grammar-form input[name=reason]", "the test suite")
    page.click("#add-grammar-rule")
    page.wait_for_selector("#rules tr[data-rule-kind=grammar]", timeout=UI_WAIT_MS)
    page.fill("#check-form textarea[name=command]", "npm test && rm -rf /tmp/cache")
    page.fill("#check-form input[name=project]", PROJECT)
    page.click("#check-rules")
    page.wait_for_selector("#check-result table tr[data-part]", timeout=UI_WAIT_MS)
    return edit, bash


# Every visible element whose right edge is past the viewport's, as "tag#id.class".
OFF_THE_EDGE = """() => {
  const width = document.documentElement.clientWidth;
  return [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.right > width + 1;
  }).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
              (typeof e.className === 'string' && e.className ? '.' + e.className : ''));
}"""


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nothing_runs_off_the_right_edge(
    browser: Any, gw: Gateway, ws: ClientConnection, size: tuple[int, int]
) -> None:
    with console(browser, gw, size) as page:
        scene(gw, page, ws)
        scroll, client = page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert scroll <= client, f"the page scrolls sideways: {scroll} > {client} px"
        assert page.evaluate(OFF_THE_EDGE) == []
        if size[0] <= 600:
            # Stacked: each cell says which column it is, from the header.
            label = page.evaluate(
                "() => getComputedStyle(document.querySelector("
                "'#audit tr[data-req-id=\"r0\"] td[data-field=decision]'), '::before').content"
            )
            assert label == '"Decision"', label
            assert page.is_visible('#audit tr[data-req-id="r0"]')


def test_tap_targets_are_44px_and_each_card_decides_in_one_tap(
    browser: Any, gw: Gateway, ws: ClientConnection
) -> None:
    with console(browser, gw, PHONE) as page:
        edit, bash = scene(gw, page, ws)
        for card in (edit, bash):
            for action in ("approve", "deny"):
                box = card.query_selector(f"button[data-action={action}]").bounding_box()
                assert box["height"] >= 44, (action, box)
        small = page.evaluate(
            """() => [...document.querySelectorAll(
                 'button, select, textarea, input:not([type=radio]):not([type=checkbox]), label')]
               .filter(e => e.offsetParent !== null)
               .filter(e => e.tagName !== 'LABEL' || e.querySelector('input'))
               .map(e => [e.outerHTML.slice(0, 80), e.getBoundingClientRect().height])
               .filter(([, h]) => h < 44)"""
        )
        assert small == [], small
        # One tap: Approve on the Edit card, read by its diff, answers the sled.
        assert [r.inner_text() for r in edit.query_selector_all(".diff-row.add")] == [
            "+    return sum(i.price for i in items)"
        ]
        edit.query_selector("button[data-action=approve]").click()
        assert answer(ws) == ("e1", True)


def test_keys_a_and_d_decide_the_focused_card_and_never_what_is_typed(
    browser: Any, gw: Gateway, ws: ClientConnection
) -> None:
    with console(browser, gw, DESK) as page:
        edit, bash = scene(gw, page, ws)
        assert edit.get_attribute("tabindex") == "0" and bash.get_attribute("tabindex") == "0"

        # Typed into the rule box and the check's text area: text, not decisions.
        edit.focus()
        page.click("#grammar-form input[name=rule]")
        page.keyboard.type("ad")
        page.click("#check-form textarea[name=command]")
        page.keyboard.press("End")
        page.keyboard.type(" a d")
        assert nothing_sent(ws)
        assert gw.is_pending(PROJECT, "e1") and gw.is_pending(PROJECT, "b1")
        assert page.input_value("#grammar-form input[name=rule]") == "ad"

        # "a" on the focused Bash card approves it: the sled gets allow.
        bash.focus()
        page.keyboard.press("a")
        assert answer(ws) == ("b1", True)
        # "d" on the focused Edit card denies it.
        edit.focus()
        page.keyboard.press("d")
        assert answer(ws) == ("e1", False)
        page.wait_for_selector(".card", state="detached", timeout=UI_WAIT_MS)


def test_a_cut_down_card_is_not_approved_by_its_key(
    browser: Any, gw: Gateway, ws: ClientConnection
) -> None:
    """Like its buttons: a shown-in-part input may be denied by "d", never approved by "a"."""
    big = {"file_path": "/srv/big.py", "old_string": "a\n" * 9000, "new_string": "b\n" * 9000}
    with console(browser, gw, DESK) as page:
        cut = ask(page, ws, "big", "Edit", big)
        assert cut.query_selector("[data-field=cut]") is not None
        cut.focus()
        page.keyboard.press("a")
        assert nothing_sent(ws)
        assert gw.is_pending(PROJECT, "big")
        assert "show its whole input" in page.inner_text("#banner")
        cut.focus()
        page.keyboard.press("d")
        assert answer(ws) == ("big", False)


def axe_violations(page: Any, where: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page; all counts printed."""
    if not AXE.is_file():
        pytest.skip(f"axe-core is not installed at {AXE}: run `bash scripts/install-axe.sh`")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))"
    )
    counts: dict[str, int] = {}
    for violation in result:
        counts[violation["impact"]] = counts.get(violation["impact"], 0) + 1
    print(f"\naxe-core {where}: violations by impact {counts or 'none'}")
    for violation in result:
        print(
            f"  {violation['impact']}: {violation['id']} ({violation['help']}) {violation['nodes']}"
        )
    return [v for v in result if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("size", [PHONE, DESK], ids=lambda s: f"{s[0]}x{s[1]}")
def test_axe_finds_no_serious_or_critical_violation(
    browser: Any, gw: Gateway, ws: ClientConnection, size: tuple[int, int]
) -> None:
    if not AXE.is_file():
        pytest.skip(f"axe-core is not installed at {AXE}: run `bash scripts/install-axe.sh`")
    with console(browser, gw, size) as page:
        scene(gw, page, ws)
        shots = os.environ.get("SLED_CONSOLE_LAYOUT_SCREENSHOTS")
        if shots:  # how docs/console.png and docs/console-phone.png are made
            name = "console-phone.png" if size == PHONE else "console.png"
            page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
            page.screenshot(path=str(Path(shots) / name))
        assert axe_violations(page, f"at {size[0]}x{size[1]}") == []


def test_axe_on_every_card_view_a_revoked_rule_and_a_banner(
    browser: Any, gw: Gateway, ws: ClientConnection
) -> None:
    """The views the main scene lacks: each tool's card, hidden characters shown as
    escapes, a cut-down card, a revoked rule (struck through) and the banner."""
    if not AXE.is_file():
        pytest.skip(f"axe-core is not installed at {AXE}: run `bash scripts/install-axe.sh`")
    with console(browser, gw, PHONE) as page:
        scene(gw, page, ws)
        ask(page, ws, "w1", "Write", {"file_path": "/srv/a.txt", "content": "one\ntwo"})
        ask(page, ws, "rd", "Read", {"file_path": "/srv/a.txt", "offset": 3})
        ask(page, ws, "wf", "WebFetch", {"url": "https://example.com/a", "prompt": "Sum up"})
        ask(
            page,
            ws,
            "me",
            "MultiEdit",
            {
                "file_path": "/srv/b",
                "edits": [{"old_string": "a", "new_string": "b", "replace_all": True}],
            },
        )
        ask(page, ws, "hid", "Bash", {"command": "echo \u202egnp.exe"})
        ask(page, ws, "js", "NotebookEdit", {"notebook_path": "/srv/n.ipynb", "cell": 1})
        big = {"file_path": "/srv/big.py", "old_string": "a\n" * 9000, "new_string": "b\n" * 9000}
        cut = ask(page, ws, "big", "Edit", big)
        cut.focus()
        page.keyboard.press("a")  # the banner: show the whole input first
        page.wait_for_selector("#banner:visible", timeout=UI_WAIT_MS)
        page.click("#rules button[data-revoke]")
        page.check("#show-revoked")
        page.wait_for_selector("#rules tr.revoked", timeout=UI_WAIT_MS)
        assert axe_violations(page, "on every view at 390x844") == []
        assert page.evaluate(OFF_THE_EDGE) == []
