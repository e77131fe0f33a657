"""MCP replay end to end.

Every test runs the real uplink against the real WebSocket test gateway, and
replays against a real local HTTP server: the official MCP Python SDK server
(stateful SSE and stateless JSON), or the small scripted servers of
tests/support/mcp_servers.py where a test needs to see exact headers, batches
or a failure the SDK cannot produce. Nothing is mocked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from loguru import logger

from tests.conftest import eventually, scaled
from tests.support.gateway import Gateway, Session
from tests.support.mcp_servers import (
    MCP_ACCEPT,
    McpSdkServer,
    RecordingJsonServer,
    SilentServer,
    StatusServer,
    _send,
    closed_port_url,
)

pytestmark = pytest.mark.timeout(30)

HEARTBEAT = '{"type":"heartbeat","req_id":"","payload":null}'
PROTOCOL_VERSION = "2025-06-18"

INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "sled-gateway-test", "version": "0"},
        },
    }
)
INITIALIZED = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})


def call(id_: Any, name: str, **arguments: Any) -> str:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": id_,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
    )


def request(id_: Any, method: str, params: Any = None) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


def _rpc_error(message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}


missing_session = _rpc_error("Bad Request: Missing session ID")
session_not_found = _rpc_error("Session not found")


# ── helpers ──────────────────────────────────────────────────────────────


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every loguru message (DEBUG and up) logged during the test."""
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="DEBUG"
    )
    yield lines
    logger.remove(sink)


class Link:
    """One uplink connected to the gateway, replaying against ``mcp_url``."""

    def __init__(
        self, gateway: Gateway, make_uplink: Callable[..., Any], mcp_url: str, **config: Any
    ):
        self.gateway = gateway
        self.uplink = make_uplink(gateway.url, local_mcp_url=mcp_url, **config)
        self.session = gateway.session(1, timeout=scaled(5))
        gateway.frame(self.session, "identity", timeout=scaled(5))
        self.sent: list[tuple[float, str]] = []  # (time, frame text) the gateway sent

    def send(
        self, req_id: str, body: Any, *, payload: Any = ..., session: Session | None = None
    ) -> None:
        """Send an mcp_request (``body`` text, or a whole ``payload``)."""
        session = session or self.session
        if payload is ...:
            payload = {"body": body}
        self.sent.append(
            (
                time.monotonic(),
                json.dumps({"type": "mcp_request", "req_id": req_id, "payload": payload}),
            )
        )
        self.gateway.send(session, "mcp_request", req_id, payload)

    def response(
        self, req_id: str, timeout: float = 5.0, session: Session | None = None
    ) -> dict[str, Any]:
        """The mcp_response frame for ``req_id`` (waits for it)."""
        session = session or self.session
        return self.gateway.wait_until(
            lambda: next(
                (f for f in session.of_type("mcp_response") if f["req_id"] == req_id), None
            ),
            scaled(timeout),
        )

    def answered_at(self, req_id: str, session: Session | None = None) -> float:
        session = session or self.session
        return next(
            t
            for f, t in zip(session.frames, session.frame_times, strict=True)
            if f.get("type") == "mcp_response" and f.get("req_id") == req_id
        )

    def ask(self, req_id: str, body: Any, timeout: float = 5.0) -> Any:
        """Send and wait; return the answer's payload."""
        self.send(req_id, body)
        return self.response(req_id, timeout)["payload"]

    def handshake(self) -> dict[str, Any]:
        """initialize → notifications/initialized, as a gateway's MCP client does."""
        init = self.ask("init", INITIALIZE)
        assert init["id"] == 1, init
        assert init["result"]["protocolVersion"] == PROTOCOL_VERSION, init
        assert self.ask("initialized", INITIALIZED) is None
        return init


def text_of(answer: dict[str, Any]) -> str:
    assert "result" in answer, answer
    [content] = answer["result"]["content"]
    return content["text"]


def assert_error(answer: Any, id_: Any, code: int, *needles: str) -> str:
    assert isinstance(answer, dict), answer
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == id_, answer
    assert answer["error"]["code"] == code, answer
    message = answer["error"]["message"]
    assert isinstance(message, str), answer
    assert message.strip(), answer
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    return message


# ── 1 + 5: a whole MCP session against the official SDK server ──────────


