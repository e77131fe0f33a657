"""``sled-gateway``: run the reference gateway (the upstream end of the sled uplink).

    python run_gateway.py --token s3cret                 # console at http://127.0.0.1:8080/
    python run_gateway.py --no-auth --auto approve       # a permissive test peer
    SLED_GATEWAY_TOKEN=s3cret python run_gateway.py --interactive --listen 0.0.0.0:8080

Sleds connect to ``ws://HOST:PORT/api/sled-uplink?token=TOKEN``. Permission
requests are answered by ``--auto``, the ``--interactive`` terminal prompt,
or the web console (always available). MCP clients reach a sled's tools at
``http://HOST:PORT/sleds/{project}/mcp``.

Exit status: 0 after SIGINT/SIGTERM, 2 for a bad option (one line on stderr,
no traceback), 1 if the server dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from loguru import logger

from gateway import Gateway
from gateway.config import positive_seconds
from gateway.interactive import TerminalPrompter
from gateway.logs import configure_cli_logging
from gateway.matrix import MatrixConfig, MatrixTransport
from gateway.matrix import config_from_options as matrix_config_from_options
from protocol import ConfigError, redact

TOKEN_ENV = "SLED_GATEWAY_TOKEN"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port); port 0 picks a free one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError("--listen", f"expected HOST:PORT, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(
            "--listen", f"put an IPv6 address in brackets, e.g. [::1]:8080, not {value!r}"
        )
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError("--listen", f"port must be 0-65535, not {port}")
    return host, port


def _seconds(option: str) -> Callable[[str], float]:
    """An argparse ``type`` for a duration option (finite, > 0)."""

    def convert(text: str) -> float:
        try:
            return positive_seconds(option, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sled-gateway",
        description="Reference gateway for sled uplinks: "
        "WebSocket endpoint, web console, MCP relay.",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address of the HTTP + WebSocket server (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"token sleds must present as ?token= (env {TOKEN_ENV}; "
        "prefer the env var: arguments show in ps)",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="accept sleds without a token (tests and demos only)"
    )
    parser.add_argument(
        "--auto",
        choices=("approve", "deny"),
        default=None,
        help="answer every permission request at once",
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="ask on this terminal: approve / deny / always, for each request",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_seconds("--heartbeat-interval"),
        default=10.0,
        metavar="S",
        help="sleds' heartbeat interval; stale after 3 missed (default 10)",
    )
    parser.add_argument(
        "--mcp-timeout",
        type=_seconds("--mcp-timeout"),
        default=30.0,
        metavar="S",
        help="how long an MCP relay waits for the sled (default 30)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="TRACE, DEBUG, INFO (default), WARNING, ERROR",
    )
    # Approve from a Matrix room (gateway/matrix.py; needs the "matrix" extra).
    matrix = parser.add_argument_group("Matrix transport (all five, or none)")
    matrix.add_argument("--matrix-homeserver", metavar="URL", help="e.g. https://matrix.org")
    matrix.add_argument("--matrix-user", metavar="@BOT:SERVER", help="the bot's user id")
    matrix.add_argument(
        "--matrix-password-file", metavar="PATH", help="a file holding the bot's password"
    )
    matrix.add_argument(
        "--matrix-access-token-file",
        metavar="PATH",
        help="a file holding the bot's access token (instead of a password)",
    )
    matrix.add_argument(
        "--matrix-room", metavar="ROOM", help="room id (!id) or alias (#name:server)"
    )
    matrix.add_argument(
        "--matrix-operators",
        metavar="@A:SERVER,...",
        help="who may answer from the room (comma-separated user ids)",
    )
    return parser


def resolve_matrix(args: argparse.Namespace) -> MatrixConfig | None:
    """The ``--matrix-*`` options → a config; :class:`ConfigError` if unusable."""
    if args.auto and args.matrix_homeserver is not None:
        # --auto answers before anyone could read the room.
        raise ConfigError("--matrix-homeserver", "cannot be combined with --auto")
    config = matrix_config_from_options(
        homeserver=args.matrix_homeserver,
        user=args.matrix_user,
        password_file=args.matrix_password_file,
        access_token_file=args.matrix_access_token_file,
        room=args.matrix_room,
        operators=args.matrix_operators,
    )
    if config is not None:
        try:
            import nio  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--matrix-homeserver", "needs matrix-nio: pip install 'sled-uplink[matrix]'"
            ) from None
    return config


def resolve(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """Cross-option checks → (host, port, token or None); :class:`ConfigError` if unusable."""
    host, port = parse_listen(args.listen)
    if args.no_auth and args.token is not None:
        raise ConfigError("--no-auth", "cannot be combined with --token")
    if args.auto and args.interactive:
        raise ConfigError("--interactive", "cannot be combined with --auto")
    if args.no_auth:
        return host, port, None
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError("--token", f"required (or set {TOKEN_ENV}, or pass --no-auth)")
    return host, port, token


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port, token = resolve(args)
        matrix_config = resolve_matrix(args)
    except ConfigError as exc:
        parser.error(str(exc))

    configure_cli_logging(args.log_level)
    gateway = Gateway(
        host=host,
        port=port,
        token=token,
        auto=args.auto,
        heartbeat_interval=args.heartbeat_interval,
        mcp_timeout=args.mcp_timeout,
    )
    try:
        gateway.start()
    except OSError as exc:
        parser.error(f"--listen: cannot listen on {args.listen}: {exc.strerror or exc}")

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("{} received; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if token is None:
        logger.warning("authentication is OFF (--no-auth): any client may connect as a sled")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "the web console, REST API and MCP relay need no token: "
            "anyone who can reach {} can answer permission requests",
            args.listen,
        )
    logger.info(
        "console: {}/   sleds connect to: {}", gateway.http_url, redact(gateway.url_for_sleds())
    )
    logger.info(
        "permission requests answered by: {}",
        f"auto-{args.auto}"
        if args.auto
        else "terminal prompt and web console"
        if args.interactive
        else "web console",
    )

    prompter = TerminalPrompter(gateway).start() if args.interactive else None
    bot = MatrixTransport(gateway, matrix_config).start() if matrix_config else None
    status = 0
    try:
        # A timed wait keeps the main thread responsive to signals and lets us
        # notice a server thread that died.
        while not stop.wait(0.5):
            if not gateway.running:
                logger.error("the gateway server stopped unexpectedly")
                status = 1
                break
    finally:
        if prompter is not None:
            prompter.stop()
        if bot is not None:
            bot.stop()
        gateway.stop(timeout=4.0)
    return status


if __name__ == "__main__":
    sys.exit(main())
