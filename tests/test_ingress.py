"""The local HTTP ingress, over real HTTP.

Every test runs a real uplink (its ingress on 127.0.0.1:0) against the real
test gateway, and talks to the ingress with httpx or, where the test must
control the bytes on the wire (a declared length the client never sends, a
chunked body that never ends, a caller that hangs up), with a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from actors import Uplink, UplinkConfig
from actors.status import log_snapshot
from protocol import DENY_MESSAGES, ConfigError, Reason
from tests.conftest import FAST, scaled
from tests.support.gateway import Gateway, Session

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
APPROVE = {"approved": True, "always_allow": False}
DENY = {"approved": False, "always_allow": False}
ALWAYS = {"approved": True, "always_allow": True}
# What a real caller sends with a body it gives as bytes (the ingress refuses
# a POST without it: 415).
AS_JSON = {"content-type": "application/json"}


# ── fixtures and helpers ────────────────────────────────────────────────


@dataclass
class Live:
    """A started uplink with its ingress, its gateway and an HTTP client."""

    gateway: Gateway
    uplink: Uplink
    port: int
    client: httpx.Client
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def session(self, number: int = 1) -> Session:
        return self.gateway.session(number)

    def status(self) -> dict[str, Any]:
        response = self.client.get("/status")
        assert response.status_code == 200, response.text
        return response.json()

    def counters(self) -> dict[str, Any]:
        return self.status()["counters"]

    def post_in_background(self, body: Any) -> Future[httpx.Response]:
        """POST /permission from another thread (it blocks until decided)."""
        return self.pool.submit(
            httpx.post, f"{self.base}/permission", json=body, timeout=scaled(30)
        )


@pytest.fixture
def connect(gateway: Gateway, make_uplink: Callable[..., Uplink]) -> Iterator[Callable[..., Live]]:
    """``connect(**config)`` → a connected uplink with its ingress on a free port."""
    started: list[Live] = []

    def start(**overrides: Any) -> Live:
        uplink = make_uplink(gateway.url, listen="127.0.0.1:0", **overrides)
        assert uplink.wait_connected(scaled(5))
        port = uplink._ingress.port
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=scaled(30))
        live = Live(gateway, uplink, port, client)
        started.append(live)
        return live

    yield start
    for live in started:
        live.client.close()
        live.pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def live(connect: Callable[..., Live]) -> Live:
    return connect()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every loguru line from here on, as ``actor | LEVEL | message``."""
    lines: list[str] = []
    sink = logger.add(
        lines.append, level="DEBUG", format="{extra[actor]} | {level} | {message}", colorize=False
    )
    yield lines
    logger.remove(sink)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def json_error(response: httpx.Response, status: int) -> str:
    """Assert ``status`` with a JSON ``{"error": "..."}`` body; return the message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str)
    assert error
    return error


def respond_all(gateway: Gateway, session: Session, ids: list[str], payload: Any) -> Future[None]:
    """The gateway answers every id, in one coroutine in its own loop (fast)."""

    async def send_all() -> None:
        for request_id in ids:
            await session.ws.send(
                json.dumps({"type": "perm_response", "req_id": request_id, "payload": payload})
            )

    assert gateway._loop is not None
    return asyncio.run_coroutine_threadsafe(send_all(), gateway._loop)


def raw_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body) from a raw socket."""
    sock.settimeout(scaled(timeout))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def permission_head(extra_headers: str) -> bytes:
    return (
        "POST /permission HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\n{extra_headers}\r\n"
    ).encode()


