#!/usr/bin/env python3
"""Command-line entry point of the sled uplink (PROTOCOL.md §2).

    python run_uplink.py --upstream-gateway 'ws://gw:8080/api/sled-uplink?token=…'

Every option is checked before anything starts: a bad value exits 2 with one
line on stderr. With no gateway configured it logs that it is disabled and
exits 0. SIGINT/SIGTERM deny what is undecided, close the WebSocket (1001) and
exit 0; SIGHUP ends a back-off wait; SIGUSR1 logs every thread's traceback.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from protocol import ConfigError
from protocol.version import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_LISTEN = "127.0.0.1:3002"
_NO_LISTEN = ("", "off", "none")


# Options whose value is a secret, and the environment variables that hold one.
SECRET_OPTIONS = ("--ingress-token",)
SECRET_ENV = ("HUSKIES_UPSTREAM_TOKEN", "HUSKIES_UPLINK_INGRESS_TOKEN")
_UNRECOGNIZED = "unrecognized arguments: "


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), never a wall,
    and never shows a secret: argparse echoes what it did not understand, and
    a mistyped ``--upstream-gatway 'ws://h/?token=…'`` would print the token."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {self._safe(message)}\n")

    def _safe(self, message: str) -> str:
        from protocol import redact

        if message.startswith(_UNRECOGNIZED):
            message = _UNRECOGNIZED + self._unrecognized(message[len(_UNRECOGNIZED) :])
        for secret in self._secrets():
            # Case-blind: a value may come back changed (--log-level upper-cases it).
            message = re.sub(re.escape(secret), "***", message, flags=re.IGNORECASE)
        return redact(message)

    def _unrecognized(self, words: str) -> str:
        """Option names as typed (with a suggestion); every value as ``***``."""
        known = [s for action in self._actions for s in action.option_strings]
        shown, hints = [], []
        for word in words.split(" "):
            name, eq, _ = word.partition("=")
            if not (name.startswith("--") and name[2:3].isalpha()) and len(name) != 2:
                shown.append("***")  # a value: it may be a secret
                continue
            shown.append(name + ("=***" if eq else ""))
            hints += difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
        return " ".join(shown) + hint

    def _secrets(self) -> list[str]:
        argv = getattr(self, "_argv", [])
        found = [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
        for index, word in enumerate(argv):
            name, eq, value = word.partition("=")
            # A secret option, or an abbreviation argparse would accept for it.
            if len(name) > 2 and any(option.startswith(name) for option in SECRET_OPTIONS):
                if eq:
                    found.append(value)
                elif index + 1 < len(argv):
                    found.append(argv[index + 1])
        # Longest first, so a secret containing another is replaced whole.
        return sorted({f for f in found if f}, key=len, reverse=True)


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _multiplier(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _bytes(text: str) -> int:
    """A byte count: a whole number, optionally with a KiB/MiB/GiB suffix."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3}
    number, factor = text.strip().lower(), 1
    for suffix, size in units.items():
        if number.endswith(suffix):
            number, factor = number[: -len(suffix)].strip(), size
            break
    try:
        value = int(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count (e.g. 67108864 or 64MiB)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace and the newline dropped);
    ConfigError naming the file, never its content."""
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError("--token-file", f"cannot read {path}: {reason}") from None
    if not token:
        raise ConfigError("--token-file", f"{path} is empty")
    return token


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        # prog defaults to how it was invoked: run_uplink.py or sled-uplink.
        description="The sled's single outbound WebSocket to its upstream gateway.",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"%(prog)s {__version__}")
    add(
        "--upstream-gateway",
        metavar="URL",
        default=_env("HUSKIES_UPSTREAM_GATEWAY", ""),
        help="ws:// or wss:// URL of the gateway's /api/sled-uplink (may carry ?token=, "
        "but --token-file keeps it out of the process list); "
        "env HUSKIES_UPSTREAM_GATEWAY; unset disables the uplink",
    )
    add(
        "--token-file",
        metavar="PATH",
        default=None,
        help="file holding the gateway token, sent as the URL's ?token= (added, or replacing "
        "one in the URL); env HUSKIES_UPSTREAM_TOKEN holds the token itself; "
        "default: none (the URL's own ?token=, if any)",
    )
    add(
        "--project",
        metavar="NAME",
        default=_env("HUSKIES_PROJECT", Path.cwd().name or "sled"),
        help="name this sled identifies as (env HUSKIES_PROJECT; default: current directory name)",
    )
    add(
        "--local-mcp-url",
        metavar="URL",
        default=_env("HUSKIES_LOCAL_MCP_URL", "http://127.0.0.1:3001/mcp"),
        help="the sled's own MCP endpoint (env HUSKIES_LOCAL_MCP_URL)",
    )
    add(
        "--listen",
        metavar="HOST:PORT",
        default=_env("HUSKIES_UPLINK_LISTEN", DEFAULT_LISTEN),
        help="local HTTP ingress (env HUSKIES_UPLINK_LISTEN; 'off' disables it)",
    )
    add(
        "--ingress-token",
        metavar="TOKEN",
        default=_env("HUSKIES_UPLINK_INGRESS_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on every ingress endpoint but /healthz "
        "(env HUSKIES_UPLINK_INGRESS_TOKEN, preferred: argv is visible to other users; "
        "default: none, no token needed)",
    )
    add(
        "--ingress-allowed-host",
        metavar="HOST",
        action="append",
        default=[],
        help="also accept this Host header at the ingress (repeatable; default: localhost, "
        "127.0.0.1, [::1] and the --listen host; others get 421)",
    )
    add("--heartbeat-interval", metavar="S", type=_duration, default=10.0)
    add("--backoff-initial", metavar="S", type=_duration, default=1.0)
    add("--backoff-max", metavar="S", type=_duration, default=60.0)
    add("--backoff-multiplier", metavar="X", type=_multiplier, default=2.0)
    add("--backoff-reset-after", metavar="S", type=_duration, default=30.0)
    add("--permission-timeout", metavar="S", type=_duration, default=120.0)
    add("--max-pending", metavar="N", type=_count, default=10_000)
    add(
        "--max-pending-bytes",
        metavar="N",
        type=_bytes,
        default=64 * 1024 * 1024,
        help="deny a permission request at once when the undecided ones would hold more than "
        "this many bytes of tool input together (e.g. 64MiB; default: 64 MiB)",
    )
    add("--mcp-timeout", metavar="S", type=_duration, default=120.0)
    add("--mcp-concurrency", metavar="N", type=_count, default=16)
    add(
        "--mcp-max-bytes",
        metavar="N",
        type=_count,
        default=8 * 1024 * 1024,
        help="largest local MCP answer accepted (default 8 MiB)",
    )
    add(
        "--ping-interval",
        metavar="S",
        type=_duration,
        default=20.0,
        help="WebSocket keepalive ping interval",
    )
    add(
        "--ping-timeout",
        metavar="S",
        type=_duration,
        default=20.0,
        help="WebSocket keepalive: drop the session if no pong within this",
    )
    add(
        "--open-timeout",
        metavar="S",
        type=_duration,
        default=10.0,
        help="give up a connect/handshake after this",
    )
    add("--ca-file", metavar="PATH", default=None, help="extra CA certificate(s) for wss://")
    add(
        "--status-interval",
        metavar="S",
        type=_duration,
        default=60.0,
        help="how often to log the snapshot of every actor's state",
    )
    add(
        "--log-level",
        metavar="LEVEL",
        default="INFO",
        type=str.upper,
        choices=["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"],
    )
    add("--log-json", action="store_true", help="one JSON object per log line")
    add(
        "--claude-progress-interval",
        metavar="S",
        type=_duration,
        default=10.0,
        help="how often a waiting Claude Code permission prompt (/mcp) gets a progress note",
    )
    add(
        "--hook-never-forward",
        metavar="TOOLS",
        type=_tool_list,
        default=None,
        help="comma-separated tools whose PreToolUse hook is never forwarded (no decision); "
        "default: the read-only ones (Read,Glob,Grep,LS,NotebookRead,TodoWrite,BashOutput)",
    )
    return parser


def _never_forward(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    given = args.hook_never_forward
    return {} if given is None else {"hook_never_forward": given}


def _tool_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def config_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from actors.config import UplinkConfig

    listen = None if args.listen.strip().lower() in _NO_LISTEN else args.listen
    token = read_token_file(args.token_file) if args.token_file else _env("HUSKIES_UPSTREAM_TOKEN")
    return UplinkConfig(
        upstream_url=args.upstream_gateway,
        upstream_token=token,
        ingress_token=args.ingress_token,
        ingress_allowed_hosts=tuple(args.ingress_allowed_host),
        max_pending_bytes=args.max_pending_bytes,
        project=args.project,
        local_mcp_url=args.local_mcp_url,
        listen=listen,
        heartbeat_interval=args.heartbeat_interval,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
        backoff_multiplier=args.backoff_multiplier,
        backoff_reset_after=args.backoff_reset_after,
        permission_timeout=args.permission_timeout,
        max_pending=args.max_pending,
        mcp_timeout=args.mcp_timeout,
        mcp_concurrency=args.mcp_concurrency,
        mcp_max_response_bytes=args.mcp_max_bytes,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        open_timeout=args.open_timeout,
        ca_file=args.ca_file,
        status_interval=args.status_interval,
        claude_progress_interval=args.claude_progress_interval,
        **_never_forward(args),
    ).validate()


CLAUDE_COMMANDS = ("hook", "claude-config")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CLAUDE_COMMANDS:  # Claude Code's side: no uplink starts
        from sled_claude import main as claude_main

        return claude_main(argv, Path(sys.argv[0]).name or "run_uplink.py")
    parser = build_parser()
    args = parser.parse_args(argv)
    from actors.config import check_bindable

    try:
        config = config_from_args(args)
        if config.listen_address is not None:
            check_bindable(config.listen_address)
    except ConfigError as exc:
        parser.error(f"argument {exc.option}: {exc.problem}")

    from loguru import logger

    from actors.logsetup import configure_logging

    configure_logging(args.log_level, json_lines=args.log_json)
    log = logger.bind(actor="main")
    if not config.enabled:
        log.info("uplink disabled: no --upstream-gateway (or HUSKIES_UPSTREAM_GATEWAY) set")
        return EXIT_OK
    return _run(config, log)


def _run(config, log) -> int:  # type: ignore[no-untyped-def]
    import pykka.debug

    from actors.system import Uplink

    stop = threading.Event()
    uplink = Uplink(config)

    def on_stop_signal(signum: int, _frame: object) -> None:
        log.info("{} received: shutting down", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        uplink.reconnect()

    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)
    try:
        uplink.start()
    except ConfigError as exc:  # e.g. the ingress port was taken meanwhile
        from protocol import redact

        prog = Path(sys.argv[0]).name or "run_uplink.py"
        sys.stderr.write(redact(f"{prog}: error: argument {exc.option}: {exc.problem}\n"))
        return EXIT_USAGE
    try:
        while not stop.wait(0.5):
            pass
    finally:
        uplink.stop(timeout=4.0)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
