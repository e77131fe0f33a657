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

Every option is declared once: on ``GatewayConfig``'s fields
(:mod:`sled_gateway.config`), in :data:`COMMAND_OPTIONS` here, or in
``MATRIX_OPTIONS`` (:mod:`sled_gateway.transports.matrix`); the parser, ``--help`` and
docs/command-line.md are built from them. The terminal prompt and the Matrix
bot are registered on the :class:`Gateway`, which starts them after its HTTP
server and stops them first (:mod:`sled_gateway.lifecycle`): this file stops
nothing by hand.

SIGTERM drains first (``/readyz`` turns 503, the sleds are closed spread
over ``--drain-seconds`` with 1012 and ``retry_after``); a second signal
stops at once.

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
import time
from typing import Any, cast

from loguru import logger

from actors.cli import LOG_LEVEL_OPTION, OneLineParser, Option, any_path, field_options
from protocol import ConfigError, redact
from protocol.options import parse_listen
from protocol.version import __version__
from sled_gateway import Gateway
from sled_gateway.access import AccessError, load_access
from sled_gateway.bus import BusError
from sled_gateway.config import TOKEN_ENV, GatewayConfig, load_sled_tokens
from sled_gateway.events import SledDown, SledUp
from sled_gateway.logs import configure_cli_logging
from sled_gateway.memory import FleetFreezer, return_big_blocks, tune_collector
from sled_gateway.store import StoreError, default_db_path
from sled_gateway.transports.matrix import MATRIX_OPTIONS, MatrixConfig, MatrixTransport
from sled_gateway.transports.matrix import config_from_options as matrix_config_from_options
from sled_gateway.transports.terminal import TerminalPrompter

DEFAULT_LISTEN = "127.0.0.1:8080"


def _listen(option: str, value: str) -> str:
    parse_listen(option, value)
    return value


#: The command's options that are not one of GatewayConfig's fields: the
#: address (→ ``host`` and ``port``), the sled tokens' file (→ ``sled_tokens``),
#: the switches that choose who answers, and the logging.
COMMAND_OPTIONS: dict[str, Option] = {
    "listen": Option(
        "--listen",
        "address of the HTTP + WebSocket server",
        rule=_listen,
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
    ),
    "sled_tokens_file": Option(
        "--sled-tokens",
        'per-sled tokens, a JSON object {"<project>": "<token>", ...}: '
        "a token admits only its own project",
        rule=any_path,
        metavar="FILE",
        default=None,
    ),
    "access_file": Option(
        "--access",
        "people's roles per project, quorums and Matrix ids, a TOML file (docs/people.md)",
        rule=any_path,
        metavar="FILE",
        default=None,
    ),
    "no_auth": Option(
        "--no-auth",
        "accept sleds without a token (tests and demos only; the operator token is still required)",
        default=False,
        switch=True,
    ),
    "interactive": Option(
        "--interactive",
        "ask on this terminal: approve / deny / always, for each request",
        default=False,
        switch=True,
    ),
    "log_level": LOG_LEVEL_OPTION,
}

MATRIX_GROUP = "Matrix transport (all five, or none)"


def all_options() -> list[tuple[str, Option]]:
    """(dest, Option) for every option of the command but Matrix's, in ``--help`` order."""
    command = list(COMMAND_OPTIONS.items())
    return command[:-1] + field_options(GatewayConfig) + command[-1:]


def matrix_options() -> list[tuple[str, Option]]:
    """(dest, Option) of the ``--matrix-*`` options (dest: ``matrix_<parameter>``)."""
    return [(f"matrix_{name}", spec) for name, spec in MATRIX_OPTIONS.items()]


