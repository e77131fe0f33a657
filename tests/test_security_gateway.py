"""Attacks on the reference gateway, as a hostile page, local user or sled would try them.

Each test is the attack itself, against real parts: the gateway on a real
socket, a real uplink with the official MCP SDK server as the sled's local
MCP endpoint (it records every request that reaches it), Debian's chromium
driven by Playwright for what a web page can do, raw sockets and raw
WebSockets for what a local program can do. A test passes when the attack
fails: nothing is approved, nothing reaches the sled, the real sled keeps
its session.

The browser attacks are run with the operator logged in to the console in
the same browser: cookies are not port-scoped and SameSite counts every port
of 127.0.0.1 as the same site, so the attacker's page on another local port
rides on the operator's session unless the gateway's CSRF checks stop it.

Run just these with ``pytest -m security``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from loguru import logger
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from actors import Uplink
from sled_gateway import Gateway
from sled_gateway.transports.terminal import TerminalPrompter
from tests.support import browser as browser_support
from tests.support.mcp_servers import McpSdkServer
from tests.support.proc import WatchedProcess
from tests.test_gateway import Screen  # a stdout the test can wait on

pytestmark = [pytest.mark.security, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
VICTIM, MALLORY = "victim-sled", "mallory-sled"
VICTIM_TOKEN, MALLORY_TOKEN = "victim-t0ken-xyz", "mallory-t0ken-xyz"
REBIND_HOST = "rebind.evil.example"


# -- the parts -----------------------------------------------------------------------


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh loop in its own thread (Playwright's sync API keeps
    a loop running on the main thread while the browser fixture lives)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def make_gateway(**kwargs: Any) -> Gateway:
    kwargs.setdefault("sled_tokens", {VICTIM: VICTIM_TOKEN, MALLORY: MALLORY_TOKEN})
    return Gateway(**kwargs).start()


def api_headers(gw: Gateway) -> dict[str, str]:
    return {**gw.api_headers(), "Content-Type": "application/json"}


@pytest.fixture
def gateways() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        gw = make_gateway(**kwargs)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


@pytest.fixture
def mcp_server() -> Iterator[McpSdkServer]:
    with McpSdkServer(stateless=True) as server:
        yield server


@pytest.fixture
def victim(
    gateways: Callable[..., Gateway],
    make_uplink: Callable[..., Uplink],
    mcp_server: McpSdkServer,
) -> tuple[Gateway, Uplink, McpSdkServer]:
    """A gateway with a real uplink connected as VICTIM, its tools an MCP SDK server."""
    gw = gateways()
    uplink = make_uplink(
        gw.url_for_sleds(VICTIM_TOKEN),
        project=VICTIM,
        local_mcp_url=mcp_server.url,
        listen="127.0.0.1:0",
    )
    assert uplink.wait_connected(T)
    gw.wait_for(lambda s: any(x["project"] == VICTIM for x in s["sleds"]), T)
    return gw, uplink, mcp_server


def tool_calls(server: McpSdkServer) -> list[dict[str, Any]]:
    """The JSON-RPC messages that reached the sled's MCP server."""
    out = []
    for r in server.requests:
        with suppress(ValueError):
            out.append(json.loads(r.body))
    return out


def pending_request(gw: Gateway, uplink: Uplink) -> tuple[str, Future[Any]]:
    """A permission request waiting at the gateway for a human; its id and future."""
    req_id = f"req-{uuid.uuid4().hex[:8]}"
    future = uplink.request_permission("Bash", {"command": "rm -rf /"}, request_id=req_id)
    gw.wait_for(lambda s: any(p["req_id"] == req_id for p in s["pending"]), T)
    return req_id, future


