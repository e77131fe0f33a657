"""The console's card of a request under a quorum, in chromium: "1 of 2 approvals: alice".

The gateway has an access file with a quorum; a person votes with a person token over
the API, and the operator's console shows the count and the voter on the card, live;
the operator's own approval then completes the quorum (the operator is one voter).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sled_gateway import Gateway
from sled_gateway.access import load_access
from tests.support import browser as browser_support
from tests.test_binding_browser import TOKEN, UI_WAIT_MS, T, ask, open_sled
from tests.test_people import QUORUM

pytestmark = pytest.mark.timeout(120)

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)
sync_api = browser_support.sync_api()

PROJECT = "web-quorum"


@pytest.fixture
def page() -> Iterator[Any]:
    with browser_support.launch() as chromium:
        context = chromium.new_context(viewport={"width": 390, "height": 844})
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    path = tmp_path / "quorum.toml"
    path.write_text(QUORUM)
    gateway = Gateway(token=TOKEN, access=load_access(path)).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_the_card_shows_the_approvals_so_far(gw: Gateway, page: Any) -> None:
    headers = {**gw.api_headers(), "Content-Type": "application/json"}
    with httpx.Client(base_url=gw.http_url, headers=headers, timeout=T) as client:
        made = client.post("/api/tokens", json={"person": "alice@example.test"})
        alice = {"Authorization": f"Bearer {made.json()['token']}"}
        page.goto(gw.console_url())
        with open_sled(gw, PROJECT) as ws:
            ask(ws, "push", "Bash", {"command": "git push origin main"})
            card = page.locator(f'.card[data-project="{PROJECT}"][data-req-id="push"]')
            quorum = card.locator("[data-field=quorum]")
            sync_api.expect(quorum).to_have_text("0 of 2 approvals", timeout=UI_WAIT_MS)
            voted = client.post(
                f"/api/permissions/{PROJECT}/push", json={"decision": "approve"}, headers=alice
            )
            assert voted.status_code == 202, voted.text
            sync_api.expect(quorum).to_have_text(
                "1 of 2 approvals: alice@example.test", timeout=UI_WAIT_MS
            )
            card.locator("button[data-action=approve]").click()
            sync_api.expect(card).to_have_count(0, timeout=UI_WAIT_MS)
            reply = ws.recv(timeout=T)
            assert '"approved": true' in reply or '"approved":true' in reply
    rows = [r for r in gw.audit() if r["req_id"] == "push"]
    assert rows[0]["reason"] == "quorum 2 of 2: alice@example.test, operator"
    assert (rows[0]["who"], rows[0]["channel"]) == ("operator", "console")
