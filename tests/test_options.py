"""One source of configuration: the options' declarations, their rules and their help.

The uplink's options are declared once, on ``UplinkConfig``'s fields (and a
few of the command's own), the gateway's on ``GatewayConfig``'s (and
``run_gateway.COMMAND_OPTIONS``, ``sled_gateway.transports.matrix.MATRIX_OPTIONS``); each
command's parser, ``--help``, the config's checks and docs/command-line.md
all come from them, and both commands share the value rules of
``protocol.options``. These tests hold each of those to the
declarations, and the declarations to a few literal expectations, so that
none of them can pass by being empty.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import run_gateway
import run_uplink
from actors.cli import OPTION, Option, field_options
from actors.config import UplinkConfig
from protocol import ConfigError, Decision
from protocol.options import (
    byte_size,
    format_bytes,
    parse_listen,
    positive_int,
    positive_seconds,
)
from sled_gateway import Gateway, GatewayConfig
from sled_gateway.transports.matrix import MATRIX_OPTIONS, config_from_options

ROOT = Path(__file__).resolve().parents[1]
T = 30


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HUSKIES_", "SLED_GATEWAY_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env={**clean, "COLUMNS": "2000", **env},
        capture_output=True,
        text=True,
        timeout=T,
        check=False,
    )


# ── the shared value rules ──────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:3002", ("127.0.0.1", 3002)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen_accepts(text: str, address: tuple[str, int]) -> None:
    assert parse_listen("--listen", text) == address


@pytest.mark.parametrize(
    "text",
    ["nope", "127.0.0.1", "127.0.0.1:", ":80", "h:99999", "h:-1", "h:8o", "::1:80", "[]:80",
     "[host]:80", "a/b:80", "[::1:80"],
)  # fmt: skip
def test_parse_listen_refuses_naming_the_option_and_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_listen("--listen", text)
    assert raised.value.option == "--listen"
    assert repr(text) in raised.value.problem


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "abc", "", 0, -0.5, math.nan])
def test_positive_seconds_refuses(value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        positive_seconds("--x", value)
    assert raised.value.problem.startswith("expected a number of seconds greater than 0, not ")


def test_positive_seconds_and_int_accept() -> None:
    assert positive_seconds("--x", "0.25") == 0.25
    assert positive_seconds("--x", 3) == 3.0
    assert positive_int("--n", "7") == 7
    assert positive_int("--n", 7.0) == 7
    for bad in ("0", "1.5", "x", 1.5, True, -3):
        with pytest.raises(ConfigError, match="expected a whole number of at least 1"):
            positive_int("--n", bad)


@pytest.mark.parametrize(
    ("text", "count"),
    [("1", 1), ("65536", 65536), ("64MiB", 64 << 20), ("64 mib", 64 << 20), ("2k", 2048),
     ("1GiB", 1 << 30), ("3M", 3 << 20)],
)  # fmt: skip
def test_byte_size_reads_suffixes_and_round_trips(text: str, count: int) -> None:
    assert byte_size("--b", text) == count
    assert byte_size("--b", format_bytes(count)) == count


@pytest.mark.parametrize("text", ["0", "-1", "1.5MiB", "MiB", "64TB", "x"])
def test_byte_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"not {text!r}")):
        byte_size("--b", text)


# ── the library and the command agree ───────────────────────────────────────

# A bad command-line text for each declared rule, and the same value typed.
BAD = {
    "upstream_url": ("ftp://h/x", "ftp://h/x"),
    "project": (" ", " "),
    "local_mcp_url": ("ftp://h/mcp", "ftp://h/mcp"),
    "listen": ("::1:80", "::1:80"),
    "heartbeat_interval": ("0", 0.0),
    "backoff_initial": ("nan", math.nan),
    "backoff_max": ("-1", -1.0),
    "backoff_multiplier": ("0.5", 0.5),
    "backoff_reset_after": ("inf", math.inf),
    "permission_timeout": ("0", 0),
    "max_pending": ("0", 0),
    "mcp_timeout": ("-2", -2.0),
    "mcp_concurrency": ("1.5", 1.5),
    "mcp_max_response_bytes": ("0", 0),
    "ping_interval": ("0", 0.0),
    "ping_timeout": ("0", 0.0),
    "open_timeout": ("0", 0.0),
    "ca_file": ("/nonexistent/ca.pem", "/nonexistent/ca.pem"),
    "status_interval": ("0", 0.0),
    "ingress_token": (" ", " "),
    "ingress_allowed_hosts": ("a/b", ("a/b",)),
    "max_pending_bytes": ("0", 0),
    "ingress_header_timeout": ("0", 0.0),
    "ingress_request_timeout": ("-1", -1.0),
    "ingress_max_connections": ("0", 0),
    "ingress_max_connections_per_client": ("many", 1.5),
    "claude_progress_interval": ("0", 0.0),
    "hook_never_forward": (None, ("Read", 7)),
    "owner": ("not an email", "not an email"),
}


def test_every_declared_option_has_a_bad_value_here() -> None:
    declared = {name for name, _ in field_options(UplinkConfig)}
    assert declared == set(BAD)
    assert len(declared) >= 20  # the declarations are really there


def _cli_error(capsys: pytest.CaptureFixture[str], flag: str, text: str) -> str:
    with pytest.raises(SystemExit) as exited:
        run_uplink.config_from_args(run_uplink.build_parser().parse_args([flag, text]))
    assert exited.value.code == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1, line
    return line.split(": error: ", 1)[1].rstrip("\n")


@pytest.mark.parametrize("name", sorted(BAD))
def test_library_and_command_refuse_the_same_value_in_the_same_words(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HUSKIES_UPLINK_LISTEN", "HUSKIES_PROJECT", "HUSKIES_UPSTREAM_GATEWAY"):
        monkeypatch.delenv(var, raising=False)
    spec: Option = next(f.metadata[OPTION] for f in fields(UplinkConfig) if f.name == name)
    text, typed = BAD[name]
    with pytest.raises(ConfigError) as raised:
        UplinkConfig(**{name: typed}).validate()
    assert raised.value.option == spec.flag
    if text is None:
        return
    line = _cli_error(capsys, spec.flag, text)
    assert line.startswith(f"argument {spec.flag}: ")
    # The same rule gave both: the same words, up to how the value is shown.
    assert (
        line.split(", not ")[0]
        == f"argument {spec.flag}: {raised.value.problem}".split(", not ")[0]
    )


def test_the_messages_read_as_declared(capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("--heartbeat-interval", "soon"): "argument --heartbeat-interval: expected a number of "
        "seconds greater than 0, not 'soon'",
        ("--max-pending", "many"): "argument --max-pending: expected a whole number of at least 1, "
        "not 'many'",
        ("--max-pending-bytes", "lots"): "argument --max-pending-bytes: expected a byte count of "
        "at least 1 (e.g. 65536 or 64MiB), not 'lots'",
        ("--backoff-multiplier", "0.5"): "argument --backoff-multiplier: expected a number of at "
        "least 1, not '0.5'",
        ("--log-level", "loud"): "argument --log-level: expected one of TRACE, DEBUG, INFO, "
        "SUCCESS, WARNING, ERROR, CRITICAL, not 'loud'",
    }
    for (flag, text), message in cases.items():
        assert _cli_error(capsys, flag, text) == message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--listen", "::1:80"],
            "argument --listen: expected HOST:PORT (an IPv6 address in brackets, "
            "e.g. [::1]:8080), not '::1:80'",
        ),
        (
            ["--heartbeat-interval", "0"],
            "argument --heartbeat-interval: expected a number of seconds greater than 0, not '0'",
        ),
        (
            ["--mcp-timeout", "nan"],
            "argument --mcp-timeout: expected a number of seconds greater than 0, not 'nan'",
        ),
    ],
    ids=["listen-ipv6", "duration-0", "duration-nan"],
)
def test_both_commands_refuse_a_value_in_the_same_words(args: list[str], message: str) -> None:
    uplink = _run("run_uplink.py", *args)
    gateway = _run("run_gateway.py", "--no-auth", *args)
    assert (uplink.returncode, gateway.returncode) == (2, 2)
    assert uplink.stderr == f"run_uplink.py: error: {message}\n"
    assert gateway.stderr == f"sled-gateway: error: {message}\n"


def test_the_gateway_hides_its_tokens_in_a_usage_error() -> None:
    secret = "gw-s3cret-7f2a9c"
    for args in (["--tokn", secret], ["--token", secret, "--max-connections", secret]):
        result = _run("run_gateway.py", *args)
        assert result.returncode == 2
        assert secret not in result.stderr
        assert result.stderr.startswith("sled-gateway: error: ")
    result = _run("run_gateway.py", "--log-level", secret, SLED_GATEWAY_OPERATOR_TOKEN=secret)
    assert result.returncode == 2
    assert secret.lower() not in result.stderr.lower()


# ── --help and the page ─────────────────────────────────────────────────────


def _help_lines() -> dict[str, str]:
    """``--help``'s text of each option, on one line.

    COLUMNS is wide, so no help wraps; a long option name still puts its
    help on the next line, which is joined back.
    """
    result = _run("run_uplink.py", "--help")
    assert result.returncode == 0, result.stderr
    lines: dict[str, str] = {}
    flag = None
    for line in result.stdout.splitlines():
        match = re.match(r"  (?:-h, )?(--[a-z-]+)", line)
        if match:
            flag = match.group(1)
            lines[flag] = line
        elif flag and line.startswith("      "):
            lines[flag] += "  " + line.strip()
        else:
            flag = None
    return lines


def test_every_option_in_help_shows_its_default_and_variable() -> None:
    lines = _help_lines()
    declared = run_uplink.all_options()
    assert {spec.flag for _, spec in declared} | {"--help", "--version"} == set(lines)
    for _, spec in declared:
        line = lines[spec.flag]
        tail = f"(default: {spec.default_text()}"
        tail += f"; env: {spec.env})" if spec.env else ")"
        assert line.endswith(tail), line
        assert spec.help in line
    # Read literally too, so an empty or wrong declaration cannot pass.
    literal = {
        "--heartbeat-interval": "  --heartbeat-interval S  seconds between heartbeats "
        "(default: 10)",
        "--listen": "  --listen HOST:PORT  local HTTP ingress; 'off' disables it "
        "(default: 127.0.0.1:3002; env: HUSKIES_UPLINK_LISTEN)",
        "--max-pending-bytes": "(default: 64MiB)",
        "--mcp-max-bytes": "(default: 8MiB)",
        "--backoff-multiplier": "(default: 2)",
        "--log-level": "(default: INFO)",
        "--log-json": "(default: off)",
        "--ingress-token": "; env: HUSKIES_UPLINK_INGRESS_TOKEN)",
        "--project": "(default: the current directory's name; env: HUSKIES_PROJECT)",
    }
    for flag, text in literal.items():
        line = re.sub(r"\s{2,}", "  ", lines[flag])
        assert text in line or line.endswith(text), line
    assert len(declared) >= 27


def test_the_help_defaults_are_the_defaults_that_apply() -> None:
    config = run_uplink.config_from_args(run_uplink.build_parser().parse_args([]))
    for name, spec in field_options(UplinkConfig):
        if spec.shown_default is None:
            assert (
                spec.default_text()
                == Option(
                    spec.flag, "", rule=spec.rule, default=getattr(config, name)
                ).default_text()
            ), name


def test_an_environment_variable_is_read_and_the_option_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HUSKIES_PROJECT", "from-env")
    monkeypatch.setenv("HUSKIES_UPLINK_LISTEN", "off")
    parse = run_uplink.build_parser().parse_args
    config = run_uplink.config_from_args(parse([]))
    assert (config.project, config.listen) == ("from-env", None)
    config = run_uplink.config_from_args(parse(["--project", "opt", "--listen", "[::1]:0"]))
    assert (config.project, config.listen_address) == ("opt", ("::1", 0))


def test_the_command_line_page_lists_every_option_as_declared() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-cli-docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=T,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = (ROOT / "docs" / "command-line.md").read_text("utf-8")
    for _, spec in run_uplink.all_options():
        assert f"| `{spec.flag}" in page, spec.flag
    assert "| `--listen HOST:PORT` | `HUSKIES_UPLINK_LISTEN` | 127.0.0.1:3002 |" in page


# ── the gateway's declarations ──────────────────────────────────────────────

# A bad command-line text for each of GatewayConfig's options, and the same value typed.
GATEWAY_BAD = {
    "operator_token": ("", ""),
    "token": ("", ""),
    "allowed_hosts": ("a/b", ("a/b",)),
    "auto": ("maybe", "always_allow"),
    "heartbeat_interval": ("0", 0.0),
    "drain_seconds": ("-1", -1.0),
    "lease_seconds": ("0", 0.0),
    "sweep_interval": ("never", math.inf),
    "mcp_timeout": ("nan", math.nan),
    "max_relays_per_sled": ("0", 0),
    "bus": ("http://127.0.0.1:4222", "nats://"),
    "max_pending_per_sled": ("many", 1.5),
    "max_input_bytes": ("0", 0),
    "max_pending_bytes_per_sled": ("lots", -1),
    "max_pending_bytes": ("1.5MiB", 0),
    "max_frame_bytes": ("x", 0),
    "forget_disconnected_after": ("inf", math.inf),
    "identity_timeout": ("-1", -1.0),
    "header_timeout": ("soon", 0),
    "max_connections": ("-3", -3),
    "request_timeout": ("0", 0),
    "max_connections_per_client": ("0", 0),
    "trusted_proxy": ("10.0.0.5/8", "10.0.0.5/8"),
    "db": ("", ""),
    "audit_retention_days": ("-1", -1.0),
    "audit_max_bytes": ("-5", -5),
    "oidc_issuer": ("http://idp.example", "http://idp.example"),
    "oidc_client_id": ("", ""),
    "oidc_client_secret_file": ("/nonexistent/secret", "/nonexistent/secret"),
    "login_rate": ("0", 0),
}


def test_every_gateway_option_has_a_bad_value_here() -> None:
    declared = {name for name, _ in field_options(GatewayConfig)}
    assert declared == set(GATEWAY_BAD)


@pytest.mark.parametrize("name", sorted(GATEWAY_BAD))
def test_the_gateway_library_and_command_refuse_the_same_value_in_the_same_words(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec: Option = next(f.metadata[OPTION] for f in fields(GatewayConfig) if f.name == name)
    text, typed = GATEWAY_BAD[name]
    with pytest.raises(ConfigError) as raised:
        Gateway(**{name: typed})
    assert raised.value.option == spec.flag
    with pytest.raises(SystemExit) as exited:
        run_gateway.config_from_args(
            run_gateway.build_parser().parse_args(["--no-auth", spec.flag, text])
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    line = err.split(": error: ", 1)[1].rstrip("\n")
    assert line.startswith(f"argument {spec.flag}: ")
    assert (
        line.split(", not ")[0]
        == f"argument {spec.flag}: {raised.value.problem}".split(", not ")[0]
    )


def test_gateway_takes_every_setting_by_its_field_name_and_no_other() -> None:
    defaults = GatewayConfig()
    every = {f.name: getattr(defaults, f.name) for f in fields(GatewayConfig)}
    assert Gateway(**every).config == defaults
    assert Gateway(defaults, auto="deny").config.auto is Decision.DENY
    assert Gateway(auto="approve", port=0, host="::1").config.auto is Decision.APPROVE
    with pytest.raises(TypeError, match="heartbeat"):
        Gateway(heartbeat=3)
    # The secrets stay out of its repr (a config may be logged).
    shown = repr(Gateway(token="tok-s3cret", operator_token="op-s3cret", sled_tokens={"p": "x9"}))
    assert "s3cret" not in shown
    assert "x9" not in shown


def test_the_matrix_options_are_the_parameters_of_their_config() -> None:
    # ``people`` is not a --matrix-* option: it says whether --access was given.
    parameters = set(inspect.signature(config_from_options).parameters) - {"people"}
    assert set(MATRIX_OPTIONS) == parameters
    flags = {spec.flag for _, spec in run_gateway.matrix_options()}
    assert flags == {f"--matrix-{name.replace('_', '-')}" for name in parameters}


def _gateway_help_lines() -> dict[str, str]:
    result = _run("run_gateway.py", "--help")
    assert result.returncode == 0, result.stderr
    lines: dict[str, str] = {}
    flag = None
    for line in result.stdout.splitlines():
        match = re.match(r"  (?:-h, )?(--[a-z-]+)", line)
        if match:
            flag = match.group(1)
            lines[flag] = line
        elif flag and line.startswith("      "):
            lines[flag] += "  " + line.strip()
        else:
            flag = None
    return lines


def test_every_gateway_option_in_help_shows_its_default_and_variable() -> None:
    lines = _gateway_help_lines()
    declared = run_gateway.all_options() + run_gateway.matrix_options()
    assert {spec.flag for _, spec in declared} | {"--help", "--version"} == set(lines)
    for _, spec in declared:
        line = lines[spec.flag]
        tail = f"(default: {spec.default_text()}"
        tail += f"; env: {spec.env})" if spec.env else ")"
        assert line.endswith(tail), line
    literal = {
        "--listen": "(default: 127.0.0.1:8080)",
        "--mcp-timeout": "(default: 30)",
        "--max-connections": "(default: 200)",
        "--token": "(default: none; env: SLED_GATEWAY_TOKEN)",
        "--operator-token": "; env: SLED_GATEWAY_OPERATOR_TOKEN)",
        "--db": "(default: $XDG_DATA_HOME/sled-gateway/gateway.db; ':memory:' keeps nothing)",
        "--no-auth": "(default: off)",
    }
    for flag, text in literal.items():
        assert re.sub(r"\s{2,}", "  ", lines[flag]).endswith(text), lines[flag]
    assert len(declared) >= 25


def test_the_gateway_help_defaults_are_the_defaults_that_apply() -> None:
    config = GatewayConfig()
    for name, spec in field_options(GatewayConfig):
        if spec.shown_default is None:
            shown = Option(spec.flag, "", rule=spec.rule, default=getattr(config, name))
            assert spec.default_text() == shown.default_text(), name


def test_the_gateway_reads_its_variables_and_no_auth_ignores_the_sled_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLED_GATEWAY_TOKEN", "from-env")
    monkeypatch.setenv("SLED_GATEWAY_OPERATOR_TOKEN", "op-from-env")
    parse = run_gateway.build_parser().parse_args
    config = run_gateway.config_from_args(parse([]))
    assert (config.token, config.operator_token) == ("from-env", "op-from-env")
    config = run_gateway.config_from_args(parse(["--token", "opt", "--operator-token", "op"]))
    assert (config.token, config.operator_token) == ("opt", "op")
    config = run_gateway.config_from_args(parse(["--no-auth"]))
    assert config.token is None


def test_the_command_line_page_lists_every_gateway_option() -> None:
    page = (ROOT / "docs" / "command-line.md").read_text("utf-8")
    gateway_part = page.split("gateway-options:begin", 1)[1]
    for _, spec in run_gateway.all_options() + run_gateway.matrix_options():
        assert f"| `{spec.flag}" in gateway_part, spec.flag
    assert "| `--listen HOST:PORT` |  | 127.0.0.1:8080 |" in gateway_part
    assert "| `--token TOKEN` | `SLED_GATEWAY_TOKEN` | none |" in gateway_part