class AttackerSite:
    """The attacker's web server on another local port: serves the given pages."""

    def __init__(self, pages: dict[str, str]) -> None:
        site = self

        class Handler(BaseHTTPRequestHandler):
            hits: ClassVar[list[str]] = []

            def do_GET(self) -> None:
                body = site.pages.get(self.path.split("?")[0], "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.pages = pages
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def attacker() -> Iterator[Callable[[dict[str, str]], AttackerSite]]:
    sites: list[AttackerSite] = []

    def make(pages: dict[str, str]) -> AttackerSite:
        site = AttackerSite(pages)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


# -- the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # The DNS-rebinding attacker's name, resolved to loopback (as its DNS would).
    with browser_support.launch([f"--host-resolver-rules=MAP {REBIND_HOST} 127.0.0.1"]) as chromium:
        yield chromium


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with browser_support.fresh_page(browser) as fresh:
        yield fresh


def console_login(page: Any, gw: Gateway) -> None:
    """The operator opens the console in this browser (and so holds its cookie)."""
    page.goto(gw.console_url())
    page.wait_for_selector("#summary", timeout=int(3 * T * 1000))


# -- 1. cross-origin attacks from a page on another local port (real chromium) -------


def test_a_form_on_another_port_cannot_call_a_sleds_tools(
    victim: tuple[Gateway, Uplink, McpSdkServer],
    page: Any,
    attacker: Callable[[dict[str, str]], AttackerSite],
) -> None:
    gw, _uplink, server = victim
    # A no-JavaScript text/plain form whose body is JSON-RPC: name + "=" + value.
    name = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        '"params":{"name":"echo","arguments":{"text":"pwned"}},"pad":"'
    )
    site = attacker(
        {
            "/form.html": f"""<!doctype html><form method="POST" enctype="text/plain"
                action="{gw.mcp_url(VICTIM)}"><input type="hidden" name='{name}' value='"}}'>
                <button id="go" type="submit">win a prize</button></form>"""
        }
    )
    console_login(page, gw)
    page.goto(site.url("/form.html"))
    with page.expect_navigation(timeout=int(3 * T * 1000)):
        page.click("#go")
    time.sleep(0.5 * FACTOR)  # give a relayed call time to arrive, were it relayed
    assert [m.get("method") for m in tool_calls(server)] == [], "the form reached the sled"
    assert "pwned" not in page.content()


def test_a_no_cors_fetch_from_another_port_cannot_approve(
    victim: tuple[Gateway, Uplink, McpSdkServer],
    page: Any,
    attacker: Callable[[dict[str, str]], AttackerSite],
) -> None:
    gw, uplink, _ = victim
    req_id, future = pending_request(gw, uplink)
    target = f"{gw.http_url}/api/permissions/{VICTIM}/{req_id}"
    site = attacker(
        {
            "/fetch.html": f"""<!doctype html><script>
            Promise.allSettled([
              fetch("{target}", {{mode: "no-cors", method: "POST", credentials: "include",
                                  body: '{{"decision":"approve"}}'}}),
              fetch("{target}", {{mode: "no-cors", method: "POST", credentials: "include",
                                  headers: {{"Content-Type": "text/plain"}},
                                  body: '{{"decision":"always_allow"}}'}}),
            ]).then(() => {{ document.title = "sent"; }});
            </script>"""
        }
    )
    console_login(page, gw)
    page.goto(site.url("/fetch.html"))
    page.wait_for_function("document.title === 'sent'", timeout=int(3 * T * 1000))
    time.sleep(0.3 * FACTOR)
    assert gw.is_pending(VICTIM, req_id), "a cross-origin fetch decided the request"
    assert not future.done()
    assert gw.state()["decisions"] == []


def test_the_console_does_not_render_in_a_frame(
    victim: tuple[Gateway, Uplink, McpSdkServer],
    page: Any,
    attacker: Callable[[dict[str, str]], AttackerSite],
) -> None:
    gw, uplink, _ = victim
    req_id, _future = pending_request(gw, uplink)
    site = attacker(
        {
            "/frame.html": f"""<!doctype html><h1>click the button</h1>
            <iframe id="victim" src="{gw.http_url}/" width="900" height="600"
                    onload="document.title = 'loaded'"></iframe>"""
        }
    )
    console_login(page, gw)
    page.goto(site.url("/frame.html"))
    page.wait_for_function("document.title === 'loaded'", timeout=int(3 * T * 1000))
    time.sleep(1.5 * FACTOR)  # the console would have polled /api/state by now
    framed = [f for f in page.frames if f is not page.main_frame]
    assert framed, "the iframe is missing from the attacker's page"
    for frame in framed:
        rendered = ""
        with suppress(Exception):  # a blocked frame may refuse evaluation: that is fine
            rendered = frame.evaluate("document.body ? document.body.innerText : ''")
        assert "Sled gateway" not in rendered, "the console rendered inside a frame"
        assert req_id not in rendered
    assert gw.is_pending(VICTIM, req_id)


