"""The ingress's Claude Code endpoints and the ``hook`` / ``claude-config`` commands,
without the Claude Code binary (tests/test_claude_code.py runs that).

``/mcp`` is driven by the MCP SDK's own client and by raw HTTP (to see the
wire: SSE, progress notifications, no ``structuredContent``);
``/hooks/claude-code`` and ``run_uplink.py hook`` by real HTTP and real
processes, against a real uplink connected to the reference gateway.
Includes what a hostile web page would try.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from actors import Uplink
from protocol import DENY_MESSAGES, Reason
from sled_gateway import Gateway
from tests.conftest import closed_port
from tests.support.claude import Decider, wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
PROJECT = "claude-sled"
ACCEPT = "application/json, text/event-stream"
BASH = {"command": "mkdir -p d1", "description": "Create d1"}


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway]) -> Gateway:
    return make_reference_gateway()


@pytest.fixture
def uplink(gw: Gateway, make_uplink: Callable[..., Uplink]) -> Uplink:
    up = make_uplink(
        gw.url_for_sleds(), project=PROJECT, listen="127.0.0.1:0", claude_progress_interval=0.2
    )
    assert up.wait_connected(T)
    return up


def base(uplink: Uplink) -> str:
    return f"http://127.0.0.1:{uplink._ingress.port}"


# -- /mcp through the SDK's client -------------------------------------------------------


async def _call_prompt(url: str, arguments: dict[str, Any]) -> tuple[Any, Any, list[float]]:
    progress: list[float] = []

    async def on_progress(value: float, _total: float | None, _message: str | None) -> None:
        progress.append(value)

    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        result = await session.call_tool(
            "permission_prompt", arguments, progress_callback=on_progress
        )
    return tools, result, progress


@pytest.mark.parametrize("decision", ["approve", "always_allow", "deny"])
def test_mcp_permission_prompt_answers_in_claude_codes_words(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider], decision: str
) -> None:
    decider(decision, delay=0.7)  # long enough for progress notes at 0.2 s
    arguments = {"tool_name": "Bash", "input": BASH, "tool_use_id": f"toolu_{decision}"}
    tools, result, progress = asyncio.run(_call_prompt(base(uplink) + "/mcp", arguments))

    [tool] = tools.tools
    assert tool.name == "permission_prompt"
    assert tool.output_schema is None
    assert tool.input_schema["required"] == ["tool_name", "input"]
    assert set(tool.input_schema["properties"]) == {"tool_name", "input", "tool_use_id"}

    assert result.structured_content is None
    [block] = result.content
    answer = json.loads(block.text)
    # The request id at the gateway is Claude Code's tool_use_id.
    assert [(d["req_id"], d["decision"]) for d in gw.state()["decisions"]] == [
        (f"toolu_{decision}", decision)
    ]
    if decision == "deny":
        assert answer == {"behavior": "deny", "message": DENY_MESSAGES[Reason.GATEWAY]}
    elif decision == "approve":
        assert answer == {"behavior": "allow", "updatedInput": BASH}
    else:
        assert answer == {
            "behavior": "allow",
            "updatedInput": BASH,
            "updatedPermissions": [
                {
                    "type": "addRules",
                    "rules": [{"toolName": "Bash", "ruleContent": "mkdir -p d1"}],
                    "behavior": "allow",
                    "destination": "session",
                }
            ],
        }
    assert len(progress) >= 2, "progress notes while the gateway had not answered"
    assert progress == sorted(progress)


def test_mcp_bad_arguments_are_denied_and_not_forwarded(gw: Gateway, uplink: Uplink) -> None:
    _tools, result, _ = asyncio.run(
        _call_prompt(base(uplink) + "/mcp", {"tool_name": "", "input": {}})
    )
    answer = json.loads(result.content[0].text)
    assert answer["behavior"] == "deny"
    assert "tool_name" in answer["message"]
    assert gw.state()["decisions"] == [] and gw.pending() == []


# -- /mcp on the wire ---------------------------------------------------------------------


def _sse_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data:") :])
        for line in text.splitlines()
        if line.startswith("data:") and line[len("data:") :].strip()
    ]


def _initialize(client: httpx.Client, url: str) -> dict[str, str]:
    response = client.post(
        url,
        headers={"Accept": ACCEPT},
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "wire-test", "version": "1"},
            },
        },
    )
    assert response.status_code == 200, response.text
    headers = {"Accept": ACCEPT, "Mcp-Session-Id": response.headers["mcp-session-id"]}
    headers["MCP-Protocol-Version"] = "2025-06-18"
    client.post(
        url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"}
    )
    return headers


def test_mcp_answer_is_an_sse_stream_with_progress_and_no_structured_content(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider]
) -> None:
    decider("approve", delay=0.7)
    url = base(uplink) + "/mcp"
    with httpx.Client(timeout=6 * T) as client:
        headers = _initialize(client, url)
        response = client.post(
            url,
            headers=headers,
            json={
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {
                    "name": "permission_prompt",
                    "arguments": {"tool_name": "Bash", "input": BASH, "tool_use_id": "toolu_w1"},
                    "_meta": {"progressToken": "tok-1"},
                },
            },
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    notes = [e for e in events if e.get("method") == "notifications/progress"]
    assert len(notes) >= 2
    assert {n["params"]["progressToken"] for n in notes} == {"tok-1"}
    [final] = [e for e in events if e.get("id") == 7]
    assert "structuredContent" not in final["result"]
    assert final["result"]["content"] == [
        {
            "type": "text",
            "text": json.dumps({"behavior": "allow", "updatedInput": BASH}, separators=(",", ":")),
        }
    ]


def test_mcp_refuses_a_foreign_host_and_a_foreign_origin(gw: Gateway, uplink: Uplink) -> None:
    # DNS rebinding (Host: evil.example) and a cross-site page (Origin) are
    # refused before any MCP session exists; nothing reaches the gateway.
    url = base(uplink) + "/mcp"
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "x", "version": "1"},
        },
    }
    for extra in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}):
        response = httpx.post(url, headers={"Accept": ACCEPT, **extra}, json=body, timeout=T)
        assert 400 <= response.status_code < 500, (extra, response.status_code)
        assert "mcp-session-id" not in response.headers
    assert gw.pending() == []


def test_a_waiting_prompt_is_denied_at_shutdown(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider]
) -> None:
    watcher = decider(None)
    url = base(uplink) + "/mcp"

    async def call() -> Any:
        return await _call_prompt(
            url, {"tool_name": "Bash", "input": BASH, "tool_use_id": "toolu_s"}
        )

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(asyncio.run, call())
        wait_until(lambda: watcher.seen, 3 * T, "the request at the gateway")
        uplink.stop()
        _tools, result, _ = pending.result(3 * T)
    assert json.loads(result.content[0].text) == {
        "behavior": "deny",
        "message": DENY_MESSAGES[Reason.SHUTDOWN],
    }


# -- /hooks/claude-code --------------------------------------------------------------------


def hook_body(
    event: str, tool: str = "Bash", tool_input: Any = None, **extra: Any
) -> dict[str, Any]:
    return {
        "session_id": "s1",
        "hook_event_name": event,
        "tool_name": tool,
        "tool_input": BASH if tool_input is None else tool_input,
        **extra,
    }


def test_hook_endpoint_answers_pretooluse_and_permissionrequest(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider]
) -> None:
    decider("always_allow")
    url = base(uplink) + "/hooks/claude-code"
    pre = httpx.post(url, json=hook_body("PreToolUse", tool_use_id="toolu_h1"), timeout=3 * T)
    assert pre.status_code == 200
    assert pre.json() == {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "allow",
            "permissionDecisionReason": "Approved through the sled's gateway.",
        }
    }
    asked = httpx.post(url, json=hook_body("PermissionRequest"), timeout=3 * T)
    decision = asked.json()["hookSpecificOutput"]["decision"]
    assert asked.json()["hookSpecificOutput"]["hookEventName"] == "PermissionRequest"
    assert decision["behavior"] == "allow"
    assert decision["updatedInput"] == BASH
    assert decision["updatedPermissions"][0]["rules"] == [
        {"toolName": "Bash", "ruleContent": "mkdir -p d1"}
    ]
    assert gw.state()["decisions"][-1]["req_id"] == "toolu_h1"


def test_hook_endpoint_denies_with_the_uplinks_message(
    gw: Gateway, make_uplink: Callable[..., Uplink]
) -> None:
    up = make_uplink(
        gw.url_for_sleds(), project=PROJECT, listen="127.0.0.1:0", permission_timeout=0.5
    )
    assert up.wait_connected(T)
    response = httpx.post(
        base(up) + "/hooks/claude-code", json=hook_body("PreToolUse"), timeout=3 * T
    )
    output = response.json()["hookSpecificOutput"]
    assert output["permissionDecision"] == "deny"
    assert output["permissionDecisionReason"] == DENY_MESSAGES[Reason.TIMEOUT]


def test_hook_endpoint_never_forwards_read_only_tools(gw: Gateway, uplink: Uplink) -> None:
    url = base(uplink) + "/hooks/claude-code"
    for tool in ("Read", "Glob", "Grep"):
        response = httpx.post(
            url, json=hook_body("PreToolUse", tool, {"file_path": "/x"}), timeout=T
        )
        assert response.status_code == 200
        assert response.json() == {}  # no decision
    assert gw.pending() == [] and gw.state()["decisions"] == []


def test_hook_never_forward_list_is_configurable(
    gw: Gateway, make_uplink: Callable[..., Uplink]
) -> None:
    up = make_uplink(
        gw.url_for_sleds(),
        project=PROJECT,
        listen="127.0.0.1:0",
        hook_never_forward=("Bash",),
        permission_timeout=0.5,
    )
    assert up.wait_connected(T)
    url = base(up) + "/hooks/claude-code"
    assert httpx.post(url, json=hook_body("PreToolUse"), timeout=T).json() == {}
    read = httpx.post(url, json=hook_body("PreToolUse", "Read", {"file_path": "/x"}), timeout=3 * T)
    assert read.json()["hookSpecificOutput"]["permissionDecision"] == "deny"  # asked, timed out


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (json.dumps({"hook_event_name": "PostToolUse", "tool_name": "Bash"}).encode(), 400),
        (json.dumps({"hook_event_name": "PreToolUse", "tool_name": ""}).encode(), 400),
    ],
)
def test_hook_endpoint_bad_input_is_a_json_400(
    gw: Gateway, uplink: Uplink, content: bytes, status: int
) -> None:
    response = httpx.post(
        base(uplink) + "/hooks/claude-code",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=T,
    )
    assert response.status_code == status
    assert "error" in response.json()
    assert gw.pending() == []


def test_hook_endpoint_refuses_what_a_web_page_can_send(gw: Gateway, uplink: Uplink) -> None:
    # A cross-site form (text/plain, no preflight) or a fetch with an Origin.
    url = base(uplink) + "/hooks/claude-code"
    body = json.dumps(hook_body("PreToolUse"))
    form = httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=T)
    assert form.status_code == 415 and "error" in form.json()
    page = httpx.post(
        url,
        content=body,
        headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
        timeout=T,
    )
    assert page.status_code == 403 and "error" in page.json()
    assert gw.pending() == [] and gw.state()["decisions"] == []


# -- the hook command ----------------------------------------------------------------------


def run_hook(
    stdin: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_uplink.py"), "hook", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=6 * T,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_hook_command_prints_the_gateways_answer(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider]
) -> None:
    decider("deny")
    done = run_hook(json.dumps(hook_body("PermissionRequest")), "--ingress", base(uplink))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "hookSpecificOutput": {
            "hookEventName": "PermissionRequest",
            "decision": {"behavior": "deny", "message": DENY_MESSAGES[Reason.GATEWAY]},
        }
    }


def test_hook_command_prints_nothing_for_a_never_forwarded_tool(uplink: Uplink) -> None:
    body = hook_body("PreToolUse", "Glob", {"pattern": "*.py"})
    done = run_hook(json.dumps(body), "--ingress", base(uplink))
    assert done.returncode == 0 and done.stdout == ""


@pytest.mark.parametrize("event", ["PreToolUse", "PermissionRequest"])
def test_hook_command_fails_closed_when_the_uplink_is_down(event: str) -> None:
    done = run_hook(json.dumps(hook_body(event)), "--ingress", f"http://127.0.0.1:{closed_port()}")
    assert done.returncode == 0
    output = json.loads(done.stdout)["hookSpecificOutput"]
    assert output["hookEventName"] == event
    if event == "PreToolUse":
        assert output["permissionDecision"] == "deny"
        assert "could not be asked" in output["permissionDecisionReason"]
    else:
        assert output["decision"]["behavior"] == "deny"
    assert "denying" in done.stderr


def test_hook_command_fails_closed_on_an_error_answer(uplink: Uplink) -> None:
    # A 4xx from the ingress (here: a tool name it refuses) is a deny too.
    body = {"hook_event_name": "PreToolUse", "tool_name": ""}
    done = run_hook(json.dumps(body), "--ingress", base(uplink))
    output = json.loads(done.stdout)["hookSpecificOutput"]
    assert output["permissionDecision"] == "deny"
    assert "HTTP 400" in output["permissionDecisionReason"]


def test_hook_command_with_unusable_stdin_exits_2() -> None:
    done = run_hook("this is not json", "--ingress", "http://127.0.0.1:1")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "PreToolUse or PermissionRequest" in done.stderr


def test_hook_command_bad_option_exits_2_with_one_line() -> None:
    done = run_hook("{}", "--ingress", "ftp://x")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--ingress" in done.stderr and "Traceback" not in done.stderr


def test_hook_command_sends_the_ingress_token_from_the_environment() -> None:
    # A loopback server that records the request's headers.
    import http.server
    import threading

    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(dict(self.headers))
            self.rfile.read(int(self.headers["content-length"]))
            payload = b"{}"
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "HUSKIES_UPLINK_INGRESS_TOKEN": "ingress-s3cret"}
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = run_hook(json.dumps(hook_body("PreToolUse")), "--ingress", url, env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0 and done.stdout == ""
    assert seen[0]["Authorization"] == "Bearer ingress-s3cret"
    assert seen[0]["Content-Type"] == "application/json"
    assert "ingress-s3cret" not in done.stderr


# -- claude-config ---------------------------------------------------------------------------


def run_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_uplink.py"), "claude-config", *args],
        capture_output=True,
        text=True,
        timeout=6 * T,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_claude_config_prints_the_mcp_config_and_the_command() -> None:
    mcp = run_config("--ingress", "http://127.0.0.1:4010", "--print", "mcp")
    assert mcp.returncode == 0, mcp.stderr
    assert json.loads(mcp.stdout) == {
        "mcpServers": {"sled": {"type": "http", "url": "http://127.0.0.1:4010/mcp"}}
    }
    command = run_config("--ingress", "http://127.0.0.1:4010", "--print", "command")
    assert command.stdout.startswith("claude --mcp-config ")
    assert command.stdout.strip().endswith("--permission-prompt-tool mcp__sled__permission_prompt")


def test_claude_config_includes_the_ingress_token_when_set() -> None:
    env = {**os.environ, "HUSKIES_UPLINK_INGRESS_TOKEN": "tok-123"}
    mcp = json.loads(run_config("--print", "mcp", env=env).stdout)
    assert mcp["mcpServers"]["sled"]["headers"] == {"Authorization": "Bearer tok-123"}
    settings = json.loads(run_config("--print", "settings", "--ingress-token", "tok-9").stdout)
    [entry] = settings["hooks"]["PreToolUse"]
    [hook] = entry["hooks"]
    assert hook["type"] == "http"
    assert hook["url"] == "http://127.0.0.1:3002/hooks/claude-code"
    assert hook["headers"] == {"Authorization": "Bearer tok-9"}
    assert hook["timeout"] > 120  # outlives the uplink's permission timeout


def test_claude_config_command_hooks_run_this_checkout() -> None:
    settings = json.loads(run_config("--print", "settings", "--hooks", "command").stdout)
    hook = settings["hooks"]["PreToolUse"][0]["hooks"][0]
    assert hook["type"] == "command"
    assert "run_uplink.py hook --ingress http://127.0.0.1:3002" in hook["command"]


def test_claude_config_permission_request_hooks() -> None:
    settings = json.loads(run_config("--print", "settings", "--event", "PermissionRequest").stdout)
    assert list(settings["hooks"]) == ["PermissionRequest"]


def test_claude_config_bad_option_exits_2_with_one_line() -> None:
    done = run_config("--print", "everything")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1


def test_mcp_works_on_an_uplink_that_borrowed_the_callers_loop(
    gw: Gateway, decider: Callable[..., Decider]
) -> None:
    # async with Uplink(...): the ingress, its MCP session manager and the
    # SDK client all run in this one asyncio loop.
    from actors import UplinkConfig
    from tests.conftest import FAST

    decider("approve")
    config = UplinkConfig(
        upstream_url=gw.url_for_sleds(), project=PROJECT, listen="127.0.0.1:0", **FAST
    )

    async def main() -> Any:
        async with Uplink(config) as up:
            assert await up.await_connected(T)
            arguments = {"tool_name": "Bash", "input": BASH, "tool_use_id": "toolu_loop"}
            return await _call_prompt(base(up) + "/mcp", arguments)

    _tools, result, _ = asyncio.run(main())
    assert json.loads(result.content[0].text) == {"behavior": "allow", "updatedInput": BASH}
    assert gw.state()["decisions"][0]["req_id"] == "toolu_loop"


def test_post_permission_always_allow_carries_the_session_rule(
    gw: Gateway, uplink: Uplink, decider: Callable[..., Decider]
) -> None:
    # The same answer through the plain endpoint, for glue that calls it.
    decider("always_allow")
    body = {"tool_name": "Bash", "input": BASH, "tool_use_id": "toolu_p1"}
    answer = httpx.post(base(uplink) + "/permission", json=body, timeout=3 * T).json()
    assert answer["behavior"] == "allow"
    assert answer["updatedPermissions"][0]["rules"] == [
        {"toolName": "Bash", "ruleContent": "mkdir -p d1"}
    ]


def test_a_bad_progress_interval_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_uplink.py"), "--claude-progress-interval", "0"],
        capture_output=True,
        text=True,
        timeout=6 * T,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--claude-progress-interval" in done.stderr


def test_the_never_forward_option_reaches_the_config() -> None:
    import run_uplink

    args = run_uplink.build_parser().parse_args(["--hook-never-forward", "Read, Glob,,"])
    assert run_uplink.config_from_args(args).hook_never_forward == ("Read", "Glob")
    default = run_uplink.config_from_args(run_uplink.build_parser().parse_args([]))
    assert "Read" in default.hook_never_forward and "Bash" not in default.hook_never_forward
