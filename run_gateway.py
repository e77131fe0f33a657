"""``sled-gateway``: run the reference gateway (the upstream end of the sled uplink).

    python run_gateway.py --sled-tokens sleds.json       # prints the console URL with its token
    python run_gateway.py --no-auth --auto approve       # a test peer: sleds need no token
    SLED_GATEWAY_TOKEN=s3cret python run_gateway.py --interactive --listen 0.0.0.0:8080 \
        --allowed-host gw.example.com

Sleds connect to ``ws://HOST:PORT/api/sled-uplink?token=TOKEN`` with their own
token (``--sled-tokens``) or the one shared demo token (``--token``).
Permission requests are answered by ``--auto``, the ``--interactive``
terminal prompt, or the web console (always available); every decision is
kept in the audit log of ``--db`` (SQLite), with the always-allow and deny
rules. MCP clients reach a sled's tools at
``http://HOST:PORT/sleds/{project}/mcp``.

Operator authentication is always on: the console, the REST API and the MCP
relay need the operator token (``--operator-token`` / env
``SLED_GATEWAY_OPERATOR_TOKEN``, or one generated at start and printed once
in the console URL, as Jupyter does).

Exit status: 0 after SIGINT/SIGTERM, 2 for a bad option (one line on stderr,
no traceback), 1 if the server dies.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from loguru import logger

from actors.cli import OneLineParser, arg_type
from protocol import ConfigError, redact
from protocol.options import parse_listen, positive_int, positive_number, positive_seconds
from protocol.version import __version__
from sled_gateway import Gateway
from sled_gateway.config import load_sled_tokens
from sled_gateway.logs import configure_cli_logging
from sled_gateway.store import StoreError, default_db_path
from sled_gateway.transports.matrix import MatrixConfig, MatrixTransport
from sled_gateway.transports.matrix import config_from_options as matrix_config_from_options
from sled_gateway.transports.terminal import TerminalPrompter

TOKEN_ENV = "SLED_GATEWAY_TOKEN"
OPERATOR_TOKEN_ENV = "SLED_GATEWAY_OPERATOR_TOKEN"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def _days(option: str, value: str) -> float:
    return positive_number(option, value, "days")


def _seconds(option: str) -> Callable[[str], float]:
    return arg_type(option, positive_seconds)


def _count(option: str) -> Callable[[str], int]:
    return arg_type(option, positive_int)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="sled-gateway",
        secret_options=("--token", "--operator-token"),
        secret_env=(TOKEN_ENV, OPERATOR_TOKEN_ENV),
        description="Reference gateway for sled uplinks: "
        "WebSocket endpoint, web console, MCP relay. Operator authentication is "
        "always on (the console, REST API and MCP relay need the operator token); "
        "it has no TLS of its own: off loopback, put it behind a TLS proxy.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address of the HTTP + WebSocket server (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"the one shared sled token, for demos: any sled not in --sled-tokens may "
        f"present it as ?token= (env {TOKEN_ENV}; prefer the env var: arguments show in ps)",
    )
    parser.add_argument(
        "--sled-tokens",
        default=None,
        metavar="FILE",
        help='per-sled tokens, a JSON object {"<project>": "<token>", ...}: '
        "a token admits only its own project",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="accept sleds without a token (tests and demos only; "
        "the operator token is still required)",
    )
    parser.add_argument(
        "--operator-token",
        default=None,
        metavar="TOKEN",
        help=f"the operator's token for the console, REST API and MCP relay "
        f"(env {OPERATOR_TOKEN_ENV}; default: a new one, printed once in the console URL)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a Host name (or HOST:PORT) the gateway answers to, repeatable; always allowed: "
        "localhost, 127.0.0.1, [::1] and the --listen host (DNS-rebinding guard)",
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
        "--max-relays-per-sled",
        type=_count("--max-relays-per-sled"),
        default=8,
        metavar="N",
        help="MCP relays in flight to one sled; 503 beyond (default 8)",
    )
    parser.add_argument(
        "--max-pending-per-sled",
        type=_count("--max-pending-per-sled"),
        default=1000,
        metavar="N",
        help="pending permission requests of one sled; more are denied (default 1000)",
    )
    parser.add_argument(
        "--forget-disconnected-after",
        type=_seconds("--forget-disconnected-after"),
        default=3600.0,
        metavar="S",
        help="drop a disconnected sled from the state after this long (default 3600)",
    )
    parser.add_argument(
        "--identity-timeout",
        type=_seconds("--identity-timeout"),
        default=10.0,
        metavar="S",
        help="close (1008) a sled that sends no identity within this (default 10)",
    )
    parser.add_argument(
        "--header-timeout",
        type=_seconds("--header-timeout"),
        default=10.0,
        metavar="S",
        help="close an HTTP connection whose request head is not in within this; "
        "a body gets 3 times as long (408) (default 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=_count("--max-connections"),
        default=200,
        metavar="N",
        help="open connections; beyond, idle ones are closed first (default 200)",
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help="SQLite file for the audit log and rules (default "
        "$XDG_DATA_HOME/sled-gateway/gateway.db; ':memory:' keeps nothing)",
    )
    parser.add_argument(
        "--audit-retention-days",
        type=arg_type("--audit-retention-days", _days),
        default=None,
        metavar="N",
        help="delete audit rows older than N days (default: keep them all)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="TRACE, DEBUG, INFO (default), WARNING, ERROR",
    )
    # Approve from a Matrix room (sled_gateway/transports/matrix.py; needs the "matrix" extra).
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
    """Cross-option checks → (host, port, token or None); :class:`ConfigError` if unusable.

    Also reads ``--sled-tokens`` into ``args.sled_token_map`` and the operator
    token (option or environment) into ``args.operator_token``.
    """
    host, port = parse_listen("--listen", args.listen)
    if args.no_auth and args.token is not None:
        raise ConfigError("--no-auth", "cannot be combined with --token")
    if args.no_auth and args.sled_tokens is not None:
        raise ConfigError("--no-auth", "cannot be combined with --sled-tokens")
    if args.auto and args.interactive:
        raise ConfigError("--interactive", "cannot be combined with --auto")
    args.sled_token_map = load_sled_tokens(args.sled_tokens) if args.sled_tokens else {}
    if args.operator_token is None:
        args.operator_token = os.environ.get(OPERATOR_TOKEN_ENV) or None
    elif not args.operator_token:
        raise ConfigError("--operator-token", "must not be empty")
    for entry in args.allowed_host:
        if not entry.strip() or "/" in entry:
            raise ConfigError("--allowed-host", f"expected HOST or HOST:PORT, not {entry!r}")
    if args.no_auth:
        return host, port, None
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if not token and not args.sled_token_map:
        raise ConfigError(
            "--token", f"required (or set {TOKEN_ENV}, give --sled-tokens, or pass --no-auth)"
        )
    return host, port, token or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port, token = resolve(args)
        matrix_config = resolve_matrix(args)
    except ConfigError as exc:
        parser.config_error(exc)

    try:
        gateway = Gateway(
            host=host,
            port=port,
            token=token,
            auto=args.auto,
            heartbeat_interval=args.heartbeat_interval,
            mcp_timeout=args.mcp_timeout,
            operator_token=args.operator_token,
            allowed_hosts=args.allowed_host,
            sled_tokens=args.sled_token_map,
            max_relays_per_sled=args.max_relays_per_sled,
            max_pending_per_sled=args.max_pending_per_sled,
            forget_disconnected_after=args.forget_disconnected_after,
            identity_timeout=args.identity_timeout,
            header_timeout=args.header_timeout,
            max_connections=args.max_connections,
            db=args.db if args.db is not None else default_db_path(),
            audit_retention_days=args.audit_retention_days,
        )
    except ConfigError as exc:
        parser.config_error(exc)
    except ValueError as exc:  # an --allowed-host the Host parser refuses
        parser.config_error(ConfigError("--allowed-host", str(exc)))
    configure_cli_logging(args.log_level)
    try:
        gateway.start()
    except OSError as exc:
        parser.config_error(
            ConfigError("--listen", f"cannot listen on {args.listen}: {exc.strerror or exc}")
        )
    except StoreError as exc:
        parser.config_error(ConfigError("--db", str(exc)))

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("{} received; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if token is None and not args.sled_token_map:
        logger.warning("sled authentication is OFF (--no-auth): any client may connect as a sled")
    if host in ("", "0.0.0.0", "::") and not args.allowed_host:
        logger.warning(
            "listening on every interface, but only loopback names are allowed as Host: "
            "add --allowed-host with the name or address clients use (others get 421)"
        )
    if args.sled_tokens:
        with contextlib.suppress(OSError):
            if os.stat(args.sled_tokens).st_mode & 0o077:
                logger.warning(
                    "--sled-tokens {}: readable by other users; chmod 600 it", args.sled_tokens
                )
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on {} without TLS: the operator token and every decision cross the "
            "network in clear; put the gateway behind a TLS proxy",
            args.listen,
        )
    logger.info(
        "console: {}/   sleds connect to: {}   allowed hosts: {}",
        gateway.http_url,
        redact(gateway.url_for_sleds())
        + ("" if token is not None or not args.sled_token_map else "?token=<its own token>"),
        ", ".join(gateway.allowed_hosts),
    )
    if args.operator_token is None:
        # Printed, not logged: a log file or a JSON sink must not keep it.
        print(
            f"\n    Open the console (operator token included; shown only this once):\n"
            f"        {gateway.console_url()}\n"
            f"    API and MCP clients send: Authorization: Bearer <the token>\n",
            file=sys.stderr,
            flush=True,
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
