#!/usr/bin/env python3
"""Command-line entry point of the sled uplink (options: docs/command-line.md).

    python run_uplink.py --upstream-gateway 'ws://gw:8080/api/sled-uplink?token=…'
    python run_uplink.py --token-file tok --upstream-gateway ws://gw1:8080/api/sled-uplink \
        --upstream-gateway ws://gw2:8080/api/sled-uplink     # replicas: shuffled, next on failure

Every option is checked before anything starts: a bad value exits 2 with one
line on stderr. With no gateway configured it logs that it is disabled and
exits 0. SIGINT/SIGTERM deny what is undecided, close the WebSocket (1001) and
exit 0; SIGHUP ends a back-off wait; SIGUSR1 logs every thread's traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.cli import LOG_LEVEL_OPTION, OneLineParser, Option, any_path, field_options
from protocol import ConfigError
from protocol.version import __version__

if TYPE_CHECKING:
    from loguru import Logger

    # Imported where used: the hook subcommand (run on every tool call by
    # Claude Code) needs none of the uplink's configuration.
    from actors.config import UplinkConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

TOKEN_ENV = "HUSKIES_UPSTREAM_TOKEN"


#: The options of the command itself, beside UplinkConfig's fields: the
#: token file (read into ``upstream_token``) and the logging setup.
COMMAND_OPTIONS: dict[str, Option] = {
    "token_file": Option(
        "--token-file",
        "file holding the gateway token, sent as the URL's ?token= (added, or replacing "
        f"one in the URL); env {TOKEN_ENV} holds the token itself",
        rule=any_path,
        metavar="PATH",
        default=None,
        shown_default="none, the URL's own ?token= if any",
    ),
    "log_level": LOG_LEVEL_OPTION,
    "log_json": Option("--log-json", "one JSON object per log line", default=False, switch=True),
}


def all_options() -> list[tuple[str, Option]]:
    """(dest, Option) for every option of the command, in ``--help`` order."""
    from actors.config import UplinkConfig

    config = field_options(UplinkConfig)
    # The token file right after the gateway's URL, where a reader looks for it.
    return [config[0], ("token_file", COMMAND_OPTIONS["token_file"]), *config[1:]] + [
        (dest, spec) for dest, spec in COMMAND_OPTIONS.items() if dest != "token_file"
    ]


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


def build_parser() -> OneLineParser:
    """The command's parser, built from the options' declarations."""
    options = all_options()
    parser = OneLineParser(
        # prog defaults to how it was invoked: run_uplink.py or sled-uplink.
        description="The sled's single outbound WebSocket to its upstream gateway.",
        secret_options=[spec.flag for _, spec in options if spec.secret],
        # The environment's secrets too: a usage error may repeat a value read from it.
        secret_env=[TOKEN_ENV, *(spec.env for _, spec in options if spec.secret and spec.env)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for dest, spec in options:
        spec.add_to(parser, dest)
    return parser


def config_from_args(args: argparse.Namespace) -> UplinkConfig:
    """The parsed options → a validated :class:`UplinkConfig` (ConfigError if unusable)."""
    from actors.config import UplinkConfig

    values: dict[str, Any] = {}
    for dest, _ in field_options(UplinkConfig):
        if hasattr(args, dest):  # absent: the option was not given, the field's default holds
            value = getattr(args, dest)
            values[dest] = tuple(value) if isinstance(value, list) else value
    token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV)
    return UplinkConfig(**values, upstream_token=token or None).validate()


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
        parser.config_error(exc)

    from loguru import logger

    from actors.logsetup import configure_logging

    configure_logging(args.log_level, json_lines=args.log_json)
    log = logger.bind(actor="main")
    if not config.enabled:
        log.info("uplink disabled: no --upstream-gateway (or HUSKIES_UPSTREAM_GATEWAY) set")
        return EXIT_OK
    return _run(config, log)


def _run(config: UplinkConfig, log: Logger) -> int:
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