@pytest.mark.parametrize("stateless", [False, True], ids=["sdk-stateful-sse", "sdk-stateless-json"])
def test_sdk_session_through_the_gateway(gateway: Gateway, make_uplink, stateless: bool) -> None:
    with McpSdkServer(stateless=stateless) as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()

        listed = link.ask("list", request(2, "tools/list"))
        assert listed["id"] == 2
        assert {"echo", "sleep", "add", "log_then_echo"} <= {
            t["name"] for t in listed["result"]["tools"]
        }

        echoed = link.ask("echo", call(3, "echo", text="héllo sled"))
        assert echoed["id"] == 3
        assert text_of(echoed) == "héllo sled"
        assert echoed["result"]["isError"] is False

        added = link.ask("add", call("four", "add", a=2, b=40))
        assert added["id"] == "four"
        assert added["result"]["structuredContent"] == {"result": 42}

        # The SDK sends a notifications/message before the result (on the
        # request's own SSE stream when stateful); the payload is the result.
        logged = link.ask("log", call(5, "log_then_echo", text="x"))
        assert logged["id"] == 5
        assert text_of(logged) == "x"
        assert "method" not in logged

        # Exactly the bodies sent, in order, one POST each, to the configured URL.
        sent = [r.json().get("method") for r in srv.requests]
        assert sent == [
            "initialize",
            "notifications/initialized",
            "tools/list",
            "tools/call",
            "tools/call",
            "tools/call",
        ]
        assert all(r.method == "POST" and r.path == "/mcp" for r in srv.requests)
        assert all(r.headers["accept"] == MCP_ACCEPT for r in srv.requests)
        after_init = srv.requests[1:]
        assert all(r.headers["mcp-protocol-version"] == PROTOCOL_VERSION for r in after_init)
        if stateless:
            assert not any("mcp-session-id" in r.headers for r in srv.requests)
        else:
            assert "mcp-session-id" not in srv.requests[0].headers
            session_ids = {r.headers.get("mcp-session-id") for r in after_init}
            assert len(session_ids) == 1
            assert None not in session_ids
        # The count follows the frame (the answer goes out from the loop first).
        eventually(lambda: link.uplink.status()["mcp"]["answered"] == 6, 5, "answered == 6")


def test_sdk_stateful_session_frames_logged(gateway: Gateway, make_uplink) -> None:
    """Logs (INFO) every frame of a stateful SDK session, for the lead's notes."""
    with McpSdkServer() as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()
        link.ask("list", request(2, "tools/list"))
        assert text_of(link.ask("echo", call(3, "echo", text="hi"))) == "hi"

        seen = [
            (t, "gateway <- uplink", raw)
            for raw, t in zip(link.session.raw, link.session.frame_times, strict=True)
        ]
        seen += [(t, "gateway -> uplink", raw) for t, raw in link.sent]
        seen.sort(key=lambda item: item[0])
        for n, (_, direction, raw) in enumerate(seen, 1):
            logger.info("frame {} {}: {}", n, direction, raw)

        kinds = [json.loads(raw)["type"] for _, _, raw in seen]
        assert kinds == ["identity"] + ["mcp_request", "mcp_response"] * 4
        responses = [json.loads(raw) for _, d, raw in seen if d == "gateway <- uplink"][1:]
        assert [f["req_id"] for f in responses] == ["init", "initialized", "list", "echo"]
        assert responses[1]["payload"] is None
        # The wire form of a 202 answer.
        assert '{"type":"mcp_response","req_id":"initialized","payload":null}' in link.session.raw


# ── headers ──────────────────────────────────────────────────────────────


