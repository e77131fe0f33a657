"""The ``hook`` and ``claude-config`` subcommands of ``sled-uplink`` (Claude Code).

    sled-uplink hook --ingress http://127.0.0.1:3002      # a Claude Code command hook
    sled-uplink claude-config                              # what to give Claude Code

``hook`` reads one hook JSON (``PreToolUse`` or ``PermissionRequest``) on
stdin, asks the running uplink's ingress (``POST /hooks/claude-code``) and
prints the answer on stdout. Claude Code spawns it for every tool call, so it
imports only the standard library and ``protocol``. It fails closed: when the
uplink cannot be reached or answers badly, it prints a deny.

``claude-config`` prints the ``--mcp-config`` JSON, the hook settings and the
``claude`` command line for an uplink, with its ingress token when one is set.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from protocol.claude_code import HOOK_EVENTS, PROMPT_TOOL, SERVER_NAME, deny_answer, hook_answer

DEFAULT_INGRESS = "http://127.0.0.1:3002"
TOKEN_ENV = "HUSKIES_UPLINK_INGRESS_TOKEN"
MAX_INPUT = 1024 * 1024
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, not {text}")
    return value


def _ingress_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be an http:// URL, not {text!r}")
    return text.rstrip("/")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ingress",
        metavar="URL",
        type=_ingress_url,
        default=DEFAULT_INGRESS,
        help=f"the uplink's ingress (its --listen), default {DEFAULT_INGRESS}",
    )
    parser.add_argument(
        "--ingress-token",
        metavar="TOKEN",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"the ingress token, if the uplink has one (env {TOKEN_ENV})",
    )


# ── hook ────────────────────────────────────────────────────────────────


def _post(url: str, body: bytes, token: str | None, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url + "/hooks/claude-code")
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("POST", parts.path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(MAX_INPUT)
    finally:
        connection.close()


def _error_of(payload: bytes) -> str:
    try:
        error = json.loads(payload).get("error")
    except (ValueError, AttributeError):
        return ""
    return str(error)[:200] if error else ""


def run_hook(args: argparse.Namespace, stdin: Any = None, stdout: Any = None) -> int:
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    raw = stdin.read(MAX_INPUT + 1)
    try:
        event = json.loads(raw).get("hook_event_name")
    except (ValueError, AttributeError):
        event = None
    if len(raw) > MAX_INPUT or event not in HOOK_EVENTS:
        # Not an event this hook can answer in its own shape: exit 2 is Claude
        # Code's "blocking error" (the tool call or permission is refused).
        sys.stderr.write(
            "sled-uplink hook: expected one PreToolUse or PermissionRequest hook JSON on stdin\n"
        )
        return EXIT_USAGE
    try:
        status, payload = _post(args.ingress, raw, args.ingress_token, args.timeout)
    except (OSError, http.client.HTTPException) as exc:
        problem = f"the uplink at {args.ingress} cannot be reached: {type(exc).__name__}"
        return _deny(stdout, str(event), problem)
    if status != 200:
        detail = _error_of(payload)
        problem = f"the uplink answered HTTP {status}" + (f": {detail}" if detail else "")
        return _deny(stdout, str(event), problem)
    try:
        answer = json.loads(payload)
    except ValueError:
        return _deny(stdout, str(event), "the uplink's answer is not JSON")
    if answer == {}:  # no decision: Claude Code goes on as if there were no hook
        return 0
    if not isinstance(answer, dict) or "hookSpecificOutput" not in answer:
        return _deny(stdout, str(event), "the uplink's answer is not a hook answer")
    stdout.write(json.dumps(answer) + "\n")
    stdout.flush()
    return 0


def _deny(stdout: Any, event: str, problem: str) -> int:
    sys.stderr.write(f"sled-uplink hook: denying: {problem}\n")
    message = f"Denied: the uplink could not be asked ({problem})."
    stdout.write(json.dumps(hook_answer(event, deny_answer(message))) + "\n")
    stdout.flush()
    return 0


# ── claude-config ───────────────────────────────────────────────────────


def hook_command(ingress: str) -> str:
    """The command line Claude Code runs for a command hook (no token in argv:
    the hook reads it from the environment Claude Code passes on)."""
    script = Path(__file__).resolve().with_name("run_uplink.py")
    return shlex.join([sys.executable, str(script), "hook", "--ingress", ingress])


def claude_config(
    ingress: str,
    token: str | None,
    permission_timeout: float,
    hooks: str,
    event: str = "PreToolUse",
) -> dict[str, Any]:
    """Everything Claude Code needs to ask this uplink, as JSON values."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    server: dict[str, Any] = {"type": "http", "url": f"{ingress}/mcp"}
    if headers:
        server["headers"] = headers
    mcp_config = {"mcpServers": {SERVER_NAME: server}}
    # A hook must outlive the uplink's own permission timeout, or Claude Code
    # gives up first (an http hook's timeout is "no decision", not deny).
    timeout = math.ceil(permission_timeout) + 15
    hook: dict[str, Any]
    if hooks == "command":
        hook = {"type": "command", "command": hook_command(ingress), "timeout": timeout}
    else:
        hook = {"type": "http", "url": f"{ingress}/hooks/claude-code", "timeout": timeout}
        if headers:
            hook["headers"] = headers
    settings = {"hooks": {event: [{"matcher": "*", "hooks": [hook]}]}}
    mcp_json = json.dumps(mcp_config, separators=(",", ":"))
    return {
        "mcp_config": mcp_config,
        "permission_prompt_tool": PROMPT_TOOL,
        "command": shlex.join(
            ["claude", "--mcp-config", mcp_json, "--permission-prompt-tool", PROMPT_TOOL]
        ),
        "hook_settings": settings,
    }


