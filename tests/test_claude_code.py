"""The real Claude Code binary against the real uplink and the real reference gateway.

Each test runs ``claude -p`` (the pinned npm package, installed by
``scripts/install-claude-code.sh``) in a temporary working directory, fully
offline: the model is the scripted loopback stand-in
(``tests/support/fake_anthropic.py``), which asks for ``mkdir -p d1`` and then
ends. The uplink answers Claude Code's permission prompt through its MCP tool
(``/mcp`` on the ingress), its hook endpoint or the ``hook`` command; the
gateway decides through its library call (``gw.decide``) or, in one test, a
click in its web console in headless chromium. What the model was shown (the
``tool_result``) is read from the stand-in's record.

Without the binary (no npm) these tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors import Uplink
from protocol import DENY_MESSAGES, Reason
from sled_gateway import Gateway
from tests.conftest import closed_port
from tests.support import browser as browser_support
from tests.support.claude import (
    ROOT,
    SKIP_REASON,
    ClaudeRun,
    Decider,
    claude_available,
    claude_env,
    wait_until,
)
from tests.support.fake_anthropic import FakeAnthropic, result_text

if not claude_available():
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
RUN_TIMEOUT = 60 * FACTOR  # one claude -p run (about 2 s here)
PROJECT = "claude-sled"
MKDIR = ("Bash", {"command": "mkdir -p d1", "description": "Create the d1 directory"})
PROMPT_TOOL = "mcp__sled__permission_prompt"


def console_url(gw: Gateway) -> str:
    """The console URL with the operator token: opening it logs the browser in."""
    return gw.console_url()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway]) -> Gateway:
    return make_reference_gateway()


@pytest.fixture
def uplink_for(make_uplink: Callable[..., Uplink]) -> Callable[..., Uplink]:
    """``uplink_for(url, **config)`` → an uplink with its ingress on a free port."""

    def make(url: str, **overrides: Any) -> Uplink:
        overrides.setdefault("project", PROJECT)
        overrides.setdefault("claude_progress_interval", 0.5)
        return make_uplink(url, listen="127.0.0.1:0", **overrides)

    return make


@pytest.fixture
def connected(gw: Gateway, uplink_for: Callable[..., Uplink]) -> Callable[..., Uplink]:
    def make(**overrides: Any) -> Uplink:
        uplink = uplink_for(gw.url_for_sleds(), **overrides)
        assert uplink.wait_connected(T)
        return uplink

    return make


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def ingress_url(uplink: Uplink) -> str:
    return f"http://127.0.0.1:{uplink._ingress.port}"


def mcp_args(uplink: Uplink) -> list[str]:
    config = {"mcpServers": {"sled": {"type": "http", "url": ingress_url(uplink) + "/mcp"}}}
    return ["--mcp-config", json.dumps(config), "--permission-prompt-tool", PROMPT_TOOL]


def run_claude(
    model: FakeAnthropic,
    work: Path,
    args: list[str],
    *,
    timeout: float = RUN_TIMEOUT,
    background: bool = False,
) -> Any:
    run = ClaudeRun(
        ["-p", "Create the directory d1.", *args],
        cwd=work,
        env=claude_env(model.base_url, work.parent / "home"),
        timeout=timeout,
    )
    return run if background else run.result(timeout + 10)


def tool_result_texts(model: FakeAnthropic) -> list[tuple[bool, str]]:
    return [(bool(b.get("is_error")), result_text(b)) for b in model.tool_results()]


def decided(gw: Gateway) -> list[tuple[str, str]]:
    return [(d["req_id"], d["decision"]) for d in gw.state()["decisions"]]


# -- the MCP permission tool ------------------------------------------------------------


def test_approve_runs_the_command(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    uplink = connected()
    decider("approve")
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert result.returncode == 0, result.stderr
    assert (work / "d1").is_dir()
    # The gateway was asked once, under Claude Code's own tool_use_id.
    assert decided(gw) == [(model.tool_use_ids[0], "approve")]
    assert tool_result_texts(model) == [(False, "(Bash completed with no output)")]
    assert "Done." in result.stdout


def test_deny_runs_nothing_and_the_model_reads_the_gateways_message(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    uplink = connected()
    decider("deny")
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert result.returncode == 0, result.stderr
    assert not (work / "d1").exists()
    assert decided(gw) == [(model.tool_use_ids[0], "deny")]
    [(is_error, text)] = tool_result_texts(model)
    assert is_error
    assert DENY_MESSAGES[Reason.GATEWAY] in text


def test_always_allow_asks_once_for_two_identical_commands(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    uplink = connected()
    decider("always_allow")
    with FakeAnthropic([[MKDIR], [MKDIR], "Done."]) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert result.returncode == 0, result.stderr
    assert (work / "d1").is_dir()
    assert len(model.tool_use_ids) == 2
    # One permission request at the gateway: the session rule answered the second.
    assert decided(gw) == [(model.tool_use_ids[0], "always_allow")]
    assert [e for e, _ in tool_result_texts(model)] == [False, False]


def test_approve_asks_again_for_the_identical_second_command(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    # The control for always_allow: without its rule, both calls are asked.
    uplink = connected()
    decider("approve")
    with FakeAnthropic([[MKDIR], [MKDIR], "Done."]) as model:
        run_claude(model, work, mcp_args(uplink))
    assert sorted(decided(gw)) == sorted((i, "approve") for i in model.tool_use_ids)


def test_always_allow_for_a_file_remembers_that_file(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    uplink = connected()
    decider("always_allow")
    (work / "notes.txt").write_text("zero\n")  # an existing regular file
    target = str(work / "notes.txt")
    other = str(work / "other.txt")
    script = [
        [("Read", {"file_path": target})],  # Claude Code writes a file it has read, only
        [("Write", {"file_path": target, "content": "one\n"})],
        [("Write", {"file_path": target, "content": "two\n"})],
        [("Write", {"file_path": other, "content": "three\n"})],
        [("Write", {"file_path": other, "content": "four\n"})],
        "Done.",
    ]
    with FakeAnthropic(script) as model:
        run_claude(model, work, mcp_args(uplink))
    ids = model.tool_use_ids[1:]  # the writes (a Read in the working folder is not asked)
    # The existing file got a session rule: its second write is not asked. The new
    # file got none (a path rule names only an existing regular file), and the
    # gateway's rule covers only the exact input: its second write is asked.
    assert sorted(decided(gw)) == sorted(
        [(ids[0], "always_allow"), (ids[2], "always_allow"), (ids[3], "always_allow")]
    )
    assert (work / "notes.txt").read_text() == "two\n"
    assert (work / "other.txt").read_text() == "four\n"


def test_gateway_unreachable_denies_and_nothing_runs(
    uplink_for: Callable[..., Uplink], work: Path
) -> None:
    # Nothing listens at the gateway's address: the request waits for a
    # session that never comes, then the permission timeout denies it.
    uplink = uplink_for(
        f"ws://127.0.0.1:{closed_port()}/api/sled-uplink?token=x", permission_timeout=2.0
    )
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert result.returncode == 0, result.stderr
    assert not (work / "d1").exists()
    [(is_error, text)] = tool_result_texts(model)
    assert is_error
    assert DENY_MESSAGES[Reason.TIMEOUT] in text


def test_gateway_not_answering_in_time_denies_and_nothing_runs(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    uplink = connected(permission_timeout=2.0)
    watcher = decider(None)  # sees the request, never answers
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert not (work / "d1").exists()
    assert [item.req_id for item in watcher.seen] == model.tool_use_ids[:1]
    [(is_error, text)] = tool_result_texts(model)
    assert is_error
    assert DENY_MESSAGES[Reason.TIMEOUT] in text
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_an_answer_after_more_than_60_seconds_still_counts(
    gw: Gateway, connected: Callable[..., Uplink], decider: Callable[..., Decider], work: Path
) -> None:
    # Claude Code kills a plain JSON tool answer after 60 s; the SSE answer
    # with a progress note every second keeps the call alive until the click.
    uplink = connected(permission_timeout=150.0, claude_progress_interval=1.0)
    decider("approve", delay=65.0)
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        run = run_claude(model, work, mcp_args(uplink), timeout=150, background=True)
        result = run.result(170)
    assert result.returncode == 0, result.stderr
    assert run.elapsed > 65
    assert (work / "d1").is_dir()
    assert tool_result_texts(model) == [(False, "(Bash completed with no output)")]


# -- the console, clicked in chromium while claude waits --------------------------------


def test_an_approval_clicked_in_the_console_lets_claude_run_the_command(
    gw: Gateway, connected: Callable[..., Uplink], work: Path
) -> None:
    uplink = connected()
    with FakeAnthropic([[MKDIR], "Done."]) as model, browser_support.launch() as browser:
        page = browser.new_page()
        page.goto(console_url(gw))
        run = run_claude(model, work, mcp_args(uplink), background=True)
        req_id = wait_until(lambda: model.tool_use_ids[:1], 6 * T, "the tool use")[0]
        button = f'button[data-action="approve"][data-project="{PROJECT}"][data-req-id="{req_id}"]'
        page.wait_for_selector(button, timeout=int(6 * T * 1000))
        assert not run.done(), "claude must wait for the click"
        assert not (work / "d1").exists()
        page.click(button)
        result = run.result(RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert (work / "d1").is_dir()
    assert gw.state()["decisions"][0]["by"] == "console"


# -- hooks ------------------------------------------------------------------------------


def settings_file(work: Path, event: str, hook: dict[str, Any]) -> Path:
    path = work.parent / "settings.json"
    path.write_text(json.dumps({"hooks": {event: [{"matcher": "*", "hooks": [hook]}]}}))
    return path


def http_hook(uplink: Uplink) -> dict[str, Any]:
    return {"type": "http", "url": ingress_url(uplink) + "/hooks/claude-code", "timeout": 60}


def command_hook(ingress: str) -> dict[str, Any]:
    argv = [sys.executable, str(ROOT / "run_uplink.py"), "hook", "--ingress", ingress]
    command = shlex.join(argv)
    return {"type": "command", "command": command, "timeout": 60}


@pytest.mark.parametrize("kind", ["http", "command"])
def test_pretooluse_hook_approval_runs_the_command_and_reads_are_not_forwarded(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
    kind: str,
) -> None:
    uplink = connected()
    decider("approve")
    (work / "README").write_text("hello\n")
    hook = http_hook(uplink) if kind == "http" else command_hook(ingress_url(uplink))
    settings = settings_file(work, "PreToolUse", hook)
    script = [[("Read", {"file_path": str(work / "README")})], [MKDIR], "Done."]
    with FakeAnthropic(script) as model:
        # No permission-prompt tool and the default mode: under -p, Claude
        # Code would refuse mkdir on its own; the hook's allow lets it run.
        result = run_claude(model, work, ["--settings", str(settings)])
    assert result.returncode == 0, result.stderr
    assert (work / "d1").is_dir()
    # The Read (never forwarded) did not reach the gateway; the Bash call did.
    assert decided(gw) == [(model.tool_use_ids[1], "approve")]
    results = tool_result_texts(model)
    assert "hello" in results[0][1]
    assert results[1] == (False, "(Bash completed with no output)")


@pytest.mark.parametrize("kind", ["http", "command"])
def test_pretooluse_hook_deny_blocks_the_command_with_the_gateways_message(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
    kind: str,
) -> None:
    uplink = connected()
    decider("deny")
    hook = http_hook(uplink) if kind == "http" else command_hook(ingress_url(uplink))
    settings = settings_file(work, "PreToolUse", hook)
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        run_claude(model, work, ["--settings", str(settings), "--permission-mode", "acceptEdits"])
    assert not (work / "d1").exists()
    [(is_error, text)] = tool_result_texts(model)
    assert is_error
    assert DENY_MESSAGES[Reason.GATEWAY] in text


def test_command_hook_fails_closed_when_the_uplink_is_down(work: Path) -> None:
    # Even with an allow rule for the very command, the hook's deny stops it.
    settings = settings_file(work, "PreToolUse", command_hook(f"http://127.0.0.1:{closed_port()}"))
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        allow = ["--allowedTools", "Bash(mkdir -p d1)"]
        run_claude(model, work, ["--settings", str(settings), *allow])
    assert not (work / "d1").exists()
    [(is_error, text)] = tool_result_texts(model)
    assert is_error
    assert "the uplink could not be asked" in text


# -- the Agent SDK ----------------------------------------------------------------------


def _agent_sdk() -> Any:
    return pytest.importorskip(
        "claude_agent_sdk", reason="claude-agent-sdk is missing: install the test extra"
    )


async def _sdk_run(work: Path, model: FakeAnthropic, **options: Any) -> list[Any]:
    sdk = _agent_sdk()
    from tests.support.claude import CLAUDE

    env = claude_env(model.base_url, work.parent / "home")
    opts = sdk.ClaudeAgentOptions(
        cli_path=str(CLAUDE), cwd=str(work), env=env, setting_sources=[], **options
    )

    async def prompt() -> Any:
        yield {"type": "user", "message": {"role": "user", "content": "Create the directory d1."}}

    return [message async for message in sdk.query(prompt=prompt(), options=opts)]


@pytest.mark.parametrize("decision", ["approve", "deny", "always_allow"])
def test_agent_sdk_can_use_tool_asks_the_gateway(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
    decision: str,
) -> None:
    import asyncio

    from actors.agent_sdk import can_use_tool

    uplink = connected()
    decider(decision)
    with FakeAnthropic([[MKDIR], [MKDIR], "Done."]) as model:
        asyncio.run(
            asyncio.wait_for(_sdk_run(work, model, can_use_tool=can_use_tool(uplink)), RUN_TIMEOUT)
        )
    ids = model.tool_use_ids
    assert len(ids) == 2
    if decision == "deny":
        assert not (work / "d1").exists()
        assert all(DENY_MESSAGES[Reason.GATEWAY] in t for _, t in tool_result_texts(model))
        assert sorted(decided(gw)) == sorted((i, "deny") for i in ids)
    elif decision == "approve":
        assert (work / "d1").is_dir()
        assert sorted(decided(gw)) == sorted((i, "approve") for i in ids)
    else:  # the session rule answers the second call
        assert (work / "d1").is_dir()
        assert decided(gw) == [(ids[0], "always_allow")]


@pytest.mark.parametrize(
    ("kind", "decision"), [("http", "deny"), ("command", "deny"), ("http", "always_allow")]
)
def test_permission_request_hook_in_sdk_mode(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
    kind: str,
    decision: str,
) -> None:
    # PermissionRequest fires only where Claude Code would ask, which under
    # the SDK means a session with a can_use_tool callback. Claude Code asks
    # the hook and the callback at once and takes the first answer: the
    # callback here would allow, but only long after the hook has answered.
    import asyncio

    uplink = connected()
    decider(decision)
    hook = http_hook(uplink) if kind == "http" else command_hook(ingress_url(uplink))
    settings = settings_file(work, "PermissionRequest", hook)

    async def slow_fallback(_name: str, tool_input: dict[str, Any], _context: Any) -> Any:
        await asyncio.sleep(RUN_TIMEOUT)
        return _agent_sdk().PermissionResultAllow(updated_input=tool_input)

    with FakeAnthropic([[MKDIR], [MKDIR], "Done."]) as model:
        run = _sdk_run(work, model, settings=str(settings), can_use_tool=slow_fallback)
        asyncio.run(asyncio.wait_for(run, RUN_TIMEOUT))
    results = tool_result_texts(model)
    if decision == "deny":
        assert not (work / "d1").exists()
        assert [d for _, d in decided(gw)] == ["deny", "deny"]
        assert all(e and DENY_MESSAGES[Reason.GATEWAY] in t for e, t in results)
    else:  # one request: the hook's session rule answers the second call
        assert (work / "d1").is_dir()
        assert [d for _, d in decided(gw)] == ["always_allow"]
        assert [e for e, _ in results] == [False, False]


# -- an interactive session, driven in tmux ---------------------------------------------


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_permission_request_hook_in_an_interactive_session(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
    decision: str,
) -> None:
    import shutil
    import subprocess
    import time

    from tests.support.claude import CLAUDE

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux) for the interactive session")
    uplink = connected()
    decider(decision)
    settings = settings_file(work, "PermissionRequest", http_hook(uplink))
    home = work.parent / "home"
    # A first run's questions (onboarding, folder trust, the custom API key)
    # are answered in its config, as a person would have answered them once.
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / ".claude.json").write_text(
        json.dumps(
            {
                "hasCompletedOnboarding": True,
                "customApiKeyResponses": {"approved": ["sk-ant-test-dummy"], "rejected": []},
                "projects": {str(work): {"hasTrustDialogAccepted": True}},
            }
        )
    )
    session = f"sled-claude-{os.getpid()}-{decision}"
    with FakeAnthropic([[MKDIR], "Done."]) as model:
        env = claude_env(model.base_url, home, TERM="xterm-256color")
        command = shlex.join(
            [
                "env",
                "-i",
                *(f"{k}={v}" for k, v in env.items()),
                str(CLAUDE),
                "--settings",
                str(settings),
                "Create the directory d1.",
            ]
        )
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "40", "-c",
             str(work), command],
            check=True,
        )  # fmt: skip

        def screen() -> str:
            return subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session],
                capture_output=True, text=True, check=False,
            ).stdout  # fmt: skip

        try:
            wait_until(lambda: len(model.agent_requests()) >= 2, RUN_TIMEOUT, "the second turn")
            time.sleep(0.5)
            shown = screen()
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    print(shown)
    assert [d for _, d in decided(gw)] == [decision]
    if decision == "approve":
        assert (work / "d1").is_dir()
        assert "Allowed by PermissionRequest hook" in shown
    else:
        assert not (work / "d1").exists()
        [(is_error, text)] = tool_result_texts(model)
        assert is_error and DENY_MESSAGES[Reason.GATEWAY] in text
