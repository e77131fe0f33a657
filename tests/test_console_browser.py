"""The gateway's web console in a real headless browser (Debian's chromium via Playwright).

A real uplink (with its HTTP ingress) is connected to a real gateway; a caller
POSTs ``/permission`` to the uplink and blocks; the console, loaded in
chromium, shows the pending card; the test clicks its button and sees the
caller's blocked request complete with that decision.

Chromium comes from Debian (``scripts/install-browser.sh``, run by
``scripts/test.sh``), never from ``playwright install``. Without it (or
without the ``playwright`` package) these tests skip, saying why.
``SLED_CHROMIUM`` points at another chromium binary; ``SLED_CONSOLE_SCREENSHOT``
names a file to also save the pending-request screenshot to (the
screenshots under ``docs/`` come from ``tests/test_console_layout_browser.py``).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors import Uplink
from sled_gateway import Gateway
from tests.support import browser as browser_support

pytestmark = pytest.mark.timeout(120)

FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
UI_WAIT_MS = int(3 * T * 1000)  # the console polls /api/state once a second
TOKEN = "browser-t0ken"
PROJECT = "demo-sled"

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)
sync_api = browser_support.sync_api()


@pytest.fixture
def gw() -> Iterator[Gateway]:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _connected_uplink(gw: Gateway, make_uplink: Callable[..., Uplink], **extra: Any) -> Uplink:
    extra.setdefault("heartbeat_interval", 0.1)
    uplink = make_uplink(gw.url_for_sleds(), project=PROJECT, listen="127.0.0.1:0", **extra)
    assert uplink.wait_connected(T)
    return uplink


class Caller:
    """A sled process asking the uplink's ingress for permission; it blocks until decided."""

    def __init__(self, port: int, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(port, body), daemon=True)
        self._thread.start()

    def _run(self, port: int, body: dict[str, Any]) -> None:
        try:
            self.response = httpx.post(
                f"http://127.0.0.1:{port}/permission", json=body, timeout=6 * T
            )
        except BaseException as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> dict[str, Any]:
        self._thread.join(3 * T)
        assert not self._thread.is_alive(), "the permission call did not complete"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        assert self.response.status_code == 200, self.response.text
        answer: dict[str, Any] = self.response.json()
        return answer


def _sel(**attrs: str) -> str:
    return "".join(f'[{name.replace("_", "-")}="{value}"]' for name, value in attrs.items())


@pytest.mark.parametrize("decision", ["approve", "deny", "always_allow"])
def test_clicking_in_the_console_answers_the_waiting_permission_call(
    gw: Gateway,
    make_uplink: Callable[..., Uplink],
    page: Any,
    tmp_path: Path,
    decision: str,
) -> None:
    uplink = _connected_uplink(gw, make_uplink)
    page.goto(gw.console_url())  # logs in (session cookie), then redirects to /
    assert page.url == gw.http_url + "/", "the token must leave the address bar"
    page.wait_for_selector(
        f"#sleds tr{_sel(data_project=PROJECT, data_state='connected')}", timeout=UI_WAIT_MS
    )

    req_id = f"req-{uuid.uuid4().hex[:10]}"
    tool_input = {"command": "pytest -q", "description": "Run the test suite"}
    caller = Caller(
        uplink._ingress.port,
        {"tool_name": "Bash", "tool_input": tool_input, "request_id": req_id},
    )

    card = page.wait_for_selector(
        f".card{_sel(data_project=PROJECT, data_req_id=req_id)}", timeout=UI_WAIT_MS
    )
    text = card.inner_text()
    assert "Bash" in text
    assert PROJECT in text
    assert req_id in text
    # The Bash view: the command and the description the agent gave, not JSON.
    assert card.query_selector("[data-field=command]").inner_text() == "pytest -q"
    assert card.query_selector("[data-field=description]").inner_text() == "Run the test suite"
    # The sleds table counts it as pending too (5th column).
    sync_api.expect(
        page.locator(f"#sleds tr{_sel(data_project=PROJECT)} td:nth-child(5)")
    ).to_have_text("1", timeout=UI_WAIT_MS)

    shot = tmp_path / f"console-pending-{decision}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the console with a pending request: {shot}")
    if decision == "approve" and os.environ.get("SLED_CONSOLE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SLED_CONSOLE_SCREENSHOT"])
    assert shot.stat().st_size > 1000
    assert not caller.done(), "the permission call must wait for the click"
    assert gw.is_pending(PROJECT, req_id)

    page.click(
        f"button{_sel(data_action=decision, data_project=PROJECT, data_req_id=req_id)}",
        timeout=UI_WAIT_MS,
    )

    answer = caller.result()
    assert answer["request_id"] == req_id
    assert answer["decision"] == decision
    assert answer["reason"] == "gateway"
    assert answer["behavior"] == ("deny" if decision == "deny" else "allow")

    # The card goes, and the decision shows in the audit log (the one list of what was
    # decided), made by the console.
    page.wait_for_selector(
        f".card{_sel(data_project=PROJECT, data_req_id=req_id)}",
        state="detached",
        timeout=UI_WAIT_MS,
    )
    row = f"#audit tr{_sel(data_project=PROJECT, data_req_id=req_id)}"
    sync_api.expect(page.locator(f"{row} td[data-field=decision]")).to_have_text(
        decision, timeout=UI_WAIT_MS
    )
    sync_api.expect(page.locator(f"{row} td[data-field=by]")).to_have_text("console")
    assert gw.state()["decisions"][0]["by"] == "console"
    assert page.is_visible("#empty-pending")
    after = tmp_path / f"console-decided-{decision}.png"
    page.screenshot(path=str(after), full_page=True)
    print(f"screenshot after the click: {after}")


def test_console_shows_a_stale_then_disconnected_sled(
    gw: Gateway, make_uplink: Callable[..., Uplink], page: Any
) -> None:
    # Gateway: stale after 3 x 0.3 s without a heartbeat; this uplink beats every 30 s.
    uplink = _connected_uplink(gw, make_uplink, heartbeat_interval=30.0)
    page.goto(gw.console_url())
    page.wait_for_selector(
        f"#sleds tr{_sel(data_project=PROJECT, data_state='stale')}", timeout=UI_WAIT_MS
    )
    uplink.stop()
    page.wait_for_selector(
        f"#sleds tr{_sel(data_project=PROJECT, data_state='disconnected')}", timeout=UI_WAIT_MS
    )
    assert "0 sled(s) connected" in page.inner_text("#summary")