def test_dns_rebinding_page_can_neither_read_nor_approve(
    victim: tuple[Gateway, Uplink, McpSdkServer], page: Any
) -> None:
    gw, uplink, server = victim
    req_id, future = pending_request(gw, uplink)
    # The attacker's page, loaded from its own name, which now resolves to 127.0.0.1:
    # to the browser this is same-origin, so it may read answers and send JSON.
    base = f"http://{REBIND_HOST}:{gw.port}"
    response = page.goto(f"{base}/api/state")
    assert response is not None
    assert response.status == 421, response.status
    assert req_id not in page.content()
    outcome = page.evaluate(
        """async ([base, project, reqId]) => {
            const post = (path, body) => fetch(base + path, {method: "POST",
                headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
            const decided = await post(`/api/permissions/${project}/${reqId}`,
                                       {decision: "approve"});
            const relayed = await post(`/sleds/${project}/mcp`, {jsonrpc: "2.0", id: 1,
                method: "tools/call", params: {name: "echo", arguments: {text: "rebound"}}});
            return [decided.status, relayed.status, await decided.text()];
        }""",
        [base, VICTIM, req_id],
    )
    assert outcome[:2] == [421, 421], outcome
    assert gw.is_pending(VICTIM, req_id)
    assert not future.done()
    assert tool_calls(server) == []


# -- 2. requests without the right credential, to every endpoint (httpx) -------------

ENDPOINTS = [
    ("GET", "/"),
    ("GET", "/api/state"),
    ("POST", "/api/permissions/{project}/{req_id}"),
    ("POST", "/api/permissions/decide"),
    ("GET", "/api/permissions/{project}/{req_id}"),
    ("POST", "/sleds/{project}/mcp"),
    ("GET", "/sleds/{project}/mcp"),
    ("DELETE", "/sleds/{project}/mcp"),
    ("PUT", "/api/state"),
    ("GET", "/api/audit"),  # no such route (yet): protected all the same
    ("POST", "/api/rules"),
    ("GET", "/no/such/path"),
]
CREDENTIALS = {
    "none": {},
    "wrong bearer": {"Authorization": "Bearer not-the-operator-token"},
    "a sled's token as bearer": {"Authorization": f"Bearer {VICTIM_TOKEN}"},
    "basic auth": {"Authorization": "Basic b3BlcmF0b3I6cGFzcw=="},
    "forged cookie": {"Cookie": "sled_gateway_0=x; session=y"},
}