def proc_status() -> dict[str, str]:
    """This process's /proc/self/status (Threads, VmRSS, VmHWM, ...)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0])


def process_figures() -> dict[str, int]:
    """Python threads, OS threads and resident memory (KiB) of this process."""
    status = proc_status()
    return {
        "threads": threading.active_count(),
        "os_threads": int(status["Threads"]),
        "rss_kib": kib(status["VmRSS"]),
    }


# ── 1. started and stopped with the actor system ───────────────────────


def test_the_ingress_starts_and_stops_with_the_uplink(
    gateway: Gateway, make_uplink: Callable[..., Uplink]
) -> None:
    without = make_uplink(gateway.url)
    assert without._ingress is None, "listen=None runs no ingress"
    uplink = make_uplink(gateway.url, listen="127.0.0.1:0")
    port = uplink._ingress.port
    assert port, "the bound port is known once start() returns"
    base = f"http://127.0.0.1:{port}"
    # Serving at once, and announcing itself in /status.
    assert httpx.get(f"{base}/healthz").json()["ok"] is True
    shown = httpx.get(f"{base}/status").json()["ingress"]
    assert (shown["state"], shown["port"]) == ("listening", port)
    # The Claude Code endpoint loads the MCP SDK on its first request, then says so.
    assert shown["mcp"] == "not_loaded"
    client = {"name": "test", "version": "0"}
    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    answer = httpx.post(
        f"{base}/mcp",
        json=initialize,
        headers={"Accept": "application/json, text/event-stream"},
        timeout=60,
    )
    assert answer.status_code == 200 and '"serverInfo"' in answer.text
    assert httpx.get(f"{base}/status").json()["ingress"]["mcp"] == "ready"
    uplink.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_a_taken_listen_port_fails_start_and_leaves_nothing_running(gateway: Gateway) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = UplinkConfig(
            upstream_url=gateway.url, project="p", listen=f"127.0.0.1:{port}", **FAST
        )
        with pytest.raises(ConfigError) as raised:
            Uplink(config).start()
    assert raised.value.option == "--listen"
    assert pykka.ActorRegistry.get_all() == [], "a failed start stops every actor it started"


# ── 1. POST /permission round trips ────────────────────────────────────


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(APPROVE, {"decision": "approve", "behavior": "allow"}, id="approve"),
        pytest.param(DENY, {"decision": "deny", "behavior": "deny"}, id="deny"),
        pytest.param(
            ALWAYS,
            {
                "decision": "always_allow",
                "behavior": "allow",
                # Claude Code's session rule for exactly this command.
                "updatedPermissions": [
                    {
                        "type": "addRules",
                        "rules": [{"toolName": "Bash", "ruleContent": "rm -rf build"}],
                        "behavior": "allow",
                        "destination": "session",
                    }
                ],
            },
            id="always",
        ),
    ],
)
def test_a_permission_round_trip_blocks_until_the_gateway_answers(
    live: Live, payload: dict[str, bool], expected: dict[str, Any]
) -> None:
    tool_input = {"command": "rm -rf build", "nested": [1, {"a": None, "b": "ü"}]}
    pending = live.post_in_background(
        {"tool_name": "Bash", "tool_input": tool_input, "request_id": "req-1"}
    )
    session = live.session()
    frame = live.gateway.frame(session, "perm_request")
    assert frame == {
        "type": "perm_request",
        "req_id": "req-1",
        "payload": {"tool_name": "Bash", "tool_input": tool_input},
    }
    time.sleep(0.2)
    assert not pending.done(), "POST /permission must block until the decision"
    assert live.status()["permissions"]["pending"] == 1
    live.gateway.respond(session, "req-1", payload)
    response = pending.result(timeout=scaled(5))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    if expected["behavior"] == "allow":
        assert answer == {
            "request_id": "req-1",
            "reason": "gateway",
            "updatedInput": tool_input,
            **expected,
        }
    else:
        assert answer == {
            "request_id": "req-1",
            "reason": "gateway",
            "message": DENY_MESSAGES[Reason.GATEWAY],
            **expected,
        }
        assert answer["message"].strip()
    assert live.status()["permissions"]["pending"] == 0


def test_claude_codes_permission_prompt_input_is_accepted(live: Live) -> None:
    live.gateway.auto = "approve"
    session = live.session()
    claude = {
        "tool_name": "Write",
        "input": {"file_path": "/tmp/x.txt", "content": "hi"},
        "tool_use_id": "toolu_01AbC",
    }
    answer = live.client.post("/permission", json=claude).json()
    frame = live.gateway.frame(session, "perm_request", 0)
    assert frame["req_id"] == "toolu_01AbC"
    assert frame["payload"] == {"tool_name": "Write", "tool_input": claude["input"]}
    assert answer["request_id"] == "toolu_01AbC"
    # What a permission-prompt tool hands back to Claude Code, unchanged.
    assert {k: answer[k] for k in ("behavior", "updatedInput")} == {
        "behavior": "allow",
        "updatedInput": claude["input"],
    }
    # Both spellings given: tool_input and request_id win.
    both = {
        "tool_name": "Bash",
        "tool_input": {"command": "ours"},
        "input": {"command": "theirs"},
        "request_id": "ours-1",
        "tool_use_id": "toolu_theirs",
    }
    answer = live.client.post("/permission", json=both).json()
    frame = live.gateway.frame(session, "perm_request", 1)
    assert frame["req_id"] == "ours-1"
    assert frame["payload"]["tool_input"] == {"command": "ours"}
    assert answer["request_id"] == "ours-1"
    assert answer["updatedInput"] == {"command": "ours"}
    # No input at all: the tool input defaults to {}.
    answer = live.client.post("/permission", json={"tool_name": "Read", "request_id": "r3"}).json()
    assert live.gateway.frame(session, "perm_request", 2)["payload"]["tool_input"] == {}
    assert answer["updatedInput"] == {}


def test_request_ids_are_generated_when_absent(live: Live) -> None:
    live.gateway.auto = "approve"
    session = live.session()
    first = live.client.post("/permission", json={"tool_name": "Bash"}).json()
    second = live.client.post("/permission", json={"tool_name": "Bash", "request_id": None}).json()
    ids = [first["request_id"], second["request_id"]]
    assert all(isinstance(i, str) and i for i in ids)
    assert ids[0] != ids[1]
    frames = [live.gateway.frame(session, "perm_request", n) for n in (0, 1)]
    assert [f["req_id"] for f in frames] == ids


def test_every_deny_has_a_non_empty_message_and_a_timeout_reads_differently(
    connect: Callable[..., Live],
) -> None:
    def policy(session: Session, frame: dict[str, Any]) -> None:
        answers = {
            "deny-me": DENY,
            "contradict-me": {"approved": False, "always_allow": True},
        }
        tool = frame["payload"]["tool_name"]
        if tool in answers:
            live.gateway.send_in_loop(session, "perm_response", frame["req_id"], answers[tool])

    live = connect(permission_timeout=1.5)
    live.gateway.auto = policy
    answers: dict[str, dict[str, Any]] = {}
    answers["gateway"] = live.client.post("/permission", json={"tool_name": "deny-me"}).json()
    answers["contradictory"] = live.client.post(
        "/permission", json={"tool_name": "contradict-me"}
    ).json()
    slow = live.post_in_background({"tool_name": "silent", "request_id": "slow-1"})
    wait_for(lambda: live.status()["permissions"]["pending"] == 1, "slow-1 pending")
    answers["duplicate_id"] = live.client.post(
        "/permission", json={"tool_name": "silent", "request_id": "slow-1"}
    ).json()
    assert not slow.done(), "a duplicate id leaves the first request untouched"
    answers["timeout"] = slow.result(timeout=scaled(10)).json()
    lost = live.post_in_background({"tool_name": "silent", "request_id": "lost-1"})
    session = live.session(1)
    live.gateway.wait_until(lambda: any(f.get("req_id") == "lost-1" for f in session.frames))
    live.gateway.abort(session)  # the connection drops with lost-1 unanswered
    answers["session_ended"] = lost.result(timeout=scaled(10)).json()

    for reason, answer in answers.items():
        assert answer["decision"] == "deny", answer
        assert answer["reason"] == reason, answer
        assert answer["behavior"] == "deny"
        assert "updatedInput" not in answer
        assert isinstance(answer["message"], str)
        assert answer["message"].strip(), answer
    messages = [a["message"] for a in answers.values()]
    assert len(set(messages)) == len(messages), "each deny reason is worded on its own"
    assert answers["timeout"]["message"] != answers["gateway"]["message"]


# ── 1. GET /status, /healthz, /ready, /metrics ─────────────────────────


def _policy_by_tool(live: Live) -> Callable[[Session, dict[str, Any]], None]:
    answers = {"approve-me": APPROVE, "deny-me": DENY, "always-me": ALWAYS}

    def policy(session: Session, frame: dict[str, Any]) -> None:
        payload = answers.get(frame["payload"]["tool_name"])
        if payload is not None:
            live.gateway.send_in_loop(session, "perm_response", frame["req_id"], payload)

    return policy


def _three_round_trips(live: Live) -> None:
    live.gateway.auto = _policy_by_tool(live)
    for tool in ("approve-me", "deny-me", "always-me"):
        assert live.client.post("/permission", json={"tool_name": tool}).status_code == 200


def test_status_serves_the_snapshot_the_logs_show(live: Live, logs: list[str]) -> None:
    _three_round_trips(live)
    session = live.session()
    live.gateway.send(session, "some_future_kind", "x-1", {"hello": 1})
    live.gateway.send_raw(session, b"\x00binary")
    wait_for(
        lambda: sum(live.counters().get("frames_dropped", {}).values()) == 2, "two dropped frames"
    )
    status = live.status()
    counters = status["counters"]
    assert status["connection"]["state"] == "connected"
    assert "backoff" in status["connection"]
    assert status["permissions"]["pending"] == 0
    assert status["mcp"]["in_flight"] == 0
    assert counters["decisions"] == {"approve": 1, "deny": 1, "always_allow": 1}
    assert counters["decision_reasons"] == {"gateway": 3}
    assert counters["frames_in"]["perm_response"] == 3
    assert counters["frames_out"]["perm_request"] == 3
    assert counters["frames_out"]["identity"] == 1
    assert counters["frames_dropped"] == {"unknown_type": 1, "binary": 1}
    assert counters["sessions"] == {"up": 1}

    log_snapshot(live.uplink.context)
    line = next(entry for entry in logs if "| snapshot {" in entry)
    logged = json.loads(line.split("| snapshot ", 1)[1])
    again = live.status()
    assert set(logged) == set(again)
    assert logged["counters"] == again["counters"]
    assert logged["permissions"] == again["permissions"]
    assert logged["connection"]["state"] == again["connection"]["state"]


def test_healthz_and_ready_follow_the_connection(connect: Callable[..., Live]) -> None:
    live = connect(backoff_initial=1.0, backoff_max=2.0)
    healthz = live.client.get("/healthz")
    assert healthz.status_code == 200
    assert healthz.json() == {"ok": True, "connected": True, "state": "connected"}
    ready = live.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "state": "connected"}

    live.gateway.stop()
    ready = wait_for(
        lambda: (
            (r := live.client.get("/ready")).status_code == 503
            and r.json()["state"] == "backoff"
            and r
        ),
        "/ready to answer 503 during the back-off",
    )
    assert ready.headers["content-type"] == "application/json"
    assert ready.json()["ready"] is False
    healthz = live.client.get("/healthz")
    assert healthz.status_code == 200, "liveness does not depend on the gateway"
    assert healthz.json()["ok"] is True
    assert healthz.json()["connected"] is False

    def scrape_in_backoff() -> dict[str, float] | None:
        families = {
            f.name: f for f in text_string_to_metric_families(live.client.get("/metrics").text)
        }
        state = {
            s.labels["state"]: s.value for s in families["sled_uplink_connection_state"].samples
        }
        if state["backoff"] != 1.0:
            return None
        return {"backoff": families["sled_uplink_backoff_seconds"].samples[0].value}

    scraped = wait_for(scrape_in_backoff, "a /metrics scrape during the back-off")
    assert 0.5 <= scraped["backoff"] <= 2.5, scraped
    status = live.status()
    if status["connection"]["state"] == "backoff":
        assert status["connection"]["backoff"] > 0

    live.gateway.start(live.gateway.port)
    live.uplink.reconnect()
    wait_for(lambda: live.client.get("/ready").status_code == 200, "/ready back to 200", timeout=8)
    families = {f.name: f for f in text_string_to_metric_families(live.client.get("/metrics").text)}
    assert families["sled_uplink_backoff_seconds"].samples[0].value == 0.0
    connected = [s for s in families["sled_uplink_connection_state"].samples if s.value == 1.0]
    assert [s.labels["state"] for s in connected] == ["connected"]


def test_a_disabled_uplink_is_alive_but_not_ready(make_uplink: Callable[..., Uplink]) -> None:
    uplink = make_uplink("", listen="127.0.0.1:0")
    with httpx.Client(base_url=f"http://127.0.0.1:{uplink._ingress.port}") as client:
        assert client.get("/healthz").json() == {
            "ok": True,
            "connected": False,
            "state": "disabled",
        }
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "state": "disabled"}
        answer = client.post("/permission", json={"tool_name": "Bash"}).json()
        assert answer["decision"] == "deny"
        assert answer["reason"] == "disabled"
        assert answer["message"].strip()


def test_metrics_parse_as_prometheus_text_and_match_status(live: Live) -> None:
    _three_round_trips(live)
    held = live.post_in_background({"tool_name": "hold-me", "request_id": "held-1"})
    wait_for(lambda: live.status()["permissions"]["pending"] == 1, "held-1 pending")

    response = live.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    status = live.status()

    def by_label(name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in families[name].samples}

    for family, label in [
        ("decisions", "decision"),
        ("decision_reasons", "reason"),
        ("frames_in", "type"),
        ("frames_out", "type"),
        ("frames_dropped", "reason"),
        ("sessions", "event"),
    ]:
        metric = families[f"sled_uplink_{family}"]
        assert metric.type == "counter"
        assert all(s.name == f"sled_uplink_{family}_total" for s in metric.samples)
        assert by_label(metric.name, label) == status["counters"].get(family, {}), family
    assert by_label("sled_uplink_decisions", "decision") == {
        "approve": 1.0,
        "deny": 1.0,
        "always_allow": 1.0,
    }
    assert families["sled_uplink_permissions_pending"].type == "gauge"
    assert families["sled_uplink_permissions_pending"].samples[0].value == 1.0
    assert families["sled_uplink_mcp_in_flight"].samples[0].value == 0.0
    assert families["sled_uplink_backoff_seconds"].samples[0].value == 0.0
    states = by_label("sled_uplink_connection_state", "state")
    assert states["connected"] == 1.0
    assert sum(states.values()) == 1.0

    live.gateway.respond(live.session(), "held-1", APPROVE)
    assert held.result(timeout=scaled(5)).json()["decision"] == "approve"
    families = {f.name: f for f in text_string_to_metric_families(live.client.get("/metrics").text)}
    assert families["sled_uplink_permissions_pending"].samples[0].value == 0.0
    assert by_label("sled_uplink_decisions", "decision")["approve"] == 2.0


# ── 2. bad input ────────────────────────────────────────────────────────

MALFORMED: list[tuple[str, bytes]] = [
    ("invalid JSON", b'{"tool_name": "Bash",'),
    ("empty body", b""),
    ("not UTF-8", b'\xff\xfe{"tool_name": "Bash"}'),
    ("NaN", b'{"tool_name": "Bash", "tool_input": NaN}'),
    ("trailing garbage", b'{"tool_name": "Bash"} x'),
    ("array", b'[{"tool_name": "Bash"}]'),
    ("null", b"null"),
    ("string", b'"Bash"'),
    ("missing tool_name", b'{"tool_input": {}}'),
    ("empty tool_name", b'{"tool_name": ""}'),
    ("blank tool_name", b'{"tool_name": "   "}'),
    ("numeric tool_name", b'{"tool_name": 42}'),
    ("null tool_name", b'{"tool_name": null}'),
    ("list tool_name", b'{"tool_name": ["Bash"]}'),
    ("object tool_name", b'{"tool_name": {"name": "Bash"}}'),
    ("boolean tool_name", b'{"tool_name": true}'),
    ("numeric request_id", b'{"tool_name": "Bash", "request_id": 42}'),
    ("list request_id", b'{"tool_name": "Bash", "request_id": ["a"]}'),
    ("object request_id", b'{"tool_name": "Bash", "request_id": {}}'),
    ("boolean request_id", b'{"tool_name": "Bash", "request_id": true}'),
    ("empty request_id", b'{"tool_name": "Bash", "request_id": ""}'),
    ("numeric tool_use_id", b'{"tool_name": "Bash", "tool_use_id": 7}'),
    ("lone surrogate", b'{"tool_name": "Bash", "tool_input": "\\ud800"}'),
    ("nested 100k deep", b"[" * 100_000),
    (
        "input nested 100k deep",
        b'{"tool_name": "Bash", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ),
]


def test_malformed_permission_bodies_get_400_with_a_json_error(live: Live) -> None:
    failures = []
    for name, body in MALFORMED:
        response = live.client.post(
            "/permission", content=body, headers={"content-type": "application/json"}
        )
        try:
            json_error(response, 400)
        except (AssertionError, ValueError, KeyError) as exc:
            failures.append(f"{name}: {response.status_code} {response.text[:120]!r} ({exc!r})")
    assert not failures, "\n".join(failures)
    assert live.status()["permissions"]["pending"] == 0
    assert live.session().of_type("perm_request") == [], "nothing malformed reaches the gateway"
    assert "decisions" not in live.counters()


def test_nesting_near_the_recursion_limit_is_answered_in_json(live: Live) -> None:
    """Around Python's recursion limit a body may parse but not re-encode: it
    must still get a JSON answer (400, or a decision), never a 500."""
    live.gateway.auto = "approve"
    answered = {200: 0, 400: 0}
    for depth in range(940, 1030, 3):
        nested = "[" * depth + '"leaf"' + "]" * depth
        body = '{"tool_name": "Bash", "tool_input": ' + nested + "}"
        response = live.client.post("/permission", content=body.encode(), headers=AS_JSON)
        assert response.headers["content-type"] == "application/json", (depth, response.text[:80])
        assert response.status_code in answered, (depth, response.status_code, response.text[:80])
        answered[response.status_code] += 1
        if response.status_code == 400:
            json_error(response, 400)
        else:  # too deep for this (deeply stacked) test to parse back: compare text
            assert '"decision":"approve"' in response.text, (depth, response.text[:80])
            assert f'"updatedInput":{nested}' in response.text, depth
    assert answered[200], "shallower bodies are decided"
    assert answered[400], "deeper bodies are refused"


def test_413_is_answered_from_the_declared_length_before_the_body_arrives(live: Live) -> None:
    for declared in (2 * MiB, MiB + 1):
        with raw_socket(live.port) as sock:
            sent = b'{"tool_name": "Bash", '
            sock.sendall(permission_head(f"Content-Length: {declared}\r\n") + sent)
            # The client has sent 22 of its declared bytes and stops: only an
            # answer from the header alone can arrive.
            status, headers, body = read_response(sock, timeout=3)
        assert status == 413, declared
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]
    assert live.status()["permissions"]["pending"] == 0
    assert live.session().of_type("perm_request") == []


def test_a_chunked_body_over_1mib_gets_413_without_waiting_for_its_end(live: Live) -> None:
    chunk = b"x" * 65536
    with raw_socket(live.port) as sock:
        sock.sendall(permission_head("Transfer-Encoding: chunked\r\n"))
        for _ in range(17):  # 1 MiB + 64 KiB, and the final 0-chunk is never sent
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, headers, body = read_response(sock, timeout=5)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]

    def chunks() -> Iterator[bytes]:
        for _ in range(24):
            yield chunk

    # The same through an ordinary client that streams the whole body.
    response = live.client.post("/permission", content=chunks(), headers=AS_JSON)
    assert response.request.headers["transfer-encoding"] == "chunked"
    json_error(response, 413)
    assert live.status()["permissions"]["pending"] == 0


def test_a_body_of_exactly_1mib_is_accepted_and_one_byte_more_is_not(live: Live) -> None:
    live.gateway.auto = "approve"
    head = b'{"tool_name": "Write", "tool_input": {"content": "'
    tail = b'"}}'
    body = head + b"a" * (MiB - len(head) - len(tail)) + tail
    assert len(body) == MiB
    response = live.client.post("/permission", content=body, headers=AS_JSON)
    assert response.status_code == 200
    assert response.json()["decision"] == "approve"
    assert len(response.json()["updatedInput"]["content"]) == MiB - len(head) - len(tail)
    over = head + b"a" * (MiB - len(head) - len(tail) + 1) + tail
    json_error(live.client.post("/permission", content=over, headers=AS_JSON), 413)


def test_unknown_paths_get_404_and_wrong_methods_405(live: Live) -> None:
    for method, path in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/status/"),
        ("GET", "/status/extra"),
        ("POST", "/permission/"),
        ("POST", "/PERMISSION"),
        ("GET", "/metrics.txt"),
    ]:
        json_error(live.client.request(method, path, headers=AS_JSON), 404)
    for method, path, allow in [
        ("GET", "/permission", "POST"),
        ("PUT", "/permission", "POST"),
        ("DELETE", "/permission", "POST"),
        ("POST", "/status", "GET"),
        ("PATCH", "/status", "GET"),
        ("POST", "/healthz", "GET"),
        ("PUT", "/ready", "GET"),
        ("POST", "/metrics", "GET"),
    ]:
        response = live.client.request(method, path, headers=AS_JSON)
        json_error(response, 405)
        assert response.headers["allow"] == allow
    # A query string does not change the route.
    assert live.client.get("/status?verbose=1").status_code == 200


def test_bad_requests_change_nothing_else(live: Live) -> None:
    kept = live.post_in_background({"tool_name": "Bash", "request_id": "keep-1"})
    session = live.session()
    live.gateway.frame(session, "perm_request")
    wait_for(lambda: live.status()["permissions"]["pending"] == 1, "keep-1 pending")
    before = live.status()

    for _, body in MALFORMED:
        assert live.client.post("/permission", content=body, headers=AS_JSON).status_code == 400
    with raw_socket(live.port) as sock:  # declared too long
        sock.sendall(permission_head(f"Content-Length: {2 * MiB}\r\n") + b"{")
        assert read_response(sock)[0] == 413
    with raw_socket(live.port) as sock:  # chunked too long
        sock.sendall(permission_head("Transfer-Encoding: chunked\r\n"))
        sock.sendall((b"%x\r\n" % (MiB + 1)) + b"x" * (MiB + 1) + b"\r\n")
        assert read_response(sock)[0] == 413
    with raw_socket(live.port) as sock:  # hangs up half-way through its body
        sock.sendall(permission_head("Content-Length: 100\r\n") + b'{"tool_name": "B')
    with raw_socket(live.port) as sock:  # not even HTTP
        sock.sendall(b"\x16\x03\x01\x00\xa5 hello?\r\n\r\n")
        sock.settimeout(scaled(3))
        sock.recv(4096)
    assert live.client.get("/nope").status_code == 404
    assert live.client.delete("/permission").status_code == 405
    time.sleep(0.3)  # anything these could have set off has had time to happen

    after = live.status()
    assert after["permissions"] == before["permissions"]
    assert after["counters"] == before["counters"]
    assert after["connection"]["state"] == "connected"
    assert len(session.of_type("perm_request")) == 1
    assert len(live.gateway.sessions) == 1
    assert not kept.done()

    live.gateway.respond(session, "keep-1", APPROVE)
    answer = kept.result(timeout=scaled(5)).json()
    assert (answer["request_id"], answer["decision"]) == ("keep-1", "approve")
    live.gateway.auto = "approve"
    assert (
        live.client.post("/permission", json={"tool_name": "Bash"}).json()["decision"] == "approve"
    )


@pytest.mark.parametrize("route", ["/permission", "/hooks/claude-code"])
def test_a_caller_that_disconnects_while_waiting_is_abandoned_and_the_gateway_told(
    live: Live, logs: list[str], route: str
) -> None:
    """Nobody is left to act on a person's answer: the request is denied at once
    (caller_gone) and the gateway is told on the session it was sent on, so the
    card does not wait for a person who could approve a request nobody runs."""
    if route == "/permission":
        payload: dict[str, Any] = {"tool_name": "Bash", "tool_input": {}, "request_id": "gone-1"}
    else:
        payload = {
            "hook_event_name": "PreToolUse",
            "tool_name": "Bash",
            "tool_input": {"command": "ls"},
            "tool_use_id": "gone-1",
        }
    body = json.dumps(payload).encode()
    head = permission_head(f"Content-Length: {len(body)}\r\n").replace(
        b"/permission", route.encode(), 1
    )
    with raw_socket(live.port) as sock:
        sock.sendall(head + body)
        session = live.session()
        sent = live.gateway.frame(session, "perm_request")
        assert sent["req_id"] == "gone-1"
    # The socket is closed: the caller is gone while its request waits.
    cancel = live.gateway.frame(session, "perm_cancel")
    assert cancel == {
        "type": "perm_cancel",
        "req_id": "gone-1",
        "payload": {"reason": "caller_gone"},
    }
    wait_for(lambda: live.status()["permissions"]["pending"] == 0, "the request decided")
    assert live.counters()["decision_reasons"] == {"caller_gone": 1}
    assert [line for line in logs if "decided 'gone-1'" in line and "[caller_gone]" in line]
    # A late answer from the gateway changes nothing.
    live.gateway.respond(session, "gone-1", APPROVE)
    time.sleep(0.2)
    assert live.counters()["decision_reasons"] == {"caller_gone": 1}
    assert len(session.of_type("perm_cancel")) == 1
    assert live.status()["permissions"]["pending"] == 0
    assert not [line for line in logs if "| ERROR |" in line], "answering a gone caller is no error"
    live.gateway.auto = "approve"
    assert (
        live.client.post("/permission", json={"tool_name": "Bash"}).json()["decision"] == "approve"
    )


@pytest.mark.parametrize("route", ["/permission", "/hooks/claude-code"])
def test_callers_that_hang_up_as_their_answer_comes_end_exactly_once(
    live: Live, logs: list[str], route: str
) -> None:
    """The gateway answers each request and, in the same instant, its caller hangs
    up: the two race into the uplink. Whichever it sees first decides, once: a
    request is approved or abandoned (caller_gone, with one perm_cancel), never
    both, never twice, and nothing is left pending."""
    count = 30
    sockets: dict[str, socket.socket] = {}

    def answer_and_hang_up(session: Session, frame: dict[str, Any]) -> None:
        live.gateway.send_in_loop(session, "perm_response", frame["req_id"], APPROVE)
        sock = sockets[frame["req_id"]]
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def request(i: int) -> bytes:
        if route == "/permission":
            payload: dict[str, Any] = {"tool_name": "Bash", "request_id": f"race-{i}"}
        else:
            payload = {
                "hook_event_name": "PreToolUse",
                "tool_name": "Bash",
                "tool_input": {"command": "ls"},
                "tool_use_id": f"race-{i}",
            }
        body = json.dumps(payload).encode()
        head = permission_head(f"Content-Length: {len(body)}\r\n")
        return head.replace(b"/permission", route.encode(), 1) + body

    live.gateway.auto = answer_and_hang_up
    for i in range(count):
        sockets[f"race-{i}"] = raw_socket(live.port)
    for i in range(count):
        sockets[f"race-{i}"].sendall(request(i))
    session = live.session()
    wait_for(
        lambda: (
            live.counters().get("decisions", {}).get("approve", 0)
            + live.counters().get("decision_reasons", {}).get("caller_gone", 0)
            >= count
        ),
        "every request decided",
        timeout=10,
    )
    live.gateway.auto = "approve"
    # One more request, answered normally: everything before it has been handled.
    assert (
        live.client.post("/permission", json={"tool_name": "Bash"}).json()["decision"] == "approve"
    )
    reasons = live.counters()["decision_reasons"]
    gone = reasons.get("caller_gone", 0)
    assert reasons.get("gateway", 0) - 1 + gone == count
    assert live.status()["permissions"]["pending"] == 0
    cancels = [frame["req_id"] for frame in session.of_type("perm_cancel")]
    assert len(cancels) == len(set(cancels)) == gone
    for i in range(count):
        decided = [line for line in logs if f"| decided 'race-{i}' " in line]
        assert len(decided) == 1, decided
        assert ("[caller_gone]" in decided[0]) == (f"race-{i}" in cancels)
    assert not [line for line in logs if "| ERROR |" in line]


def test_an_internal_error_is_still_answered_in_json(
    live: Live, logs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("status is broken")

    monkeypatch.setattr(live.uplink, "status", broken)
    response = live.client.get("/status")
    assert json_error(response, 500) == "internal error"
    assert [line for line in logs if line.startswith("ingress | ERROR")]
    monkeypatch.undo()
    assert live.client.get("/status").status_code == 200


# ── 3. a thousand callers waiting at once ───────────────────────────────


def report_figures(
    title: str,
    before: dict[str, int],
    waiting: dict[str, int],
    peak: dict[str, int],
    timing: dict[str, float],
) -> None:
    """Print the process figures (run pytest with -s to see them)."""
    status = proc_status()
    print(
        f"\n[{title}] "
        + "; ".join(
            f"{name}: before={before[name]} all-pending={waiting[name]} peak={peak[name]}"
            for name in before
        )
        + f"; VmRSS now={kib(status['VmRSS'])} KiB; VmHWM={kib(status['VmHWM'])} KiB; "
        + "; ".join(f"{name} in {seconds:.2f} s" for name, seconds in timing.items())
    )


async def post_over_asyncio(port: int, body: dict[str, Any]) -> tuple[int, str, Any]:
    """One POST /permission on its own connection, from an asyncio socket: a
    waiting caller costs the client side nothing but the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = json.dumps(body).encode()
        writer.write(permission_head(f"Content-Length: {len(data)}\r\n") + data)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        answer = json.loads(await reader.readexactly(int(headers["content-length"])))
        return int(head[0].split()[1]), headers["content-type"], answer
    finally:
        writer.close()