def test_exact_headers_session_id_and_protocol_version(gateway: Gateway, make_uplink) -> None:
    with RecordingJsonServer(sessions=True, protocol_version="2025-03-26") as srv:
        link = Link(gateway, make_uplink, srv.url)
        assert link.ask("ping", request(0, "ping"))["id"] == 0
        init = link.ask("init", INITIALIZE)  # asks 2025-06-18, the server names 2025-03-26
        assert init["result"]["protocolVersion"] == "2025-03-26"
        assert link.ask("initialized", INITIALIZED) is None
        # Sent verbatim: odd spacing, key order and non-ASCII survive byte for byte.
        verbatim = (
            '{ "params" : {"name":"echo","arguments":{"text":"é ✓"}},'
            '"id":2 ,"method":"tools/call","jsonrpc":"2.0"}'
        )
        assert link.ask("call", verbatim)["result"]["echo"]["arguments"] == {"text": "é ✓"}

        ping, first_init, initialized, called = srv.requests
        for r in srv.requests:
            assert (r.method, r.path) == ("POST", "/mcp")
            assert r.headers["accept"] == "application/json, text/event-stream"
            assert r.headers["content-type"] == "application/json"
        # Nothing session-ish before the initialize result.
        for r in (ping, first_init):
            assert "mcp-session-id" not in r.headers
            assert "mcp-protocol-version" not in r.headers
        # Afterwards: the session the server issued and the version *it* named.
        for r in (initialized, called):
            assert r.headers["mcp-session-id"] == "sess-1"
            assert r.headers["mcp-protocol-version"] == "2025-03-26"
        assert first_init.body == INITIALIZE.encode()
        assert called.body == verbatim.encode("utf-8")

        # A new initialize starts a new local session: it carries neither the
        # old session id nor the old version; what follows carries the new id.
        assert link.ask("init2", INITIALIZE)["id"] == 1
        assert link.ask("call2", call(3, "echo", text="again"))["id"] == 3
        second_init, second_call = srv.requests[4:]
        assert "mcp-session-id" not in second_init.headers
        assert "mcp-protocol-version" not in second_init.headers
        assert second_call.headers["mcp-session-id"] == "sess-2"
        assert second_call.headers["mcp-protocol-version"] == "2025-03-26"


class _SetsCookies(RecordingJsonServer):
    """Sets a cookie on every answer, as a web framework's session middleware might."""

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        n = len(self.requests)
        json_answer = json.dumps({"jsonrpc": "2.0", "id": json.loads(body).get("id"), "result": {}})
        _send(
            h,
            200,
            json_answer.encode(),
            "application/json",
            {"Set-Cookie": f"who=caller-{n}; Path=/"},
        )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_cookie_the_local_server_sets_never_goes_out_with_a_later_replay(
    gateway: Gateway, make_uplink, host: str
) -> None:
    """Replays carry different callers' requests: one's cookie is not the next one's.

    By name as well as by address: a cookie jar that keeps nothing for an IP
    address (aiohttp's, by default) still keeps a host name's.
    """
    with _SetsCookies() as srv:
        link = Link(gateway, make_uplink, srv.url.replace("127.0.0.1", host))
        for i in range(3):
            assert link.ask(f"r{i}", request(i, "ping"))["id"] == i
        assert len(srv.requests) == 3
        assert all("cookie" not in r.headers for r in srv.requests)


def test_no_protocol_version_header_until_a_result_names_one(gateway: Gateway, make_uplink) -> None:
    # A server whose initialize result names no protocolVersion, but which
    # issues a session id: the id is kept, no version header is invented.
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"capabilities": {}}})
    with StatusServer(200, body, "application/json", headers={"Mcp-Session-Id": "abc-123"}) as srv:
        link = Link(gateway, make_uplink, srv.url)
        assert link.ask("init", INITIALIZE) == json.loads(body)
        link.ask("next", request(1, "tools/list"))
        init, nxt = srv.requests
        assert "mcp-session-id" not in init.headers
        assert nxt.headers["mcp-session-id"] == "abc-123"
        assert "mcp-protocol-version" not in nxt.headers


# ── answers: SSE, batches, 202/204 ──────────────────────────────────────


@pytest.mark.parametrize("sse", [True, False], ids=["sse", "json"])
def test_answers_and_batches(gateway: Gateway, make_uplink, logs: list[str], sse: bool) -> None:
    with RecordingJsonServer(sse=sse) as srv:
        link = Link(gateway, make_uplink, srv.url)
        params = {"name": "echo", "arguments": {"text": "hi"}}
        answer = link.ask("one", request("c-1", "tools/call", params))
        # Over SSE the server→client notification comes first: skipped.
        assert answer == {"jsonrpc": "2.0", "id": "c-1", "result": {"echo": params}}

        batch = json.dumps(
            [
                json.loads(request(1, "tools/list")),
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
                json.loads(request("two", "ping")),
            ]
        )
        answers = link.ask("batch", batch)
        assert [a["id"] for a in answers] == [1, "two"]
        assert all("result" in a for a in answers)

        # A batch of notifications only: 202 → null.
        only_notes = json.dumps([json.loads(INITIALIZED), json.loads(INITIALIZED)])
        assert link.ask("notes", only_notes) is None

        skipped = [line for line in logs if "server message in stream ignored" in line]
        if sse:
            assert len(skipped) == 2, skipped  # one per SSE answer
            assert all(
                line.startswith("DEBUG") and "notifications/message" in line for line in skipped
            )
        else:
            assert not skipped


