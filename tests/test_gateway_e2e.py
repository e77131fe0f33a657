"""End to end: the real uplink against the real reference gateway.

Nothing here is faked on either side of the WebSocket: the uplink is the
library (``actors.Uplink``) or the ``run_uplink.py`` command, the gateway is
``gateway.Gateway`` or the ``run_gateway.py`` command, the sled's MCP server is
the official MCP SDK's and the MCP client through the gateway is the SDK's
``ClientSession``. Covered: identity and heartbeat liveness (staleness when
heartbeats stop), approve / deny / always_allow through every approval mode
(auto, the REST API the console uses, the interactive terminal), the MCP relay,
a bad token, and the relay's 404 and 504 answers.

Waits are on events (gateway state, uplink status, process output), bounded by
``T``; intervals are short.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from actors import Uplink
from actors.config import __version__
from protocol import Decision, Reason
from sled_gateway import Gateway
from tests.conftest import REFERENCE_TOKEN, eventually
from tests.support.mcp_servers import McpSdkServer, SilentServer
from tests.support.proc import WatchedProcess

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR  # bound on anything waited for by event
TOKEN = REFERENCE_TOKEN
PROJECT = "e2e-sled"
OPERATOR = "e2e-operator-t0ken"


# -- helpers ----------------------------------------------------------------------------


def sled_of(state: dict[str, Any], project: str = PROJECT) -> dict[str, Any] | None:
    return next((s for s in state["sleds"] if s["project"] == project), None)


def sled_is(state_name: str, project: str = PROJECT) -> Callable[[dict[str, Any]], bool]:
    def check(state: dict[str, Any]) -> bool:
        sled = sled_of(state, project)
        return sled is not None and sled["state"] == state_name

    return check


@pytest.fixture
def connected(
    make_uplink: Callable[..., Uplink],
) -> Callable[..., Uplink]:
    """``connected(gw, **config)`` → an uplink identified at ``gw`` (as PROJECT)."""

    def make(gw: Gateway, **overrides: Any) -> Uplink:
        overrides.setdefault("project", PROJECT)
        uplink = make_uplink(gw.url_for_sleds(), **overrides)
        gw.wait_for(sled_is("connected", overrides["project"]), T)
        assert uplink.wait_connected(T)
        return uplink

    return make


def post_permission(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /permission`` to an uplink's ingress; blocks until decided."""
    response = httpx.post(f"http://127.0.0.1:{port}/permission", json=body, timeout=6 * T)
    return response.status_code, response.json()