def run_claude_config(args: argparse.Namespace) -> int:
    config = claude_config(
        args.ingress, args.ingress_token, args.permission_timeout, args.hooks, args.event
    )
    out = sys.stdout
    if args.print == "mcp":
        out.write(json.dumps(config["mcp_config"]) + "\n")
    elif args.print == "command":
        out.write(config["command"] + "\n")
    elif args.print == "settings":
        out.write(json.dumps(config["hook_settings"], indent=2) + "\n")
    else:
        out.write(
            "# Permission prompts through the uplink (MCP tool on the ingress):\n"
            f"{config['command']} -p 'your task'\n\n"
            "# Or hooks: put this in .claude/settings.json (PreToolUse asks for every\n"
            "# tool but the read-only ones; --event PermissionRequest asks only what\n"
            "# Claude Code would ask about, in interactive and SDK sessions):\n"
            f"{json.dumps(config['hook_settings'], indent=2)}\n"
        )
    return 0


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="Claude Code and the sled uplink.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    hook = commands.add_parser(
        "hook", help="answer one Claude Code hook JSON (stdin) through the uplink (stdout)"
    )
    _common(hook)
    hook.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=600.0,
        help="give up (and deny) after this long without an answer",
    )
    config = commands.add_parser(
        "claude-config", help="print the --mcp-config JSON, hook settings and claude command"
    )
    _common(config)
    config.add_argument(
        "--permission-timeout",
        metavar="S",
        type=_seconds,
        default=120.0,
        help="the uplink's --permission-timeout (hooks wait a little longer)",
    )
    config.add_argument("--hooks", choices=["http", "command"], default="http")
    config.add_argument("--event", choices=list(HOOK_EVENTS), default="PreToolUse")
    config.add_argument(
        "--print", choices=["all", "mcp", "command", "settings"], default="all", dest="print"
    )
    return parser


def main(argv: Sequence[str], prog: str = "sled-uplink") -> int:
    args = build_parser(prog).parse_args(list(argv))
    if args.command == "hook":
        return run_hook(args)
    return run_claude_config(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], Path(sys.argv[0]).name))
