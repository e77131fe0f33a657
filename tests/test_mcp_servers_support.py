"""Self-checks for tests/support/mcp_servers.py, with raw httpx.

These pin down what the servers (and the MCP SDK behind McpSdkServer) really
do on the wire, so replay-client tests built on them test the client, not the
fixtures.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

try:
    from tests.support.mcp_servers import (
        MCP_ACCEPT,
        McpSdkServer,
        RecordingJsonServer,
        SilentServer,
        StatusServer,
        closed_port_url,
    )
except ModuleNotFoundError:  # bare `pytest` puts tests/, not the repo root, on sys.path
    from support.mcp_servers import (
        MCP_ACCEPT,
        McpSdkServer,
        RecordingJsonServer,
        SilentServer,
        StatusServer,
        closed_port_url,
    )

pytestmark = pytest.mark.timeout(20)

HEADERS = {"Content-Type": "application/json", "Accept": MCP_ACCEPT}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "selfcheck", "version": "0"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(id_: int, name: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def sse_messages(text: str) -> list[dict[str, Any]]:
    """JSON payloads of the SSE events in ``text`` (CRLF or LF line ends)."""
    out = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if data and "".join(data):
            out.append(json.loads("\n".join(data)))
    return out


@pytest.fixture
def no_thread_leak():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2
    while (extra := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not extra, f"leaked threads: {extra}"


# --------------------------------------------------------------------------- #
# McpSdkServer
# --------------------------------------------------------------------------- #


def test_sdk_406_unless_accept_names_json_and_sse(no_thread_leak):
    with McpSdkServer() as srv, httpx.Client(timeout=5) as c:
        for accept in ("application/json", "text/event-stream"):
            r = c.post(srv.url, json=INIT, headers={**HEADERS, "Accept": accept})
            assert r.status_code == 406, accept
            assert r.json()["error"]["code"] == -32600
        # An absent Accept header counts as "accepts anything" for the SDK.
        r = c.post(srv.url, json=INIT, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
    with McpSdkServer(stateless=True) as srv, httpx.Client(timeout=5) as c:
        # JSON mode only insists on application/json.
        r = c.post(srv.url, json=INIT, headers={**HEADERS, "Accept": "text/event-stream"})
        assert r.status_code == 406


def test_sdk_stateful_sse_exchange(no_thread_leak):
    with McpSdkServer() as srv, httpx.Client(timeout=5) as c:
        assert srv.url == f"http://127.0.0.1:{srv.port}/mcp"
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        sid = r.headers["mcp-session-id"]
        [init] = sse_messages(r.text)
        assert init["id"] == 1
        assert init["result"]["protocolVersion"] == "2025-06-18"

        h = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
        r = c.post(srv.url, json=INITIALIZED, headers=h)
        assert (r.status_code, r.content) == (202, b"")

        r = c.post(srv.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=h)
        [listed] = sse_messages(r.text)
        names = {t["name"] for t in listed["result"]["tools"]}
        assert {"echo", "sleep", "add", "log_then_echo"} <= names

        [echoed] = sse_messages(c.post(srv.url, json=call(3, "echo", text="hi"), headers=h).text)
        assert echoed["id"] == 3
        assert echoed["result"]["content"] == [{"type": "text", "text": "hi"}]

        [added] = sse_messages(c.post(srv.url, json=call(4, "add", a=2, b=3), headers=h).text)
        assert added["result"]["structuredContent"] == {"result": 5}

        # A notification rides the request's stream ahead of the response.
        note, resp = sse_messages(
            c.post(srv.url, json=call(5, "log_then_echo", text="x"), headers=h).text
        )
        assert note["method"] == "notifications/message"
        assert "id" not in note
        assert resp["id"] == 5

        # Without a session id only initialize is allowed.
        r = c.post(
            srv.url, json={"jsonrpc": "2.0", "id": 6, "method": "tools/list"}, headers=HEADERS
        )
        assert r.status_code == 400

        sent = srv.requests
        assert sent[0].json()["method"] == "initialize"
        assert sent[1].headers["mcp-session-id"] == sid


def test_sdk_stateless_json(no_thread_leak):
    with McpSdkServer(stateless=True) as srv, httpx.Client(timeout=5) as c:
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert "mcp-session-id" not in r.headers
        assert r.json()["result"]["protocolVersion"] == "2025-06-18"
        r = c.post(srv.url, json=call(2, "echo", text="hey"), headers=HEADERS)
        assert r.json() == {
            "jsonrpc": "2.0",
            "id": 2,
            "result": {
                "content": [{"type": "text", "text": "hey"}],
                "isError": False,
                "structuredContent": {"result": "hey"},
            },
        }
        r = c.post(srv.url, json=INITIALIZED, headers=HEADERS)
        assert (r.status_code, r.content) == (202, b"")


def test_sdk_restart_forgets_sessions_on_same_port(no_thread_leak):
    with McpSdkServer() as srv, httpx.Client(timeout=5) as c:
        port = srv.port
        sid = c.post(srv.url, json=INIT, headers=HEADERS).headers["mcp-session-id"]
        h = {**HEADERS, "Mcp-Session-Id": sid}
        assert c.post(srv.url, json=call(2, "echo", text="a"), headers=h).status_code == 200

        t0 = time.monotonic()
        srv.restart()
        assert time.monotonic() - t0 < 2
        assert srv.port == port

        r = c.post(srv.url, json=call(3, "echo", text="b"), headers=h)
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Session not found"
        assert c.post(srv.url, json=INITIALIZED, headers=h).status_code == 404  # notifications too

        new_sid = c.post(srv.url, json=INIT, headers=HEADERS).headers["mcp-session-id"]
        assert new_sid != sid
        r = c.post(
            srv.url, json=call(4, "echo", text="c"), headers={**HEADERS, "Mcp-Session-Id": new_sid}
        )
        assert r.status_code == 200


def test_sdk_sleep_calls_overlap(no_thread_leak):
    with McpSdkServer(stateless=True) as srv:
        codes: list[int] = []

        def one(i: int) -> None:
            with httpx.Client(timeout=5) as c:
                codes.append(
                    c.post(srv.url, json=call(i, "sleep", seconds=1.0), headers=HEADERS).status_code
                )

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 6
        # Serial would take 6 s; overlapped about 1 s. The wide gap keeps the
        # check meaningful on a loaded 2-core machine.
        assert time.monotonic() - t0 < 4.0


@pytest.mark.parametrize("stateless", [False, True])
def test_sdk_stop_is_quick_with_a_call_in_flight(stateless, no_thread_leak):
    srv = McpSdkServer(stateless=stateless).start()
    with httpx.Client(timeout=10) as c:
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        h = {
            **HEADERS,
            **({"Mcp-Session-Id": r.headers["mcp-session-id"]} if not stateless else {}),
        }
        outcome: list[object] = []

        def slow() -> None:
            try:
                outcome.append(c.post(srv.url, json=call(2, "sleep", seconds=30), headers=h))
            except httpx.HTTPError as exc:
                outcome.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        srv.wait_for_requests(2)
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 2
        t.join(5)
        assert not t.is_alive()
        assert outcome  # the client got *some* ending, not a hang


def test_sdk_idle_session_expires(no_thread_leak):
    # Another way to get "404 on a stale session id", without a restart.
    with McpSdkServer(session_idle_timeout=0.3) as srv, httpx.Client(timeout=5) as c:
        sid = c.post(srv.url, json=INIT, headers=HEADERS).headers["mcp-session-id"]
        time.sleep(0.8)
        r = c.post(
            srv.url, json=call(2, "echo", text="late"), headers={**HEADERS, "Mcp-Session-Id": sid}
        )
        assert r.status_code == 404


def test_sdk_given_port_and_port_in_use(no_thread_leak):
    with McpSdkServer() as first:
        with pytest.raises(OSError, match="in use"):
            McpSdkServer(port=first.port).start()
        port = first.port
    with McpSdkServer(port=port) as again, httpx.Client(timeout=5) as c:
        assert again.url == f"http://127.0.0.1:{port}/mcp"
        assert c.post(again.url, json=INIT, headers=HEADERS).status_code == 200


def test_sdk_rejects_foreign_host(no_thread_leak):
    with McpSdkServer() as srv, httpx.Client(timeout=5) as c:
        r = c.post(srv.url, json=INIT, headers={**HEADERS, "Host": "evil.example"})
        assert r.status_code == 421  # DNS-rebinding protection is on, 127.0.0.1:* allowed


# --------------------------------------------------------------------------- #
# Misbehaving servers
# --------------------------------------------------------------------------- #


def test_status_server(no_thread_leak):
    with (
        StatusServer(500, body="boom", content_type="text/plain") as srv,
        httpx.Client(timeout=5) as c,
    ):
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert (r.status_code, r.text, r.headers["content-type"]) == (500, "boom", "text/plain")
        assert srv.requests[0].json() == INIT
    with StatusServer(204, body=b"", content_type=None) as srv, httpx.Client(timeout=5) as c:
        r = c.post(srv.url, json=INITIALIZED, headers=HEADERS)
        assert (r.status_code, r.content) == (204, b"")
    with StatusServer(200, body="{not json", content_type="application/json") as srv:
        r = httpx.post(srv.url, json=INIT, headers=HEADERS, timeout=5)
        assert r.status_code == 200
        assert r.text == "{not json"


def test_silent_server_times_out_after_reading(no_thread_leak):
    with SilentServer() as srv:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url, json=INIT, headers=HEADERS, timeout=httpx.Timeout(5, read=0.3))
        assert time.monotonic() - t0 < 2
        [req] = srv.wait_for_requests(1)
        assert req.json() == INIT


def test_closed_port_refuses():
    url = closed_port_url()
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/mcp")
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json=INIT, headers=HEADERS, timeout=2)


def test_recording_server_json(no_thread_leak):
    with RecordingJsonServer() as srv, httpx.Client(timeout=5) as c:
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {
            "jsonrpc": "2.0",
            "id": 1,
            "result": {"echo": INIT["params"], "protocolVersion": "2025-06-18"},
        }
        assert "mcp-session-id" not in r.headers

        r = c.post(
            srv.url, json=INITIALIZED, headers={**HEADERS, "MCP-Protocol-Version": "2025-06-18"}
        )
        assert (r.status_code, r.content) == (202, b"")

        body = b'{"jsonrpc":"2.0","id":"x","method":"tools/list","params":{"a":[1]}}'
        r = c.post(srv.url, content=body, headers=HEADERS)
        assert r.json() == {"jsonrpc": "2.0", "id": "x", "result": {"echo": {"a": [1]}}}

        batch = [
            {"jsonrpc": "2.0", "id": 7, "method": "m"},
            INITIALIZED,
            {"jsonrpc": "2.0", "id": 8, "method": "n", "params": [2]},
        ]
        assert [m["id"] for m in c.post(srv.url, json=batch, headers=HEADERS).json()] == [7, 8]

        assert c.post(srv.url, content=b"{nope", headers=HEADERS).status_code == 400

        reqs = srv.requests
        assert len(reqs) == 5
        assert reqs[0].headers["accept"] == MCP_ACCEPT
        assert reqs[0].headers["content-type"] == "application/json"
        assert "mcp-protocol-version" not in reqs[0].headers
        assert reqs[1].headers["mcp-protocol-version"] == "2025-06-18"
        assert reqs[2].body == body  # byte for byte


def test_recording_server_sse_and_sessions(no_thread_leak):
    with (
        RecordingJsonServer(sse=True, sessions=True, protocol_version="2025-03-26") as srv,
        httpx.Client(timeout=5) as c,
    ):
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["mcp-session-id"] == "sess-1"
        note, resp = sse_messages(r.text)
        assert note["method"] == "notifications/message"
        assert "id" not in note
        assert resp["id"] == 1
        assert resp["result"]["protocolVersion"] == "2025-03-26"

        h = {**HEADERS, "Mcp-Session-Id": "sess-1"}
        r = c.post(srv.url, json=INITIALIZED, headers=h)
        assert (r.status_code, r.content) == (202, b"")
        _, resp = sse_messages(c.post(srv.url, json=call(2, "echo", text="t"), headers=h).text)
        assert resp["result"]["echo"]["name"] == "echo"

        srv.expire_sessions()
        assert c.post(srv.url, json=call(3, "echo", text="t"), headers=h).status_code == 404
        r = c.post(srv.url, json=INIT, headers=HEADERS)
        assert r.headers["mcp-session-id"] == "sess-2"
        assert srv.issued_sessions == ["sess-1", "sess-2"]
        assert [q.headers.get("mcp-session-id") for q in srv.requests] == [
            None,
            "sess-1",
            "sess-1",
            "sess-1",
            None,
        ]


def test_recording_server_stops_with_idle_keepalive_connection(no_thread_leak):
    srv = RecordingJsonServer().start()
    c = httpx.Client(timeout=5)
    try:
        c.post(srv.url, json=INIT, headers=HEADERS)  # leaves a pooled keep-alive connection
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 2
    finally:
        c.close()