def test_every_endpoint_refuses_a_missing_or_wrong_credential(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, uplink, server = victim
    req_id, future = pending_request(gw, uplink)
    body = {"decision": "approve", "jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    forged_cookie = {"Cookie": f"{_cookie_name(gw)}=forged-session-id"}
    with httpx.Client(base_url=gw.http_url, timeout=T) as http:
        for method, template in ENDPOINTS:
            path = template.format(project=VICTIM, req_id=req_id)
            for label, headers in [*CREDENTIALS.items(), ("forged session", forged_cookie)]:
                response = http.request(
                    method,
                    path,
                    json=body,
                    headers={**headers, "Content-Type": "application/json"},
                )
                assert response.status_code == 401, (method, path, label, response.text)
                if path == "/":
                    assert "token" in response.text  # the "open the URL with the token" page
                else:
                    assert "error" in response.json()
        # A wrong ?token= on the console page logs nobody in.
        wrong = http.get("/?token=guess", follow_redirects=False)
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        # The sled WebSocket path over plain HTTP reveals nothing either.
        assert http.get("/api/sled-uplink").status_code == 426
    assert gw.is_pending(VICTIM, req_id)
    assert not future.done()
    assert tool_calls(server) == []


def _cookie_name(gw: Gateway) -> str:
    return f"sled_gateway_{gw.port}"


def test_the_right_credentials_work_and_are_recorded(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, uplink, _ = victim
    with httpx.Client(base_url=gw.http_url, timeout=T) as browser:
        login = browser.get(f"/?token={gw.operator_token}", follow_redirects=False)
        assert login.status_code == 303
        assert login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        assert gw.operator_token not in cookie  # a session id, not the token
        page = browser.get("/")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"

        req_id, _ = pending_request(gw, uplink)
        # As a browser sends it: Origin on every POST (a cookie request without it is refused).
        decided = browser.post(
            f"/api/permissions/{VICTIM}/{req_id}",
            json={"decision": "deny"},
            headers={"Origin": gw.http_url},
        )
        assert decided.status_code == 200, decided.text
        assert decided.json()["decided"]["by"] == "console"
    req_id, _ = pending_request(gw, uplink)
    decided = httpx.post(
        f"{gw.http_url}/api/permissions/{VICTIM}/{req_id}",
        json={"decision": "approve"},
        headers=gw.api_headers(),
        timeout=T,
    )
    assert decided.status_code == 200
    assert decided.json()["decided"]["by"] == "api"
    state = httpx.get(f"{gw.http_url}/api/state", headers=gw.api_headers(), timeout=T).text
    for secret in (gw.operator_token, VICTIM_TOKEN, MALLORY_TOKEN):
        assert secret not in state


def test_csrf_checks_content_type_and_origin(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, uplink, server = victim
    req_id, future = pending_request(gw, uplink)
    url = f"{gw.http_url}/api/permissions/{VICTIM}/{req_id}"
    body = b'{"decision": "approve"}'
    auth = gw.api_headers()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = dict(auth) | ({"Content-Type": ctype} if ctype else {})
        response = httpx.post(url, content=body, headers=headers, timeout=T)
        assert response.status_code == 415, (ctype, response.text)
        relayed = httpx.post(gw.mcp_url(VICTIM), content=body, headers=headers, timeout=T)
        assert relayed.status_code == 415, ctype
    for origin in (
        "http://127.0.0.1:1",  # another local port: same site, another origin
        f"http://{REBIND_HOST}:{gw.port}",
        "null",
        "https://evil.example",
    ):
        headers = {**auth, "Content-Type": "application/json", "Origin": origin}
        response = httpx.post(url, content=body, headers=headers, timeout=T)
        assert response.status_code == 403, (origin, response.text)
        relayed = httpx.post(gw.mcp_url(VICTIM), content=body, headers=headers, timeout=T)
        assert relayed.status_code == 403, origin
    assert gw.is_pending(VICTIM, req_id)
    assert tool_calls(server) == []
    # The gateway's own origin is fine.
    own = {**auth, "Content-Type": "application/json", "Origin": gw.http_url}
    assert httpx.post(url, content=body, headers=own, timeout=T).status_code == 200
    assert future.result(T).decision.value == "approve"


def test_a_foreign_host_is_refused_everywhere(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, _, _ = victim
    with httpx.Client(base_url=gw.http_url, timeout=T, headers=api_headers(gw)) as http:
        for method, template in [("GET", "/healthz"), *ENDPOINTS]:
            path = template.format(project=VICTIM, req_id="r")
            response = http.request(method, path, headers={"Host": f"{REBIND_HOST}:{gw.port}"})
            assert response.status_code == 421, (method, path)
        assert http.get("/healthz", headers={"Host": f"localhost:{gw.port}"}).status_code == 200

    async def sled_with_foreign_host() -> int:
        with pytest.raises(InvalidStatus) as refused:
            # The URL names the rebinding host; the socket goes to 127.0.0.1.
            async with connect(
                f"ws://{REBIND_HOST}:{gw.port}/api/sled-uplink?token={VICTIM_TOKEN}",
                host="127.0.0.1",
                port=gw.port,
            ):
                pass
        return refused.value.response.status_code

    assert run(sled_with_foreign_host()) == 421


def test_a_websocket_on_an_unknown_path_is_404_and_no_token_is_logged(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, _, _ = victim
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE")
    # The attacking client's own debug log shows its request line; it is not under test.
    client_log = logging.getLogger("websockets.client")
    old_level = client_log.level
    client_log.setLevel(logging.WARNING)
    try:

        async def attempt(path: str) -> int:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{gw.port}{path}?token={VICTIM_TOKEN}"):
                    pass
            return refused.value.response.status_code

        for path in ("/api/sled-uplinkx", "/ws", "/api/state"):
            assert run(attempt(path)) == 404, path
    finally:
        logger.remove(sink)
        client_log.setLevel(old_level)
    assert VICTIM_TOKEN not in "\n".join(lines)


# -- 3. an impostor sled ---------------------------------------------------------------


def test_an_impostor_with_another_sleds_token_cannot_take_its_name(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, uplink, server = victim
    before = next(s for s in gw.state()["sleds"] if s["project"] == VICTIM)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    stolen: list[dict[str, Any]] = []

    async def impostor_loop() -> tuple[list[int], int]:
        codes: list[int] = []
        calls_ok = 0
        http = create_mcp_http_client(headers=gw.api_headers())
        async with (
            streamable_http_client(gw.mcp_url(VICTIM), http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            for n in range(30):
                # Mallory holds a real token (its own) and claims the victim's name,
                # again and again, as the sled it wants to be.
                async with connect(gw.url_for_sleds(MALLORY_TOKEN)) as ws:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "identity",
                                "req_id": "identity",
                                "payload": {"project": VICTIM},
                            }
                        )
                    )
                    try:
                        while True:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), T))
                            stolen.append(frame)
                    except ConnectionClosed as closed:
                        codes.append(closed.rcvd.code if closed.rcvd else -1)
                result = await session.call_tool("echo", {"text": f"call {n}"})
                calls_ok += result.content[0].text == f"call {n}"  # type: ignore[union-attr]
        return codes, calls_ok

    try:
        codes, calls_ok = run(asyncio.wait_for(impostor_loop(), 20 * T))
    finally:
        logger.remove(sink)
    assert codes == [1008] * 30
    assert stolen == [], "the impostor received frames meant for the victim"
    assert calls_ok == 30, "a relay call did not reach the real sled"
    assert [m.get("method") for m in tool_calls(server)].count("tools/call") == 30
    after = next(s for s in gw.state()["sleds"] if s["project"] == VICTIM)
    assert after["session"] == before["session"]  # never replaced
    assert after["state"] == "connected"
    assert uplink.status()["connection"]["sessions_up"] == 1
    warnings = [line for line in lines if "claimed project" in line]
    assert len(warnings) == 30
    assert MALLORY in warnings[0]
    assert VICTIM in warnings[0]
    assert MALLORY_TOKEN not in "\n".join(lines)


def test_the_shared_demo_token_cannot_claim_a_sled_with_its_own_token(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways(token="shared-demo-token")

    async def claim(token: str, project: str) -> int | None:
        async with connect(gw.url_for_sleds(token)) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": project}}
                )
            )
            try:
                await asyncio.wait_for(ws.recv(), 0.5 * T)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
            except TimeoutError:
                return None  # accepted: nothing to say
            return None

    assert run(claim("shared-demo-token", VICTIM)) == 1008
    assert run(claim("shared-demo-token", "some-unlisted-sled")) is None


def test_the_real_sled_coming_back_replaces_its_half_open_session(
    victim: tuple[Gateway, Uplink, McpSdkServer],
) -> None:
    gw, _, _ = victim
    before = next(s for s in gw.state()["sleds"] if s["project"] == VICTIM)["session"]

    async def come_back() -> None:
        async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                )
            )
            await asyncio.to_thread(
                gw.wait_for,
                lambda s: any(
                    x["project"] == VICTIM and x["session"] != before for x in s["sleds"]
                ),
                T,
            )

    run(come_back())


