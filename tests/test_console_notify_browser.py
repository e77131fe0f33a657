"""Notifications, the title count and the installable console, in Debian's chromium.

The real gateway and console, a raw WebSocket client as the sled, Playwright
driving chromium. Chromium's notification permission is granted the way these
tests drive it (Playwright's ``grant_permissions``, the CDP
``Browser.grantPermissions`` call); an init script wraps ``window.Notification``
to record each construction while still calling the real one, and counts the
calls of ``Notification.requestPermission``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sled_gateway import Gateway
from tests.support import browser as browser_support
from tests.test_binding_browser import PROJECT, TOKEN, UI_WAIT_MS, T, ask, open_sled

pytestmark = pytest.mark.timeout(120)

if (why := browser_support.skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)
sync_api = browser_support.sync_api()

RECORD_NOTIFICATIONS = """
(() => {
  const Real = window.Notification;
  window.__notes = [];
  window.__noteObjects = [];
  window.__asked = 0;
  function Recording(title, options) {
    window.__notes.push({title, body: options && options.body, tag: options && options.tag});
    const made = new Real(title, options);
    window.__noteObjects.push(made);
    return made;
  }
  Recording.prototype = Real.prototype;
  Object.defineProperty(Recording, "permission", {get: () => Real.permission});
  Recording.requestPermission = (...args) => {
    window.__asked += 1;
    return Real.requestPermission(...args);
  };
  window.Notification = Recording;
})();
"""

SHELL = {"/", "/manifest.webmanifest", "/icons/icon-192.png", "/icons/icon-512.png"}


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    context.add_init_script(RECORD_NOTIFICATIONS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert errors == [], f"JavaScript errors in the console page: {errors}"


@pytest.fixture
def gw() -> Iterator[Gateway]:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def card(req_id: str) -> str:
    return f'.card[data-project="{PROJECT}"][data-req-id="{req_id}"]'


def notes(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate("window.__notes"))


def decide(gw: Gateway, req_id: str, decision: str = "deny") -> None:
    answer = httpx.post(
        f"{gw.http_url}/api/permissions/{PROJECT}/{req_id}",
        json={"decision": decision},
        headers=gw.api_headers(),
        timeout=T,
    )
    assert answer.status_code == 200, answer.text


def settle() -> None:
    """Long enough for several state events (heartbeats every 0.3 s) to reach the page."""
    time.sleep(1.0)


def test_one_notification_per_new_request_only_after_permission(
    gw: Gateway, context: Any, page: Any
) -> None:
    with open_sled(gw) as ws:
        ask(ws, "at-load", "Bash", {"command": "echo was already here"})
        gw.wait_for(lambda s: len(s["pending"]) == 1, T)
        page.goto(gw.console_url())
        page.wait_for_selector(card("at-load"), timeout=UI_WAIT_MS)
        sync_api.expect(page.locator("#notify-me")).to_be_visible()
        # No permission yet: a new request shows its card, and no notification.
        ask(ws, "no-permission", "Bash", {"command": "echo unseen"})
        page.wait_for_selector(card("no-permission"), timeout=UI_WAIT_MS)
        settle()
        assert notes(page) == []
        assert page.evaluate("window.__asked") == 0, "the page asked for permission on load"

        context.grant_permissions(["notifications"], origin=gw.http_url)
        assert page.evaluate("Notification.permission") == "granted"
        ask(ws, "new-1", "Bash", {"command": "rm -rf build/ && make", "description": "<b>x</b>"})
        page.wait_for_selector(card("new-1"), timeout=UI_WAIT_MS)
        settle()  # later state documents list new-1 again: still one notification
        got = notes(page)
        assert len(got) == 1, got
        assert got[0]["title"] == f"Sled {PROJECT} asks to use Bash"
        assert got[0]["body"] == "rm -rf build/ && make"

        # Untrusted text stays text: a newline and a bidi override are made visible.
        ask(ws, "new-2", "Read", {"file_path": "/etc/pass\u202ewd\n<img src=x>"})
        page.wait_for_selector(card("new-2"), timeout=UI_WAIT_MS)
        settle()
        got = notes(page)
        assert len(got) == 2, got
        assert got[1]["title"] == f"Sled {PROJECT} asks to use Read"
        assert got[1]["body"] == "/etc/pass\\u202ewd\\n<img src=x>"
        assert got[0]["tag"] != got[1]["tag"]
        assert [n["title"] for n in got].count(f"Sled {PROJECT} asks to use Bash") == 1
        assert page.evaluate("window.__asked") == 0

        # A click on the notification brings the page to that request's card.
        page.evaluate("window.__noteObjects[0].dispatchEvent(new Event('click'))")
        page.wait_for_function(
            "document.activeElement && document.activeElement.dataset.reqId === 'new-1'",
            timeout=UI_WAIT_MS,
        )


def test_notify_me_asks_for_permission_on_a_click_only(gw: Gateway, page: Any) -> None:
    page.goto(gw.console_url())
    sync_api.expect(page.locator("#summary")).not_to_contain_text("loading", timeout=UI_WAIT_MS)
    button = page.locator("#notify-me")
    sync_api.expect(button).to_be_visible()
    assert button.bounding_box()["height"] >= 44
    settle()
    assert page.evaluate("window.__asked") == 0
    button.click()
    page.wait_for_function("window.__asked === 1", timeout=UI_WAIT_MS)
    # Headless chromium answers the prompt itself (not granted): the page says so.
    sync_api.expect(page.locator("#notify-state")).to_be_visible(timeout=UI_WAIT_MS)
    sync_api.expect(button).to_be_hidden()


def test_the_title_counts_pending_requests_live(gw: Gateway, page: Any) -> None:
    page.goto(gw.console_url())
    sync_api.expect(page).to_have_title("Sled gateway", timeout=UI_WAIT_MS)
    with open_sled(gw) as ws:
        ask(ws, "t-1", "Bash", {"command": "echo one"})
        sync_api.expect(page).to_have_title("(1) Sled gateway", timeout=UI_WAIT_MS)
        ask(ws, "t-2", "Bash", {"command": "echo two"})
        sync_api.expect(page).to_have_title("(2) Sled gateway", timeout=UI_WAIT_MS)
        decide(gw, "t-1")
        sync_api.expect(page).to_have_title("(1) Sled gateway", timeout=UI_WAIT_MS)
        page.click(f"{card('t-2')} button[data-action=deny]")
        sync_api.expect(page).to_have_title("Sled gateway", timeout=UI_WAIT_MS)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_manifest_and_its_icons(gw: Gateway, page: Any) -> None:
    answer = httpx.get(f"{gw.http_url}/manifest.webmanifest", timeout=T)  # public, no session
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/manifest+json"
    manifest = json.loads(answer.text)
    assert manifest["name"] and manifest["start_url"] == "/"
    assert manifest["display"] == "standalone"
    assert manifest["theme_color"].startswith("#")
    sizes = {icon["sizes"]: icon for icon in manifest["icons"]}
    assert set(sizes) >= {"192x192", "512x512"}
    for declared, icon in sizes.items():
        assert icon["type"] == "image/png"
        got = httpx.get(f"{gw.http_url}{icon['src']}", timeout=T)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert png_size(got.content) == tuple(int(n) for n in declared.split("x"))
    # The page links it, and chromium loads the icons under the console's CSP.
    page.goto(gw.console_url())
    assert page.get_attribute("link[rel=manifest]", "href") == "/manifest.webmanifest"
    loaded = page.evaluate(
        """srcs => Promise.all(srcs.map(src => new Promise(done => {
            const img = new Image();
            img.onload = () => done([img.naturalWidth, img.naturalHeight]);
            img.onerror = () => done(null);
            img.src = src;
        })))""",
        [icon["src"] for icon in manifest["icons"]],
    )
    assert loaded == [[192, 192], [512, 512]]
    # The shell is public, read-only; everything else stays behind the session.
    sw = httpx.get(f"{gw.http_url}/sw.js", timeout=T)
    assert sw.status_code == 200
    assert sw.headers["content-type"].startswith("text/javascript")
    assert "service-worker-allowed" not in sw.headers
    for method in ("POST", "PUT", "DELETE"):
        refused = httpx.request(method, f"{gw.http_url}/sw.js", timeout=T)
        assert 400 <= refused.status_code < 500 and "error" in refused.json()
    assert httpx.get(f"{gw.http_url}/api/state", timeout=T).status_code == 401


CACHED_URLS = """async () => {
    const urls = [];
    for (const name of await caches.keys()) {
        const cache = await caches.open(name);
        for (const request of await cache.keys()) {
            const url = new URL(request.url);
            urls.push(url.pathname + url.search);
        }
    }
    return urls;
}"""


def test_the_service_worker_keeps_only_the_shell(gw: Gateway, page: Any) -> None:
    from_worker: list[str] = []
    page.on(
        "response",
        lambda r: from_worker.append(r.url) if r.from_service_worker and "/api/" in r.url else None,
    )
    page.goto(gw.console_url())
    scope = page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)")
    assert scope == f"{gw.http_url}/"
    page.reload()  # now the worker controls the page, and the page's own load passes it
    page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=UI_WAIT_MS)
    with open_sled(gw) as ws:
        ask(ws, "sw-1", "Bash", {"command": "echo secret-ish"})
        page.click(f"{card('sw-1')} button[data-action=approve]", timeout=UI_WAIT_MS)
        gw.wait_for(lambda s: not s["pending"], T)
        page.goto(f"{gw.http_url}/")  # another load through the worker, after a decision
        sync_api.expect(page.locator("#summary")).not_to_contain_text("loading", timeout=UI_WAIT_MS)
        settle()
        cached = page.evaluate(CACHED_URLS)
    assert cached, "the worker cached nothing"
    assert set(cached) <= SHELL, cached
    assert "/" in cached
    assert not [u for u in cached if "/api" in u or "token" in u]
    assert from_worker == [], "the worker answered API requests"

    # The gateway gone: the installed console still opens, from the cache, and says offline.
    gw.stop()
    page.reload()
    sync_api.expect(page.locator("h1")).to_contain_text("Sled gateway", timeout=UI_WAIT_MS)
    sync_api.expect(page.locator("#live")).to_be_visible(timeout=UI_WAIT_MS)


# Chrome on Android: the constructor throws, and only a service worker shows notifications.
ANDROID_NOTIFICATIONS = """
(() => {
  const Real = window.Notification;
  window.__shown = [];
  function AndroidNotification() {
    throw new TypeError("Illegal constructor. Use ServiceWorkerRegistration.showNotification()");
  }
  Object.defineProperty(AndroidNotification, "permission", {get: () => Real.permission});
  AndroidNotification.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = AndroidNotification;
  const show = ServiceWorkerRegistration.prototype.showNotification;
  ServiceWorkerRegistration.prototype.showNotification = function (title, options) {
    window.__shown.push({title, body: options.body, key: options.data && options.data.key});
    return show.call(this, title, options);
  };
})();
"""


def test_where_pages_cannot_notify_the_service_worker_does(gw: Gateway, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        context.add_init_script(ANDROID_NOTIFICATIONS)
        context.grant_permissions(["notifications"], origin=gw.http_url)
        page = context.new_page()
        with open_sled(gw) as ws:
            # Allowed before the page opened: what it lists at load is still not news.
            ask(ws, "before-open", "Bash", {"command": "echo old news"})
            gw.wait_for(lambda s: len(s["pending"]) == 1, T)
            page.goto(gw.console_url())
            page.evaluate("navigator.serviceWorker.ready.then(() => true)")
            sync_api.expect(page.locator("#notify-state")).to_contain_text("on")
            page.wait_for_selector(card("before-open"), timeout=UI_WAIT_MS)
            ask(ws, "sw-note", "WebFetch", {"url": "https://example.com/a", "prompt": "p"})
            page.wait_for_selector(card("sw-note"), timeout=UI_WAIT_MS)
            page.wait_for_function("window.__shown.length > 0", timeout=UI_WAIT_MS)
            settle()
            shown = page.evaluate("window.__shown")
            assert len(shown) == 1, shown
            assert shown[0]["title"] == f"Sled {PROJECT} asks to use WebFetch"
            assert shown[0]["body"] == "https://example.com/a"
            # The worker's notificationclick posts the key to the page: it focuses the card.
            page.evaluate(
                """key => navigator.serviceWorker.dispatchEvent(
                    new MessageEvent("message", {data: {type: "show-request", key}}))""",
                shown[0]["key"],
            )
            page.wait_for_function(
                "document.activeElement && document.activeElement.dataset.reqId === 'sw-note'",
                timeout=UI_WAIT_MS,
            )
    finally:
        context.close()