def build_parser() -> OneLineParser:
    """The command's parser, built from the options' declarations."""
    options = all_options()
    parser = OneLineParser(
        prog="sled-gateway",
        secret_options=[spec.flag for _, spec in options if spec.secret],
        secret_env=[spec.env for _, spec in options if spec.secret and spec.env],
        description="Reference gateway for sled uplinks: "
        "WebSocket endpoint, web console, MCP relay. Operator authentication is "
        "always on (the console, REST API and MCP relay need the operator token); "
        "it has no TLS of its own: off loopback, put it behind a TLS proxy.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for dest, spec in options:
        spec.add_to(parser, dest)
    # The shared sled token's variable is read after the cross-checks, so
    # that --no-auth ignores it rather than clashing with it.
    parser.set_defaults(token=None)
    # Approve from a Matrix room (sled_gateway/transports/matrix.py; needs the "matrix" extra).
    group = parser.add_argument_group(MATRIX_GROUP)
    for dest, spec in matrix_options():
        # An argument group has add_argument, which is all add_to calls.
        spec.add_to(cast(argparse.ArgumentParser, group), dest)
        parser.option_strings.append(spec.flag)  # for "did you mean"
    return parser


def resolve_matrix(args: argparse.Namespace) -> MatrixConfig | None:
    """The ``--matrix-*`` options → a config; :class:`ConfigError` if unusable."""
    if args.auto and args.matrix_homeserver is not None:
        # --auto answers before anyone could read the room.
        raise ConfigError("--matrix-homeserver", "cannot be combined with --auto")
    config = matrix_config_from_options(
        **{name: getattr(args, f"matrix_{name}") for name in MATRIX_OPTIONS},
        people=args.access_file is not None,
    )
    if config is not None:
        try:
            import nio  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--matrix-homeserver", "needs matrix-nio: pip install 'sled-uplink[matrix]'"
            ) from None
    return config


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The parsed options → a :class:`GatewayConfig`; :class:`ConfigError` if unusable.

    The checks across options come first, then the ``--sled-tokens`` file is
    read and the config made (which applies each field's rule again).
    """
    if args.no_auth and args.token is not None:
        raise ConfigError("--no-auth", "cannot be combined with --token")
    if args.no_auth and args.sled_tokens_file is not None:
        raise ConfigError("--no-auth", "cannot be combined with --sled-tokens")
    if args.auto and args.interactive:
        raise ConfigError("--interactive", "cannot be combined with --auto")
    values: dict[str, Any] = {}
    for dest, _ in field_options(GatewayConfig):
        if getattr(args, dest, None) is not None:  # absent or None: the field's default
            value = getattr(args, dest)
            values[dest] = tuple(value) if isinstance(value, list) else value
    values["host"], values["port"] = parse_listen("--listen", args.listen)
    if args.sled_tokens_file:
        values["sled_tokens"] = load_sled_tokens(args.sled_tokens_file)
    if args.access_file:
        try:
            values["access"] = load_access(args.access_file)
        except AccessError as exc:
            raise ConfigError("--access", str(exc)) from None
    if args.db is None:
        values["db"] = default_db_path()
    if not args.no_auth:
        token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
        if not token and not values.get("sled_tokens"):
            raise ConfigError(
                "--token", f"required (or set {TOKEN_ENV}, give --sled-tokens, or pass --no-auth)"
            )
        if token:
            values["token"] = token
    return GatewayConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        matrix_config = resolve_matrix(args)
        gateway = Gateway(config)
    except ConfigError as exc:
        parser.config_error(exc)
    configure_cli_logging(args.log_level)
    return_big_blocks()  # a flood of big inputs must not leave the process big
    freezer = FleetFreezer()  # the sleds' objects, frozen as the fleet grows (memory.py)
    gateway.events.subscribe(SledUp, freezer.sled_up)
    gateway.events.subscribe(SledDown, freezer.sled_down)
    if args.interactive:
        gateway.add_transport(TerminalPrompter(gateway), "terminal")
    if matrix_config is not None:
        gateway.add_transport(MatrixTransport(gateway, matrix_config), "matrix")
    # Installed before the server starts: a signal that arrives as soon as the port
    # answers must still drain and stop cleanly, not kill the process mid-start.
    stop = threading.Event()
    drain = threading.Event()  # SIGTERM: drain before stopping
    hurry = threading.Event()  # a second signal: stop now

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            logger.info("{} received again; stopping now", signal.Signals(signum).name)
            hurry.set()
            return
        if signum == signal.SIGTERM:
            logger.info("SIGTERM received; draining, then stopping")
            drain.set()
        else:
            logger.info("{} received; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        gateway.start()
    except OSError as exc:
        parser.config_error(
            ConfigError("--listen", f"cannot listen on {args.listen}: {exc.strerror or exc}")
        )
    except StoreError as exc:
        parser.config_error(ConfigError("--db", str(exc)))
    except BusError as exc:
        parser.config_error(ConfigError("--bus", str(exc)))

    # Start-up is done (store open, routes built, imports made): what exists now lives
    # until exit, and no collection needs to walk it again (sled_gateway/memory.py).
    tune_collector()
    _announce(gateway, args)
    status = 0
    try:
        # A timed wait keeps the main thread responsive to signals and lets us
        # notice a server thread that died.
        while not stop.wait(0.5):
            freezer.tick()
            if not gateway.running:
                logger.error("the gateway server stopped unexpectedly")
                status = 1
                break
        if drain.is_set() and gateway.running:
            drained = gateway.drain()
            # Bounded: a loop that died meanwhile would never finish the drain.
            deadline = time.monotonic() + config.drain_seconds + 10
            while not drained.done() and not hurry.wait(0.2):
                if time.monotonic() > deadline or not gateway.running:
                    logger.error("the drain did not finish; stopping")
                    break
    finally:
        # The transports first, then the gateway's parts; a replica's release of its
        # lease (at most a few seconds against a slow database) fits in half of it.
        gateway.stop(timeout=10.0)
    return status


def _announce(gateway: Gateway, args: argparse.Namespace) -> None:
    """Log where the gateway is and what is risky about how it runs; print a new token."""
    config = gateway.config
    if config.token is None and not config.sled_tokens:
        logger.warning("sled authentication is OFF (--no-auth): any client may connect as a sled")
    if config.host in ("", "0.0.0.0", "::") and not config.allowed_hosts:
        logger.warning(
            "listening on every interface, but only loopback names are allowed as Host: "
            "add --allowed-host with the name or address clients use (others get 421)"
        )
    for flag, secret_file in (
        ("--sled-tokens", args.sled_tokens_file),
        ("--oidc-client-secret-file", config.oidc_client_secret_file),
    ):
        if secret_file:
            with contextlib.suppress(OSError):
                if os.stat(secret_file).st_mode & 0o077:
                    logger.warning(
                        "{} {}: readable by other users; chmod 600 it", flag, secret_file
                    )
    if config.oidc_issuer is not None:
        logger.info("people sign in at /login with {}", config.oidc_issuer)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on {} without TLS: the operator token and every decision cross the "
            "network in clear; put the gateway behind a TLS proxy",
            args.listen,
        )
    logger.info(
        "console: {}/   sleds connect to: {}   allowed hosts: {}",
        gateway.http_url,
        redact(gateway.url_for_sleds())
        + ("" if config.token is not None or not config.sled_tokens else "?token=<its own token>"),
        ", ".join(gateway.allowed_hosts),
    )
    if getattr(args, "operator_token", None) is None:  # generated
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
        f"auto-{config.auto.value}"
        if config.auto
        else "terminal prompt and web console"
        if args.interactive
        else "web console",
    )


if __name__ == "__main__":
    sys.exit(main())