@pytest.mark.parametrize("status", [202, 204])
def test_202_and_204_answer_payload_null(gateway: Gateway, make_uplink, status: int) -> None:
    # RecordingJsonServer answers a notification 202 (empty body, yet
    # Content-Type application/json, as the SDK does); StatusServer(204) answers
    # even a request with 204 and no body.
    server = RecordingJsonServer() if status == 202 else StatusServer(204, b"", None)
    with server as srv:
        link = Link(gateway, make_uplink, srv.url)
        body = INITIALIZED if status == 202 else request(5, "ping")
        link.send("n1", body)
        assert link.response("n1") == {"type": "mcp_response", "req_id": "n1", "payload": None}
        assert '{"type":"mcp_response","req_id":"n1","payload":null}' in link.session.raw
        assert len(srv.requests) == 1


# ── -32600: nothing is POSTed ────────────────────────────────────────────


def test_bad_bodies_answer_32600_and_post_nothing(gateway: Gateway, make_uplink) -> None:
    with RecordingJsonServer() as srv:
        link = Link(gateway, make_uplink, srv.url)
        cases: dict[str, Any] = {
            "no-payload": None,
            "no-body": {},
            "body-null": {"body": None},
            "body-number": {"body": 5},
            "body-object": {"body": {"jsonrpc": "2.0", "id": 1, "method": "ping"}},
            "not-json": {"body": "ping please"},
            "empty": {"body": ""},
            # It names an id, but it is not JSON: the uplink cannot know it.
            "truncated": {"body": '{"jsonrpc": "2.0", "id": 3, "method": '},
            "nan": {"body": '{"jsonrpc": "2.0", "id": NaN, "method": "ping"}'},
        }
        for req_id, payload in cases.items():
            link.send(req_id, None, payload=payload)
        for req_id in cases:
            frame = link.response(req_id)
            assert frame["req_id"] == req_id
            assert_error(frame["payload"], None, -32600)
        time.sleep(0.1)
        assert srv.requests == []
        # The server was there all along: a good body is posted.
        assert link.ask("good", request(9, "ping"))["id"] == 9
        assert len(srv.requests) == 1


# ── -32603 against real failing servers; the request's own id ───────────


def _failing_server(kind: str) -> Any:
    if kind == "closed-port":
        return None
    if kind == "http-500":
        return StatusServer(500, b"Internal Server Error", "text/plain")
    if kind == "never-answers":
        return SilentServer()
    if kind == "unreadable-json":
        return StatusServer(200, b'{"jsonrpc": "2.0", "id": 1, "res', "application/json")
    if kind == "sse-without-response":
        # A notification, and server→client *requests* that happen to reuse
        # the client's ids: none of them is the response.
        events = [
            RecordingJsonServer.NOTIFICATION,
            {"jsonrpc": "2.0", "id": 42, "method": "sampling/createMessage", "params": {}},
            {"jsonrpc": "2.0", "id": "x", "method": "roots/list"},
        ]
        stream = "".join(f"event: message\ndata: {json.dumps(e)}\n\n" for e in events)
        return StatusServer(200, stream, "text/event-stream")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("closed-port", "unreachable"),
        ("http-500", "HTTP 500"),
        ("never-answers", "timed out"),
        ("unreadable-json", "unreadable"),
        ("sse-without-response", "event stream"),
    ],
)
def test_failures_answer_32603_with_the_request_ids(
    gateway: Gateway, make_uplink, kind: str, needle: str
) -> None:
    server = _failing_server(kind)
    url = closed_port_url() if server is None else server.start().url
    timeout = 0.5
    try:
        link = Link(gateway, make_uplink, url, mcp_timeout=timeout)
        batch = json.dumps(
            [
                json.loads(request("x", "ping")),
                json.loads(INITIALIZED),
                json.loads(request(7, "tools/list")),
            ]
        )
        bodies = {
            "str-id": request("abc-1", "tools/call", {"name": "echo"}),
            "int-id": request(42, "tools/list"),
            "notification": INITIALIZED,
            "batch": batch,
        }
        started = time.monotonic()
        for req_id, body in bodies.items():
            link.send(req_id, body)
        answers = {req_id: link.response(req_id, timeout=5)["payload"] for req_id in bodies}
        elapsed = time.monotonic() - started

        assert_error(answers["str-id"], "abc-1", -32603, needle)
        assert_error(answers["int-id"], 42, -32603, needle)
        if kind == "sse-without-response":
            # A notification expects no response: a stream without one is fine.
            assert answers["notification"] is None
        else:
            assert_error(answers["notification"], None, -32603, needle)
        assert isinstance(answers["batch"], list)
        assert len(answers["batch"]) == 2
        assert_error(answers["batch"][0], "x", -32603, needle)
        assert_error(answers["batch"][1], 7, -32603, needle)

        if server is not None:
            assert len(server.requests) == 4  # each POSTed once, none retried
        if kind == "never-answers":
            # The request got there (not a connect failure); all four waited
            # out one --mcp-timeout together.
            assert timeout * 0.9 <= elapsed < timeout + scaled(1.0), elapsed
        else:
            assert elapsed < scaled(2.0)
    finally:
        if server is not None:
            server.stop()