# -- 4. bounds ---------------------------------------------------------------------------


def test_slowloris_connections_are_closed_after_the_header_timeout(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways(header_timeout=1.0)
    started = time.monotonic()
    half = socket.create_connection(("127.0.0.1", gw.port), timeout=6 * T)
    silent = socket.create_connection(("127.0.0.1", gw.port), timeout=6 * T)
    keepalive = socket.create_connection(("127.0.0.1", gw.port), timeout=6 * T)
    with half, silent, keepalive:
        half.sendall(b"GET /healthz HT")  # half a request line, then nothing
        keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):
            answer += keepalive.recv(65536)
        assert b"200 OK" in answer
        keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for sock in (half, silent, keepalive):
            assert sock.recv(65536) == b"", "the server must close a stalled connection"
    took = time.monotonic() - started
    assert 0.8 <= took < 3 * T, took


def test_idle_connections_beyond_the_cap_do_not_starve_a_real_request(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways(max_connections=8, header_timeout=60.0)
    idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=T) for _ in range(30)]
    try:
        started = time.monotonic()
        response = httpx.get(f"{gw.http_url}/healthz", timeout=T)
        assert response.status_code == 200
        assert time.monotonic() - started < T
        # The oldest idle connections made room: they were closed.
        assert idle[0].recv(1) == b""
        open_now = 0
        for sock in idle[-5:]:
            sock.setblocking(False)
            try:
                open_now += sock.recv(1) != b""
            except BlockingIOError:
                open_now += 1
        assert open_now >= 1  # the newest ones are still served, not all dropped
    finally:
        for sock in idle:
            sock.close()