class Background:
    """Run a blocking call on a thread; ``result()`` re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 2 * T) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the background call did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


class Proc(WatchedProcess):
    """A ``python`` subprocess whose stdout/stderr are readable by pattern while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(argv, cwd=ROOT, env=env, timeout=T)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(*argv: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc([sys.executable, *argv], env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HUSKIES_")
        and k not in ("SLED_GATEWAY_TOKEN", "SLED_GATEWAY_OPERATOR_TOKEN")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- identity and liveness ----------------------------------------------------------------


def test_identity_recorded_and_heartbeats_keep_the_sled_live(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway(heartbeat_interval=0.3)  # stale after 0.9 s without a heartbeat
    uplink = connected(gw, heartbeat_interval=0.1)

    state = gw.wait_for(lambda s: sled_of(s)["last_heartbeat"] is not None, T)  # type: ignore[index]
    sled = sled_of(state)
    assert sled is not None
    assert sled["info"] == {"version": __version__}  # the uplink's identity extras
    assert sled["remote"].startswith("127.0.0.1:")
    assert sled["connected_at"] is not None
    assert sled["frames_dropped"] == 0

    # Heartbeats every 0.1 s: never stale across twice the staleness bound.
    until = time.monotonic() + 1.8
    while time.monotonic() < until:
        assert sled_of(gw.state())["state"] == "connected"  # type: ignore[index]
        time.sleep(0.05)
    assert sled_of(gw.state())["frames_in"] >= 10  # type: ignore[index]

    uplink.stop()
    state = gw.wait_for(sled_is("disconnected"), T)
    gone = sled_of(state)
    assert gone is not None
    assert gone["close_code"] == 1001  # the uplink said "going away"
    assert gone["disconnected_at"] is not None


def test_stale_when_the_uplink_heartbeats_too_slowly(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway(heartbeat_interval=0.2)  # stale after 0.6 s
    uplink = connected(gw, heartbeat_interval=30.0)
    started = time.monotonic()
    state = gw.wait_for(sled_is("stale"), 3 * T)
    assert time.monotonic() - started >= 0.4  # not before ~3 missed intervals
    assert sled_of(state)["last_heartbeat"] is None  # type: ignore[index]
    # Stale is the gateway's view only: the socket itself is fine.
    assert uplink.status()["connection"]["state"] == "connected"


def test_stale_while_the_uplink_process_is_frozen_then_live_again(
    make_reference_gateway: Callable[..., Gateway], spawn: Callable[..., Proc]
) -> None:
    """run_uplink.py as a process: SIGSTOP silences it, SIGCONT brings it back."""
    gw = make_reference_gateway(heartbeat_interval=0.25)  # stale after 0.75 s
    uplink = spawn(
        str(ROOT / "run_uplink.py"),
        "--project",
        PROJECT,
        "--listen",
        "off",
        "--heartbeat-interval",
        "0.1",
        env=clean_env(HUSKIES_UPSTREAM_GATEWAY=gw.url_for_sleds()),
    )
    gw.wait_for(
        lambda s: (
            (x := sled_of(s)) is not None
            and x["state"] == "connected"
            and x["last_heartbeat"] is not None
        ),
        3 * T,
    )
    os.kill(uplink.proc.pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        gw.wait_for(sled_is("stale"), 3 * T)
        assert time.monotonic() - frozen_at >= 0.5
    finally:
        os.kill(uplink.proc.pid, signal.SIGCONT)
    state = gw.wait_for(sled_is("connected"), 3 * T)
    assert sled_of(state)["session"] == 1  # type: ignore[index]  # the same session, live again

    uplink.proc.send_signal(signal.SIGTERM)
    assert uplink.proc.wait(2 * T) == 0
    assert sled_of(gw.wait_for(sled_is("disconnected"), T))["close_code"] == 1001  # type: ignore[index]
    assert TOKEN not in uplink.out["stderr"] + uplink.out["stdout"]


# -- approvals: auto, REST (the console's API), interactive terminal -------------------------


@pytest.mark.parametrize("auto", ["approve", "deny"])
def test_auto_mode(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink], auto: str
) -> None:
    gw = make_reference_gateway(auto=auto)
    uplink = connected(gw)
    outcome = uplink.decide("Bash", {"command": "make test"}, timeout=2 * T)
    assert outcome.decision == Decision(auto)
    assert outcome.reason == Reason.GATEWAY
    decisions = gw.state()["decisions"]
    assert decisions[0]["req_id"] == outcome.request_id
    assert decisions[0]["decision"] == auto
    assert decisions[0]["by"] == "auto"
    assert gw.state()["pending"] == []


@pytest.mark.parametrize("decision", ["approve", "deny", "always_allow"])
def test_console_rest_decision_reaches_the_waiting_caller(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink], decision: str
) -> None:
    """Ingress POST /permission → uplink → gateway → REST decision → back to the caller."""
    gw = make_reference_gateway()
    uplink = connected(gw, listen="127.0.0.1:0")
    req_id = f"req-{uuid.uuid4().hex[:8]}"
    tool_input = {"file_path": "src/app.py", "content": "print('hi')\n"}
    caller = Background(
        lambda: post_permission(
            uplink._ingress.port,
            {"tool_name": "Write", "tool_input": tool_input, "request_id": req_id},
        )
    )
    state = gw.wait_for(lambda s: any(p["req_id"] == req_id for p in s["pending"]), T)
    pending = next(p for p in state["pending"] if p["req_id"] == req_id)
    assert pending["project"] == PROJECT
    assert pending["tool_name"] == "Write"
    assert pending["tool_input"] == tool_input
    assert not caller.done()  # it really waits for a human

    url = f"{gw.http_url}/api/permissions/{PROJECT}/{req_id}"
    answer = httpx.post(url, json={"decision": decision}, timeout=T, headers=gw.api_headers())
    assert answer.status_code == 200, answer.text
    assert answer.json()["decided"]["by"] == "api"

    status, body = caller.result()
    assert status == 200
    assert body["request_id"] == req_id
    assert body["decision"] == decision
    assert body["reason"] == "gateway"
    if decision == "deny":
        assert body["behavior"] == "deny"
        assert body["message"]
    else:
        assert body["behavior"] == "allow"
        assert body["updatedInput"] == tool_input

    # A decision never changes: a second answer is refused.
    again = httpx.post(url, json={"decision": "approve"}, timeout=T, headers=gw.api_headers())
    assert again.status_code == 409
    assert uplink.status()["permissions"]["pending"] == 0


def test_interactive_terminal_mode(
    spawn: Callable[..., Proc], make_uplink: Callable[..., Uplink]
) -> None:
    """run_gateway.py --interactive: answers typed on its stdin decide the sled's requests."""
    gw_proc = spawn(
        str(ROOT / "run_gateway.py"),
        "--listen",
        "127.0.0.1:0",
        "--interactive",
        env=clean_env(SLED_GATEWAY_TOKEN=TOKEN, SLED_GATEWAY_OPERATOR_TOKEN=OPERATOR),
    )
    port = int(gw_proc.wait_for(r"gateway listening on http://127\.0\.0\.1:(\d+)").group(1))
    uplink = make_uplink(f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}", project=PROJECT)
    assert uplink.wait_connected(T)

    for n, (key, expected) in enumerate(
        [("y", Decision.APPROVE), ("n", Decision.DENY), ("a", Decision.ALWAYS_ALLOW)], start=1
    ):
        future = uplink.request_permission("Bash", {"command": f"step {n}"})
        gw_proc.wait_for(r"approve \[y\] / deny \[n\] / always \[a\]\? ", "stdout", count=n)
        assert f"'{PROJECT}' asks to run Bash" in gw_proc.out["stdout"]
        assert f'"command": "step {n}"' in gw_proc.out["stdout"]
        assert not future.done()
        gw_proc.type(key)
        outcome = future.result(2 * T)
        assert outcome.decision is expected
        assert outcome.reason is Reason.GATEWAY

    state = httpx.get(
        f"http://127.0.0.1:{port}/api/state",
        timeout=T,
        headers={"Authorization": f"Bearer {OPERATOR}"},
    ).json()
    assert [d["decision"] for d in state["decisions"]] == ["always_allow", "deny", "approve"]
    assert {d["by"] for d in state["decisions"]} == {"terminal"}

    gw_proc.proc.send_signal(signal.SIGTERM)
    assert gw_proc.proc.wait(2 * T) == 0
    eventually(lambda: uplink.status()["connection"]["state"] != "connected", 5.0, "disconnect")
    assert TOKEN not in gw_proc.out["stderr"]
    assert OPERATOR not in gw_proc.out["stderr"] + gw_proc.out["stdout"]


# -- the MCP relay --------------------------------------------------------------------------


async def _use_tools(url: str, headers: dict[str, str]) -> dict[str, Any]:
    async with (
        streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)) as (
            read,
            write,
        ),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        tools = await session.list_tools()
        echo = await session.call_tool("echo", {"text": "hello via the gateway"})
        add = await session.call_tool("add", {"a": 2, "b": 3})
        started = time.monotonic()
        sleeps = await asyncio.gather(
            *(session.call_tool("sleep", {"seconds": 0.6}) for _ in range(3))
        )
        return {
            "server": init.server_info.name,
            "tools": {t.name for t in tools.tools},
            "echo": echo.content[0].text,  # type: ignore[union-attr]
            "add": add.content[0].text,  # type: ignore[union-attr]
            "sleeps": [s.content[0].text for s in sleeps],  # type: ignore[union-attr]
            "sleep_wall": time.monotonic() - started,
            "errors": [r.is_error for r in (echo, add, *sleeps)],
        }


@pytest.mark.parametrize("stateless", [False, True], ids=["stateful-sse", "stateless-json"])
def test_mcp_sdk_client_through_gateway_and_uplink_to_sdk_server(
    make_reference_gateway: Callable[..., Gateway],
    connected: Callable[..., Uplink],
    stateless: bool,
) -> None:
    gw = make_reference_gateway()
    with McpSdkServer(stateless=stateless) as server:
        connected(gw, local_mcp_url=server.url)
        for _ in range(2):  # a second client re-initializes through the same uplink
            got = asyncio.run(
                asyncio.wait_for(_use_tools(gw.mcp_url(PROJECT), gw.api_headers()), 6 * T)
            )
            assert got["server"] == "sled-uplink-test"
            assert {"echo", "add", "sleep"} <= got["tools"]
            assert got["echo"] == "hello via the gateway"
            assert got["add"] == "5"
            assert got["sleeps"] == ["slept 0.6"] * 3
            assert got["sleep_wall"] < 1.5  # relayed concurrently, not one after another
            assert got["errors"] == [False] * 5
        # The SDK server really served them (through the uplink's replay).
        methods = [r.json().get("method") for r in server.requests if r.method == "POST"]
        assert methods.count("initialize") == 2
        assert methods.count("tools/call") == 10


def test_mcp_relay_unknown_sled_is_404(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway()
    uplink = connected(gw)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    response = httpx.post(
        gw.mcp_url("no-such-sled"), json=body, timeout=T, headers=gw.api_headers()
    )
    assert response.status_code == 404
    assert "no-such-sled" in response.json()["error"]

    uplink.stop()  # a sled that has gone is unknown too
    gw.wait_for(sled_is("disconnected"), T)
    response = httpx.post(gw.mcp_url(PROJECT), json=body, timeout=T, headers=gw.api_headers())
    assert response.status_code == 404


def test_mcp_relay_sled_not_answering_in_time_is_504(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway(mcp_timeout=0.5)
    with SilentServer() as silent:
        uplink = connected(gw, local_mcp_url=silent.url, mcp_timeout=20.0)
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        started = time.monotonic()
        response = httpx.post(
            gw.mcp_url(PROJECT), json=body, timeout=3 * T, headers=gw.api_headers()
        )
        took = time.monotonic() - started
        assert response.status_code == 504
        assert PROJECT in response.json()["error"]
        assert 0.4 <= took < 3.0
        silent.wait_for_requests(1, T)  # it did reach the sled's local server via the uplink
        # The sled stays connected and usable.
        assert uplink.status()["connection"]["state"] == "connected"
        assert sled_of(gw.state())["state"] == "connected"  # type: ignore[index]
        uplink.stop()  # before the silent server, so the pending replay is abandoned first


# -- authentication -------------------------------------------------------------------------


def test_bad_token_is_refused_and_the_uplink_backs_off_then_heals(
    make_reference_gateway: Callable[..., Gateway], make_uplink: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway()
    port = gw.port
    uplink = make_uplink(
        gw.url_for_sleds("not-the-token"),
        project=PROJECT,
        backoff_initial=0.05,
        backoff_max=0.5,
        backoff_reset_after=30.0,
    )

    def connection() -> dict[str, Any]:
        conn: dict[str, Any] = uplink.status()["connection"]
        return conn

    eventually(
        lambda: connection().get("sessions_started", 0) >= 1 and connection()["state"] == "backoff",
        5.0,
        "the first refusal",
    )
    first = connection()
    assert "refused the token (HTTP 401)" in first["last_end"]
    # A token error waits the *maximum* back-off (±20 %), not the initial 0.05 s.
    assert first["backoff"] >= 0.5 * 0.8 - 1e-6
    assert first["sessions_up"] == 0
    # It keeps trying, slowly.
    eventually(lambda: connection()["sessions_started"] >= 3, 20.0, "more attempts")
    assert connection()["sessions_up"] == 0
    assert "not-the-token" not in json.dumps(uplink.status())  # rendered as token=***
    assert "token=***" in connection()["url"]
    assert gw.state()["sleds"] == []

    # Fix the gateway (same port, now accepting that token): the uplink heals by itself.
    gw.stop()
    fixed = make_reference_gateway(port=port, token="not-the-token")
    fixed.wait_for(sled_is("connected"), 4 * T)
    assert uplink.wait_connected(T)