def test_a_proxy_in_the_environment_does_not_catch_the_replays(
    gateway: Gateway, make_uplink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy set for the internet must not see loopback MCP, by name or address."""
    with RecordingJsonServer() as proxy, RecordingJsonServer() as local:
        proxy_url = proxy.url.rsplit("/", 1)[0]
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        link = Link(gateway, make_uplink, local.url.replace("127.0.0.1", "localhost"))
        for i in range(2):
            assert link.ask(f"r{i}", request(i, "ping"))["id"] == i
        assert len(local.requests) == 2
        assert proxy.requests == []


def test_a_redirect_is_not_followed(gateway: Gateway, make_uplink) -> None:
    """The replay goes to the configured server only: a 3xx is an error, not a hop."""
    with RecordingJsonServer() as elsewhere:
        with StatusServer(307, b"", None, {"Location": elsewhere.url}) as moved:
            link = Link(gateway, make_uplink, moved.url)
            assert_error(link.ask("r", request(1, "ping")), 1, -32603, "HTTP 307")
            assert len(moved.requests) == 1
        assert elsewhere.requests == []


def test_an_answer_whose_header_is_too_large_is_an_error_and_the_next_replay_works(
    gateway: Gateway, make_uplink
) -> None:
    """A header past the HTTP engine's limit fails that replay only."""
    good = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}})
    with StatusServer(200, good, "application/json", {"X-Padding": "a" * 20_000}) as big:
        link = Link(gateway, make_uplink, big.url)
        assert_error(link.ask("r1", request(1, "ping")), 1, -32603, "exchange failed")
        big.extra_headers.clear()
        assert link.ask("r2", request(1, "ping")) == json.loads(good)


def test_timeout_default_is_not_hit_by_a_slow_but_answering_server(
    gateway: Gateway, make_uplink
) -> None:
    # The --mcp-timeout bound is what cuts a SilentServer: a server that takes
    # longer than the bound to answer fails, one within it succeeds.
    with McpSdkServer(stateless=True) as srv:
        link = Link(gateway, make_uplink, srv.url, mcp_timeout=0.6)
        assert text_of(link.ask("fast", call(1, "sleep", seconds=0.1))) == "slept 0.1"
        assert_error(link.ask("slow", call(2, "sleep", seconds=1.0)), 2, -32603, "timed out")


@pytest.mark.parametrize("stateless", [True, False], ids=["json-content-length", "sse-streamed"])
def test_answer_over_the_size_cap(gateway: Gateway, make_uplink, stateless: bool) -> None:
    with McpSdkServer(stateless=stateless) as srv:
        link = Link(gateway, make_uplink, srv.url, mcp_max_response_bytes=600)
        link.handshake()
        assert text_of(link.ask("small", call(2, "echo", text="s" * 50))) == "s" * 50
        assert_error(
            link.ask("big", call(3, "echo", text="b" * 2000)), 3, -32603, "larger than 600 bytes"
        )
        # The session is still usable afterwards.
        assert text_of(link.ask("after", call(4, "echo", text="ok"))) == "ok"