def test_concurrent_relays_per_sled_are_capped(gateways: Callable[..., Gateway]) -> None:
    gw = gateways(max_relays_per_sled=2)

    async def scenario() -> None:
        async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                )
            )
            await asyncio.to_thread(
                gw.wait_for, lambda s: any(x["project"] == VICTIM for x in s["sleds"]), T
            )
            async with httpx.AsyncClient(timeout=2 * T, headers=api_headers(gw)) as http:
                held = [
                    asyncio.create_task(http.post(gw.mcp_url(VICTIM), content=f'{{"id":{i}}}'))
                    for i in range(2)
                ]
                requests = [json.loads(await asyncio.wait_for(ws.recv(), T)) for _ in held]
                third = await http.post(gw.mcp_url(VICTIM), content='{"id":3}')
                assert third.status_code == 503
                assert "error" in third.json()
                for r in requests:
                    await ws.send(
                        json.dumps({"type": "mcp_response", "req_id": r["req_id"], "payload": {}})
                    )
                assert [(await h).status_code for h in held] == [200, 200]
                again = asyncio.create_task(http.post(gw.mcp_url(VICTIM), content='{"id":4}'))
                r = json.loads(await asyncio.wait_for(ws.recv(), T))
                await ws.send(
                    json.dumps({"type": "mcp_response", "req_id": r["req_id"], "payload": {}})
                )
                assert (await again).status_code == 200

    run(asyncio.wait_for(scenario(), 6 * T))


def test_pending_requests_per_sled_are_capped(gateways: Callable[..., Gateway]) -> None:
    gw = gateways(max_pending_per_sled=3)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")

    async def scenario() -> None:
        async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                )
            )
            for i in range(4):
                await ws.send(
                    json.dumps(
                        {
                            "type": "perm_request",
                            "req_id": f"r{i}",
                            "payload": {"tool_name": "Bash", "tool_input": {}},
                        }
                    )
                )
            answer = json.loads(await asyncio.wait_for(ws.recv(), T))
            assert answer == {
                "type": "perm_response",
                "req_id": "r3",
                "payload": {"approved": False, "always_allow": False},
            }
            assert {p["req_id"] for p in gw.state()["pending"]} == {"r0", "r1", "r2"}

    try:
        run(asyncio.wait_for(scenario(), 6 * T))
    finally:
        logger.remove(sink)
    assert any("--max-pending-per-sled" in line for line in lines)


def test_a_session_without_identity_is_closed_and_gone_sleds_are_forgotten(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways(identity_timeout=0.5, forget_disconnected_after=0.5, heartbeat_interval=0.4)

    async def scenario() -> None:
        async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 3 * T)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
            assert time.monotonic() - started >= 0.4
        async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                )
            )
            await asyncio.to_thread(gw.wait_for, lambda s: len(s["sleds"]) == 1, T)
        await asyncio.to_thread(
            gw.wait_for, lambda s: s["sleds"] and s["sleds"][0]["state"] == "disconnected", T
        )
        await asyncio.to_thread(gw.wait_for, lambda s: s["sleds"] == [], 3 * T)

    run(asyncio.wait_for(scenario(), 10 * T))


# -- 5. untrusted text at the terminal and in the logs -----------------------------------

EVIL_TOOL = "Bash\x1b[2J\x1b[H\x1b]0;pwned\x07\r\n[permission] sled 'x' asks to run Read\u202e"