def test_a_thousand_callers_wait_at_once_on_a_handful_of_threads(
    gateway: Gateway, make_uplink: Callable[..., Uplink]
) -> None:
    callers = 1000
    uplink = make_uplink(gateway.url, listen="127.0.0.1:0", permission_timeout=120.0)
    assert uplink.wait_connected(scaled(5))
    port = uplink._ingress.port
    session = gateway.session(1)
    ids = [f"many-{n}" for n in range(callers)]
    before = process_figures()
    peak = dict(before)
    timing: dict[str, float] = {}

    def sample() -> None:
        for name, value in process_figures().items():
            peak[name] = max(peak[name], value)

    async def main() -> tuple[list[tuple[int, str, Any]], dict[str, int]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as probe:
            started = time.monotonic()
            posts = [
                asyncio.create_task(
                    post_over_asyncio(
                        port, {"tool_name": "Bash", "tool_input": {"n": n}, "request_id": ids[n]}
                    )
                )
                for n in range(callers)
            ]
            deadline = started + scaled(30)
            while True:
                sample()
                pending = (await probe.get("/status")).json()["permissions"]["pending"]
                if pending == callers:
                    break
                assert time.monotonic() < deadline, f"only {pending} of {callers} pending"
                await asyncio.sleep(0.05)
            timing["all pending"] = time.monotonic() - started
            await asyncio.sleep(0.2)  # held open, not answered
            sample()
            waiting = {**process_figures(), "done": sum(p.done() for p in posts)}
            assert gateway.wait_until(
                lambda: len(session.of_type("perm_request")) == callers, timeout=scaled(10)
            )
            answering = time.monotonic()
            await asyncio.wrap_future(respond_all(gateway, session, ids, APPROVE))
            gathered = asyncio.gather(*posts)
            while not gathered.done():
                sample()
                await asyncio.sleep(0.02)
            timing["all answered after the approvals"] = time.monotonic() - answering
            return await gathered, waiting

    responses, waiting = asyncio.run(main())
    sample()
    report_figures(f"{callers} waiting callers", before, waiting, peak, timing)
    assert waiting["done"] == 0, "every caller was still held open while all were pending"
    assert waiting["threads"] - before["threads"] < 20
    assert peak["threads"] - before["threads"] < 20
    assert peak["os_threads"] - before["os_threads"] < 20
    assert [(status, kind) for status, kind, _ in responses] == [
        (200, "application/json")
    ] * callers
    answers = [answer for _, _, answer in responses]
    assert [a["request_id"] for a in answers] == ids
    assert {a["decision"] for a in answers} == {"approve"}
    assert [a["updatedInput"] for a in answers] == [{"n": n} for n in range(callers)]
    after = uplink.status()
    assert after["permissions"]["pending"] == 0
    assert after["counters"]["decisions"] == {"approve": callers}


# ── 4. shutdown with callers waiting ───────────────────────────────────


@pytest.mark.parametrize("connected", [True, False], ids=["sent", "held"])
def test_stop_denies_every_waiting_caller_with_reason_shutdown(
    gateway: Gateway, make_uplink: Callable[..., Uplink], connected: bool
) -> None:
    callers = 50
    if connected:
        uplink = make_uplink(gateway.url, listen="127.0.0.1:0")
        assert uplink.wait_connected(scaled(5))
    else:  # no gateway to talk to: the requests are held, never sent
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        uplink = make_uplink(
            f"ws://127.0.0.1:{dead_port}/api/sled-uplink?token=t", listen="127.0.0.1:0"
        )
    base = f"http://127.0.0.1:{uplink._ingress.port}"

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=callers + 5)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=scaled(20)) as client:
            posts = [
                asyncio.create_task(
                    client.post("/permission", json={"tool_name": "Bash", "request_id": f"w-{n}"})
                )
                for n in range(callers)
            ]
            deadline = time.monotonic() + scaled(10)
            while uplink.status()["permissions"]["pending"] < callers:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            if not connected:
                assert uplink.status()["permissions"]["held"] == callers
            assert not any(p.done() for p in posts)
            await asyncio.to_thread(uplink.stop)
            return await asyncio.gather(*posts)

    responses = asyncio.run(main())
    for n, response in enumerate(responses):
        assert response.status_code == 200
        assert response.json() == {
            "request_id": f"w-{n}",
            "decision": "deny",
            "reason": "shutdown",
            "behavior": "deny",
            "message": DENY_MESSAGES[Reason.SHUTDOWN],
        }
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_sigterm_denies_waiting_callers_before_the_process_exits(
    gateway: Gateway, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "uplink.stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HUSKIES_UPLINK_LISTEN", None)
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run_uplink.py"),
                "--upstream-gateway",
                gateway.url,
                "--project",
                "sigterm-test",
                "--listen",
                "127.0.0.1:0",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        match = wait_for(
            lambda: re.search(
                r"ingress listening on http://127\.0\.0\.1:(\d+)", stderr_path.read_text()
            ),
            "the ingress to listen",
            timeout=15,
        )
        base = f"http://127.0.0.1:{match.group(1)}"
        wait_for(lambda: httpx.get(f"{base}/ready").status_code == 200, "the uplink to connect")
        with ThreadPoolExecutor(5) as pool:
            posts = [
                pool.submit(
                    httpx.post,
                    f"{base}/permission",
                    json={"tool_name": "Bash", "request_id": f"t-{n}"},
                    timeout=scaled(20),
                )
                for n in range(5)
            ]
            wait_for(
                lambda: httpx.get(f"{base}/status").json()["permissions"]["pending"] == 5,
                "five waiting callers",
            )
            proc.send_signal(signal.SIGTERM)
            answers = [p.result(timeout=scaled(10)).json() for p in posts]
        assert proc.wait(timeout=scaled(6)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    for n, answer in enumerate(answers):
        assert answer["request_id"] == f"t-{n}"
        assert (answer["decision"], answer["reason"], answer["behavior"]) == (
            "deny",
            "shutdown",
            "deny",
        )
        assert answer["message"] == DENY_MESSAGES[Reason.SHUTDOWN]
    session = gateway.session(1)
    gateway.wait_closed(session)
    assert session.close_code in (1000, 1001)