def test_default_size_cap_is_8_mib(gateway: Gateway, make_uplink) -> None:
    # The SDK refuses request bodies this large (413), so a server that echoes
    # its params back: the answer is about as large as the request.
    mib = 1024 * 1024
    with RecordingJsonServer() as srv:
        link = Link(gateway, make_uplink, srv.url)
        under = link.ask("under", request(1, "echo", {"text": "u" * (8 * mib - 200)}), timeout=15)
        assert len(under["result"]["echo"]["text"]) == 8 * mib - 200
        over = link.ask("over", request(2, "echo", {"text": "o" * (8 * mib)}), timeout=15)
        assert_error(over, 2, -32603, f"larger than {8 * mib} bytes")
        assert len(srv.requests) == 2


# ── sessions: 404 → re-initialize → retry once ──────────────────────────


def test_sdk_restart_mid_session_recovers_through_reinitialize(
    gateway: Gateway, make_uplink, logs
) -> None:
    with McpSdkServer() as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()
        assert text_of(link.ask("before", call(2, "echo", text="before"))) == "before"
        old_session = srv.requests[-1].headers["mcp-session-id"]

        srv.restart()  # same port, every session forgotten
        port_requests = len(srv.requests)
        assert text_of(link.ask("after", call(3, "echo", text="after"))) == "after"

        replayed = srv.requests[port_requests:]
        assert [r.json().get("method") for r in replayed] == [
            "tools/call",  # 404: the old session is gone
            "initialize",
            "notifications/initialized",
            "tools/call",  # the one retry
        ]
        stale, reinit, initialized, retry = replayed
        assert stale.headers["mcp-session-id"] == old_session
        assert reinit.body == INITIALIZE.encode()  # the gateway's own initialize body
        assert "mcp-session-id" not in reinit.headers
        new_session = initialized.headers["mcp-session-id"]
        assert new_session != old_session
        assert retry.headers["mcp-session-id"] == new_session
        assert retry.headers["mcp-protocol-version"] == PROTOCOL_VERSION
        assert retry.body == stale.body == call(3, "echo", text="after").encode()
        # The renewed session stays in use; nothing is re-initialized again.
        assert link.ask("later", call(4, "echo", text="later"))["id"] == 4
        assert srv.requests[-1].headers["mcp-session-id"] == new_session
        assert len(srv.requests) == port_requests + 5
        # The gateway saw one answer per request, and never the re-initialize.
        assert [f["req_id"] for f in link.session.of_type("mcp_response")] == [
            "init",
            "initialized",
            "before",
            "after",
            "later",
        ]
        assert any("re-initializing" in line for line in logs)


def test_concurrent_calls_after_a_restart_share_one_reinitialize(
    gateway: Gateway, make_uplink
) -> None:
    with McpSdkServer() as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()
        srv.restart()
        before = len(srv.requests)
        for i in range(6):
            link.send(f"c{i}", call(i, "echo", text=f"t{i}"))
            time.sleep(0.005)  # some arrive while the re-initialize is under way
        for i in range(6):
            assert text_of(link.response(f"c{i}")["payload"]) == f"t{i}"
        methods = [r.json().get("method") for r in srv.requests[before:]]
        assert methods.count("initialize") == 1, methods
        assert methods.count("notifications/initialized") == 1, methods


class _StrictSlowInit(RecordingJsonServer):
    """Like the SDK, refuses (400) a non-initialize request without a session
    id. Its 404 to a stale session id takes 0.2 s (so several stale requests
    are in flight together) and its initialize 0.4 s (so a re-initialize stays
    under way while other requests arrive)."""

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        sid = h.headers.get("Mcp-Session-Id")
        if b'"initialize"' in body:
            time.sleep(0.4)
        elif sid is None:
            _send(h, 400, json.dumps(missing_session).encode(), "application/json")
            return
        elif sid not in self.live_sessions():
            time.sleep(0.2)
        super().handle(h, body)

    def live_sessions(self) -> set[str]:
        with self._lock:
            return set(self._live_sessions)