def test_control_characters_are_shown_escaped_at_the_prompt_and_in_logs(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways()
    r, w = os.pipe()
    stdin, keyboard = open(r, encoding="utf-8"), open(w, "w", encoding="utf-8")  # noqa: SIM115
    screen = Screen()
    prompter = TerminalPrompter(gw, stdin=stdin, stdout=screen).start()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE", format="{message}")
    try:

        async def scenario() -> None:
            async with connect(gw.url_for_sleds(VICTIM_TOKEN)) as ws:
                await ws.send(
                    json.dumps(
                        {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                    )
                )
                await ws.send(
                    json.dumps(
                        {
                            "type": "perm_request",
                            "req_id": "r1\x1b[31m\nfake",
                            "payload": {
                                "tool_name": EVIL_TOOL,
                                "tool_input": {"command": "ls\x9b2J\x7f"},
                            },
                        }
                    )
                )
                await asyncio.to_thread(screen.wait_for, "always [a]?")

        run(asyncio.wait_for(scenario(), 6 * T))
    finally:
        logger.remove(sink)
        prompter.stop()
        keyboard.close()
        stdin.close()
    shown = screen.text
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\x9b", "\x7f"):
        assert raw not in shown, f"{raw!r} reached the terminal"
    assert "\\x1b[2J" in shown
    assert "\\r\\n[permission] sled" in shown
    assert shown.count("\n[permission]") == 1  # no forged second prompt
    logged = [line for line in lines if "asks permission" in line]
    assert len(logged) == 1
    assert "\x1b" not in logged[0]
    assert "\n" not in logged[0].rstrip("\n")
    assert "\\x1b[31m\\nfake" in logged[0]


def test_the_cli_escapes_a_tool_name_in_its_prompt_and_log(tmp_path: Path) -> None:
    tokens = tmp_path / "sleds.json"
    tokens.write_text(json.dumps({VICTIM: VICTIM_TOKEN}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
    proc = WatchedProcess(
        [
            os.environ.get("PYTHON", str(ROOT / ".venv/bin/python"))
            if (ROOT / ".venv/bin/python").exists()
            else "python3",
            str(ROOT / "run_gateway.py"),
            "--listen",
            "127.0.0.1:0",
            "--sled-tokens",
            str(tokens),
            "--interactive",
        ],
        cwd=ROOT,
        env=env,
        timeout=T,
    )
    try:
        port = int(proc.wait_for(r"gateway listening on http://127\.0\.0\.1:(\d+)").group(1))
        url = proc.wait_for(r"(http://127\.0\.0\.1:\d+/\?token=\S+)").group(1)
        operator = url.rsplit("=", 1)[1]

        async def sled() -> None:
            async with connect(f"ws://127.0.0.1:{port}/api/sled-uplink?token={VICTIM_TOKEN}") as ws:
                await ws.send(
                    json.dumps(
                        {"type": "identity", "req_id": "identity", "payload": {"project": VICTIM}}
                    )
                )
                await ws.send(
                    json.dumps(
                        {
                            "type": "perm_request",
                            "req_id": "r1",
                            "payload": {"tool_name": EVIL_TOOL, "tool_input": {}},
                        }
                    )
                )
                await asyncio.to_thread(proc.wait_for, r"always \[a\]\?", "stdout")
                await asyncio.to_thread(proc.wait_for, r"asks permission", "stderr")

        run(asyncio.wait_for(sled(), 6 * T))
    finally:
        proc.kill()
    out, err = proc.out["stdout"], proc.out["stderr"]
    assert "\x1b" not in out
    assert "\x1b" not in err
    assert "\\x1b[2J" in out
    assert "\\x1b[2J" in err
    # One log line for the request: the CR/LF inside the tool name did not split it.
    assert len([ln for ln in err.splitlines() if "asks permission" in ln]) == 1
    assert not any(ln.startswith("[permission] sled 'x'") for ln in err.splitlines())
    # The generated operator token was printed once (the console URL) and never logged.
    assert err.count(operator) == 1
    assert VICTIM_TOKEN not in err + out


@pytest.mark.parametrize("path", ["/api/permissions/p/r", "/api/rules"])
def test_a_body_sent_a_byte_at_a_time_is_cut_off(
    gateways: Callable[..., Gateway], path: str
) -> None:
    gw = gateways(header_timeout=0.5)  # the body gets 3 x 0.5 s
    with socket.create_connection(("127.0.0.1", gw.port), timeout=6 * T) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n"
            + f"Authorization: Bearer {gw.operator_token}\r\n\r\n".encode()
            + b'{"deci'
        )
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 1.0 <= time.monotonic() - started < 3 * T