def test_stale_and_waiting_requests_share_one_reinitialize(gateway: Gateway, make_uplink) -> None:
    with _StrictSlowInit(sessions=True) as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()
        srv.expire_sessions()
        before = len(srv.requests)
        for i in range(3):  # all three go out on the stale session and get 404
            link.send(f"stale{i}", call(i, "echo", text="a"))
        # Wait for the re-initialize to be under way, then send three more.
        srv.wait_for_requests(before + 4)
        assert srv.requests[-1].json()["method"] == "initialize"
        for i in range(3, 6):
            link.send(f"during{i}", call(i, "echo", text="b"))
        for name in ["stale0", "stale1", "stale2", "during3", "during4", "during5"]:
            payload = link.response(name)["payload"]
            assert "result" in payload, payload
        sent = srv.requests[before:]
        methods = [r.json()["method"] for r in sent]
        assert methods.count("initialize") == 1, methods
        assert methods.count("notifications/initialized") == 1, methods
        calls = [
            r.headers.get("mcp-session-id") for r in sent if r.json()["method"] == "tools/call"
        ]
        # Three stale tries, their three retries and the three that waited.
        assert sorted(calls) == ["sess-1"] * 3 + ["sess-2"] * 6, calls


class _ToolsAlways404(RecordingJsonServer):
    """Sessions work, except that every tools/call with a session id gets 404."""

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        if h.headers.get("Mcp-Session-Id") and b"tools/call" in body:
            _send(
                h,
                404,
                json.dumps(session_not_found).encode(),
                "application/json",
            )
            return
        super().handle(h, body)


def test_404_again_after_reinitialize_is_answered_with_an_error(
    gateway: Gateway, make_uplink
) -> None:
    with _ToolsAlways404(sessions=True) as srv:
        link = Link(gateway, make_uplink, srv.url)
        link.handshake()
        before = len(srv.requests)
        assert_error(link.ask("call", call("c9", "echo", text="x")), "c9", -32603, "404")
        methods = [r.json().get("method") for r in srv.requests[before:]]
        # Retried exactly once after one re-initialize.
        assert methods == ["tools/call", "initialize", "notifications/initialized", "tools/call"]
        assert srv.requests[-1].headers["mcp-session-id"] == "sess-2"


class _Amnesiac(RecordingJsonServer):
    """Issues a session on initialize, then answers 404 to any request carrying one."""

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        self.expire_sessions()  # forgets each session right after issuing it
        super().handle(h, body)


def test_reinitialize_that_cannot_keep_a_session_answers_an_error(
    gateway: Gateway, make_uplink
) -> None:
    with _Amnesiac(sessions=True) as srv:
        link = Link(gateway, make_uplink, srv.url)
        assert link.ask("init", INITIALIZE)["id"] == 1
        # notifications/initialized: 404 → re-initialize → its own
        # notifications/initialized gets 404 too: an error, saying why.
        assert_error(link.ask("initialized", INITIALIZED), None, -32603, "404")
        assert_error(link.ask("call", call(5, "echo", text="x")), 5, -32603, "404")
        assert len(srv.requests) < 12  # no retry loop


def test_404_without_a_session_id_is_a_plain_error(gateway: Gateway, make_uplink) -> None:
    with StatusServer(404, b"no such endpoint", "text/plain") as srv:
        link = Link(gateway, make_uplink, srv.url)
        assert_error(link.ask("init", INITIALIZE), 1, -32603, "HTTP 404")
        assert_error(link.ask("list", request(2, "tools/list")), 2, -32603, "HTTP 404")
        assert len(srv.requests) == 2  # no re-initialize without a session id


def test_expired_session_with_no_initialize_seen(gateway: Gateway, make_uplink) -> None:
    # The local session id comes from an initialize inside a JSON-RPC batch:
    # the server issues a session for it, but a batch is not an initialize
    # body the uplink can replay (MCP forbids batching initialize), so no
    # initialize has been seen when that session expires.
    with RecordingJsonServer(sessions=True) as srv:
        link = Link(gateway, make_uplink, srv.url)
        answers = link.ask("batched-init", json.dumps([json.loads(INITIALIZE)]))
        assert answers[0]["result"]["protocolVersion"] == PROTOCOL_VERSION
        assert srv.issued_sessions == ["sess-1"]
        assert link.ask("works", request(2, "tools/list"))["id"] == 2
        assert srv.requests[-1].headers["mcp-session-id"] == "sess-1"

        srv.expire_sessions()
        message = assert_error(link.ask("stale", call("late", "echo")), "late", -32603, "expired")
        assert "session" in message.lower()
        # Nothing was re-initialized: the stale POST was the last one.
        assert [r.json() if r.body.startswith(b"[") else r.json()["method"] for r in srv.requests][
            1:
        ] == [
            "tools/list",
            "tools/call",
        ]
        assert srv.issued_sessions == ["sess-1"]


# ── concurrency ─────────────────────────────────────────────────────────


def test_concurrency_limit_makes_the_rest_wait(gateway: Gateway, make_uplink) -> None:
    with McpSdkServer(stateless=True) as srv:
        link = Link(gateway, make_uplink, srv.url, mcp_concurrency=2)
        started = time.monotonic()
        for i in range(4):
            link.send(f"s{i}", call(i, "sleep", seconds=0.5))
        for i in range(4):
            assert text_of(link.response(f"s{i}")["payload"]) == "slept 0.5"
        elapsed = max(link.answered_at(f"s{i}") for i in range(4)) - started
        firsts = sorted(link.answered_at(f"s{i}") - started for i in range(4))
        # Two at a time: two answers near 0.5 s, two near 1.0 s.
        assert 0.95 <= elapsed < 1.0 + scaled(0.5), elapsed
        assert firsts[1] < 0.9, firsts
        assert firsts[2] >= 0.95, firsts


def test_eight_slow_calls_overlap_and_heartbeats_and_permissions_stay_on_time(
    gateway: Gateway, make_uplink
) -> None:
    interval = 0.2
    gateway.auto = "approve"
    with McpSdkServer() as srv:
        link = Link(gateway, make_uplink, srv.url, heartbeat_interval=interval)
        link.handshake()
        started = time.monotonic()
        for i in range(8):
            link.send(f"sleep{i}", call(i, "sleep", seconds=1.0))
        time.sleep(0.3)  # the sleeps are running now
        asked = time.monotonic()
        outcome = link.uplink.request_permission("Bash", {"command": "ls"}).result(
            timeout=scaled(5)
        )
        round_trip = time.monotonic() - asked
        # Nor do the sleeps hold up another replay.
        link.send("quick", call(99, "echo", text="quick"))
        assert text_of(link.response("quick")["payload"]) == "quick"
        quick = link.answered_at("quick") - link.sent[-1][0]
        for i in range(8):
            assert text_of(link.response(f"sleep{i}")["payload"]) == "slept 1.0"
        finished = max(link.answered_at(f"sleep{i}") for i in range(8))

        assert outcome.decision.allows
        assert round_trip < 0.5, round_trip
        assert quick < 0.3, quick
        assert link.answered_at("quick") < finished - 0.3
        assert 1.0 <= finished - started < 2.5, finished - started
        beats = [
            t
            for raw, t in zip(link.session.raw, link.session.frame_times, strict=True)
            if raw == HEARTBEAT and started <= t <= finished
        ]
        gaps = [b - a for a, b in zip([started, *beats], [*beats, finished], strict=True)]
        assert len(beats) >= 4, beats
        assert max(gaps) < 0.5, gaps


# ── a replay outliving its session ───────────────────────────────────────


def test_answer_of_an_ended_session_is_dropped_not_sent_to_the_next(
    gateway: Gateway, make_uplink, logs: list[str]
) -> None:
    with McpSdkServer(stateless=True) as srv:
        link = Link(gateway, make_uplink, srv.url)
        first = link.session
        sent_at = time.monotonic()
        link.send("slow-1", call("slow", "sleep", seconds=1.0))
        srv.wait_for_requests(1)
        gateway.close(first)
        second = gateway.session(2, timeout=scaled(5))
        gateway.frame(second, "identity")
        assert time.monotonic() - sent_at < 0.8  # session 2 is up while the call still runs

        dropped = gateway.wait_until(
            lambda: [line for line in logs if "dropped" in line and "slow-1" in line], scaled(5)
        )
        dropped_after = time.monotonic() - sent_at
        assert dropped_after >= 0.9, "the replay ran to its end before being dropped"
        assert "session 1" in dropped[0]
        assert link.uplink.status()["mcp"]["dropped_after_session_end"] == 1

        # Session 2 works, and holds only its own answer.
        link.send("fresh", call("f", "echo", text="new"), session=second)
        assert text_of(link.response("fresh", session=second)["payload"]) == "new"
        assert [f["req_id"] for f in second.of_type("mcp_response")] == ["fresh"]
        assert first.of_type("mcp_response") == []
        assert len(srv.requests) == 2
