"""The command, ``run_uplink.py`` run as a real subprocess.

Each test starts the command with ``sys.executable`` against a real test
gateway in this process and judges it from the outside: its exit status, its
stderr, what the gateway saw and what the local HTTP ingress answered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest

from tests.conftest import scaled
from tests.support.gateway import Gateway
from tests.support.mcp_servers import RecordingJsonServer
from tests.support.relay import FreezableRelay

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_uplink.py"
ENV_VARS = (
    "HUSKIES_UPSTREAM_GATEWAY",
    "HUSKIES_PROJECT",
    "HUSKIES_LOCAL_MCP_URL",
    "HUSKIES_UPLINK_LISTEN",
    "HUSKIES_UPSTREAM_TOKEN",
    "HUSKIES_UPLINK_INGRESS_TOKEN",
)
DURATION_OPTIONS = (
    "--heartbeat-interval",
    "--backoff-initial",
    "--backoff-max",
    "--backoff-reset-after",
    "--permission-timeout",
    "--mcp-timeout",
    "--ping-interval",
    "--ping-timeout",
    "--open-timeout",
    "--status-interval",
)
BAD_DURATIONS = ("0", "-1", "nan", "inf", "abc")
INGRESS_LINE = re.compile(r"ingress listening on http://127\.0\.0\.1:(\d+)")
# Fast settings so a run reaches "connected" at once and reconnects quickly.
FAST = ("--backoff-initial", "0.05", "--backoff-max", "0.5", "--open-timeout", "3")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the uplink's variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def run(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
    )


class Uplink:
    """A running ``run_uplink.py``; its stderr is collected line by line."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=ROOT,
            env=env if env is not None else clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(
        self, predicate: Callable[[str], Any], timeout: float = 10, start: int = 0
    ) -> Any:
        """The first truthy ``predicate(line)`` over the lines from ``start`` on."""
        deadline = time.monotonic() + scaled(timeout)
        seen = start
        with self._cond:
            while True:
                while seen < len(self.lines):
                    result = predicate(self.lines[seen])
                    seen += 1
                    if result:
                        return result
                if self._eof:
                    raise AssertionError(
                        f"uplink exited ({self.proc.poll()}) first:\n{self.stderr_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no such log line in time:\n{self.stderr_tail()}")
                self._cond.wait(remaining)

    def wait_text(self, text: str, timeout: float = 10, start: int = 0) -> str:
        return self.wait_line(lambda line: line if text in line else None, timeout, start)

    def stderr_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def ingress_port(self) -> int:
        return int(self.wait_line(INGRESS_LINE.search).group(1))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10) -> int:
        code = self.proc.wait(timeout=scaled(timeout))
        self._reader.join(scaled(5))
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Uplink]]:
    started: list[Uplink] = []

    def start(args: Sequence[str], env: dict[str, str] | None = None) -> Uplink:
        uplink = Uplink(args, env)
        started.append(uplink)
        return uplink

    yield start
    for uplink in started:
        uplink.kill()


def stop_cleanly(uplink: Uplink, signum: int = signal.SIGTERM) -> None:
    uplink.signal(signum)
    assert uplink.wait(10) == 0, uplink.stderr_tail()


# ── options and environment variables ──────────────────────────────────────


def test_every_option_is_accepted(gateway: Gateway, spawn) -> None:
    with RecordingJsonServer() as mcp:
        port = free_port()
        uplink = spawn([
            "--upstream-gateway", gateway.url,
            "--project", "all-options",
            "--local-mcp-url", mcp.url,
            "--listen", f"127.0.0.1:{port}",
            "--heartbeat-interval", "0.2",
            "--backoff-initial", "0.05",
            "--backoff-max", "0.5",
            "--backoff-multiplier", "1.5",
            "--backoff-reset-after", "5",
            "--permission-timeout", "30",
            "--max-pending", "5",
            "--mcp-timeout", "5",
            "--mcp-concurrency", "2",
            "--ping-interval", "5",
            "--ping-timeout", "5",
            "--open-timeout", "3",
            "--ca-file", certifi.where(),
            "--status-interval", "30",
            "--log-level", "info",
            "--log-json",
        ])  # fmt: skip
        session = gateway.session(1, timeout=scaled(10))
        identity = gateway.frame(session, "identity")
        assert identity["payload"]["project"] == "all-options"
        gateway.frame(session, "heartbeat", index=1, timeout=scaled(3))  # 0.2 s interval is used
        # The MCP replay goes to --local-mcp-url.
        gateway.send(
            session, "mcp_request", "m1", {"body": '{"jsonrpc":"2.0","id":7,"method":"ping"}'}
        )
        answer = gateway.frame(session, "mcp_response", timeout=scaled(5))
        assert answer["req_id"] == "m1"
        assert answer["payload"]["id"] == 7
        assert mcp.requests
        # The ingress listens on --listen.
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=scaled(5)).json()
        assert status["connection"]["state"] == "connected"
        stop_cleanly(uplink)
    assert all(json.loads(line)["level"] != "DEBUG" for line in uplink.lines if line)


def test_environment_variables_are_read(gateway: Gateway, spawn) -> None:
    port = free_port()
    with RecordingJsonServer() as mcp:
        env = clean_env(
            HUSKIES_UPSTREAM_GATEWAY=gateway.url,
            HUSKIES_PROJECT="from-env",
            HUSKIES_LOCAL_MCP_URL=mcp.url,
            HUSKIES_UPLINK_LISTEN=f"127.0.0.1:{port}",
        )
        uplink = spawn([], env)
        assert uplink.ingress_port() == port
        session = gateway.session(1, timeout=scaled(10))
        assert gateway.frame(session, "identity")["payload"]["project"] == "from-env"
        gateway.send(
            session, "mcp_request", "m1", {"body": '{"jsonrpc":"2.0","id":1,"method":"ping"}'}
        )
        assert gateway.frame(session, "mcp_response", timeout=scaled(5))["payload"]["id"] == 1
        assert len(mcp.requests) == 1
        stop_cleanly(uplink)


def test_options_win_over_environment_variables(spawn) -> None:
    opt_port, env_port = free_port(), free_port()
    with (
        Gateway() as env_gw,
        Gateway() as opt_gw,
        RecordingJsonServer() as env_mcp,
        RecordingJsonServer() as opt_mcp,
    ):
        env = clean_env(
            HUSKIES_UPSTREAM_GATEWAY=env_gw.url,
            HUSKIES_PROJECT="from-env",
            HUSKIES_LOCAL_MCP_URL=env_mcp.url,
            HUSKIES_UPLINK_LISTEN=f"127.0.0.1:{env_port}",
        )
        uplink = spawn(
            [
                "--upstream-gateway", opt_gw.url,
                "--project", "from-option",
                "--local-mcp-url", opt_mcp.url,
                "--listen", f"127.0.0.1:{opt_port}",
            ],
            env,
        )  # fmt: skip
        assert uplink.ingress_port() == opt_port
        session = opt_gw.session(1, timeout=scaled(10))
        assert opt_gw.frame(session, "identity")["payload"]["project"] == "from-option"
        opt_gw.send(
            session, "mcp_request", "m1", {"body": '{"jsonrpc":"2.0","id":1,"method":"ping"}'}
        )
        assert opt_gw.frame(session, "mcp_response", timeout=scaled(5))["payload"]["id"] == 1
        assert len(opt_mcp.requests) == 1
        assert env_mcp.requests == []
        assert env_gw.handshakes == 0
        stop_cleanly(uplink)


def test_a_bad_environment_value_is_a_usage_error_naming_its_option() -> None:
    result = run(
        [], clean_env(HUSKIES_UPSTREAM_GATEWAY="ws://127.0.0.1:9/x", HUSKIES_UPLINK_LISTEN="nope")
    )
    assert result.returncode == 2
    assert "--listen" in result.stderr
    # ... and the option overrides it.
    result = run(
        ["--local-mcp-url", "http://127.0.0.1:1/mcp", "--listen", "nope"],
        clean_env(HUSKIES_LOCAL_MCP_URL="ftp://x/mcp"),
    )
    assert result.returncode == 2
    assert "--listen" in result.stderr
    assert "--local-mcp-url" not in result.stderr


# ── disabled ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param([], clean_env(), id="unset"),
        pytest.param([], clean_env(HUSKIES_UPSTREAM_GATEWAY=""), id="empty-env"),
    ],
)
def test_no_gateway_means_disabled(args: list[str], env: dict[str, str]) -> None:
    # --listen on a free port: a disabled uplink must not try the default 3002.
    result = run([*args, "--listen", f"127.0.0.1:{free_port()}"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "disabled" in lines[0]
    assert result.stdout == ""


# ── bad values ──────────────────────────────────────────────────────────────

BAD_VALUES: list[tuple[list[str], str]] = [
    (["--upstream-gateway", "http://127.0.0.1:9/api"], "--upstream-gateway"),
    (["--upstream-gateway", "ftp://127.0.0.1:9/api"], "--upstream-gateway"),
    *[([option, value], option) for option in DURATION_OPTIONS for value in BAD_DURATIONS],
    (["--max-pending", "0"], "--max-pending"),
    (["--mcp-concurrency", "0"], "--mcp-concurrency"),
    (["--backoff-multiplier", "0.5"], "--backoff-multiplier"),
    (["--listen", "nope"], "--listen"),
    (["--listen", "1.2.3.4:99999"], "--listen"),
    (["--ca-file", "/nonexistent/ca.pem"], "--ca-file"),
    (["--ca-file", "/"], "--ca-file"),  # a directory
    # Beyond the brief's list, the same rule for every other value:
    (["--upstream-gateway", "ws://"], "--upstream-gateway"),
    (["--project", ""], "--project"),
    (["--local-mcp-url", "ftp://127.0.0.1/mcp"], "--local-mcp-url"),
    (["--max-pending", "abc"], "--max-pending"),
    (["--max-pending", "-1"], "--max-pending"),
    (["--mcp-concurrency", "1.5"], "--mcp-concurrency"),
    (["--backoff-multiplier", "nan"], "--backoff-multiplier"),
    (["--backoff-multiplier", "inf"], "--backoff-multiplier"),
    (["--backoff-multiplier", "abc"], "--backoff-multiplier"),
    (["--backoff-initial", "5", "--backoff-max", "1"], "--backoff-max"),
    (["--listen", "127.0.0.1:"], "--listen"),
    (["--listen", "256.0.0.1:80"], "--listen"),
    (["--log-level", "LOUD"], "--log-level"),
    (["--bogus"], "--bogus"),
    (["--project"], "--project"),  # a value is missing
]


def _check_usage_error(args: list[str], option: str) -> str | None:
    """None if ``args`` exit 2 with one stderr line naming ``option``; else what went wrong."""
    try:
        result = run(args, timeout=15)
    except subprocess.TimeoutExpired:
        return f"{args}: still running after 15 s (the bad value was not refused)"
    problems = []
    if result.returncode != 2:
        problems.append(f"exit {result.returncode}")
    lines = result.stderr.splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if option not in result.stderr:
        problems.append(f"{option} not named")
    if "Traceback" in result.stderr:
        problems.append("traceback")
    return f"{args}: {', '.join(problems)}: {result.stderr!r}" if problems else None


@pytest.mark.parametrize("with_gateway", [True, False], ids=["gateway", "no-gateway"])
def test_every_bad_value_exits_2_with_one_line_naming_the_option(
    with_gateway: bool, tmp_path: Path
) -> None:
    # A closed port: a run that wrongly starts would only ever back off.
    prefix = (
        ["--upstream-gateway", f"wss://127.0.0.1:{free_port()}/api?token=t"] if with_gateway else []
    )
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("this is not a certificate\n")
    bad = [*BAD_VALUES, (["--ca-file", str(garbage)], "--ca-file")]
    cases = [
        (prefix + args if args[0] != "--upstream-gateway" else args, option) for args, option in bad
    ]
    # Run them in parallel: each is a fresh interpreter.
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(lambda c: _check_usage_error(*c), cases) if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("with_gateway", [True, False], ids=["gateway", "no-gateway"])
def test_listen_on_a_port_in_use_exits_2(with_gateway: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = ["--listen", f"127.0.0.1:{port}"]
        if with_gateway:
            args += ["--upstream-gateway", f"ws://127.0.0.1:{free_port()}/api"]
        problem = _check_usage_error(args, "--listen")
    assert problem is None, problem


# ── signals ─────────────────────────────────────────────────────────────────


def _post_permission(port: int, results: list[Any], index: int) -> None:
    try:
        response = httpx.post(
            f"http://127.0.0.1:{port}/permission", json={"tool_name": "Bash"}, timeout=scaled(15)
        )
        results[index] = (response.status_code, response.json(), time.monotonic())
    except Exception as exc:
        results[index] = exc


def _start_callers(port: int, count: int) -> tuple[list[Any], list[threading.Thread]]:
    results: list[Any] = [None] * count
    threads = [
        threading.Thread(target=_post_permission, args=(port, results, i)) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    return results, threads


def _assert_shutdown_denials(results: list[Any], sent_at: float) -> None:
    for result in results:
        assert isinstance(result, tuple), result
        status, body, answered_at = result
        assert status == 200
        assert (body["decision"], body["reason"]) == ("deny", "shutdown"), body
        assert answered_at - sent_at < 5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_denies_pending_requests_closes_and_exits_0(
    gateway: Gateway, spawn, signum: int
) -> None:
    uplink = spawn(["--upstream-gateway", gateway.url, "--listen", "127.0.0.1:0", *FAST])
    port = uplink.ingress_port()
    session = gateway.session(1, timeout=scaled(10))
    gateway.frame(session, "identity")
    callers = 3
    results, threads = _start_callers(port, callers)
    try:
        # All of them reached the gateway, which never answers.
        gateway.frame(session, "perm_request", index=callers - 1, timeout=scaled(10))
        assert all(r is None for r in results)
        sent_at = time.monotonic()
        uplink.signal(signum)
        code = uplink.wait(10)
        exited_at = time.monotonic()
    finally:
        for thread in threads:
            thread.join(scaled(15))
    assert code == 0, uplink.stderr_tail()
    assert exited_at - sent_at < 5, f"took {exited_at - sent_at:.2f}s to exit"
    _assert_shutdown_denials(results, sent_at)
    gateway.wait_closed(session, timeout=scaled(5))
    assert session.close_code in (1000, 1001)
    assert signal.Signals(signum).name in uplink.stderr


def test_stop_signal_during_backoff_denies_held_requests(spawn) -> None:
    url = f"ws://127.0.0.1:{free_port()}/api/sled-uplink?token=t"  # nobody listens
    uplink = spawn(
        ["--upstream-gateway", url, "--listen", "127.0.0.1:0", "--backoff-initial", "30"]
    )
    port = uplink.ingress_port()
    uplink.wait_text("-> backoff")
    results, threads = _start_callers(port, 2)
    try:
        deadline = time.monotonic() + scaled(10)
        while (
            httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["permissions"]["pending"]
            < 2
        ):
            assert time.monotonic() < deadline, "requests never became pending"
            time.sleep(0.02)
        sent_at = time.monotonic()
        uplink.signal(signal.SIGTERM)
        assert uplink.wait(10) == 0, uplink.stderr_tail()
        assert time.monotonic() - sent_at < 5
    finally:
        for thread in threads:
            thread.join(scaled(15))
    _assert_shutdown_denials(results, sent_at)


@pytest.mark.parametrize("stuck", ["frozen-session", "hung-handshake"])
def test_stop_signal_is_prompt_even_when_the_gateway_does_not_answer(
    gateway: Gateway, spawn, stuck: str
) -> None:
    with contextlib.ExitStack() as stack:
        if stuck == "frozen-session":
            relay = stack.enter_context(FreezableRelay(gateway.port))
            url = relay.url(f"/api/sled-uplink?token={gateway.token}")
        else:
            # Accepts TCP (the kernel's backlog) but never answers the upgrade.
            silent = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            url = f"ws://127.0.0.1:{silent.getsockname()[1]}/api/sled-uplink?token=t"
        uplink = spawn(
            ["--upstream-gateway", url, "--listen", "127.0.0.1:0", "--open-timeout", "60"]
        )
        port = uplink.ingress_port()
        if stuck == "frozen-session":
            session = gateway.session(1, timeout=scaled(10))
            gateway.frame(session, "identity")
            relay.freeze()
        else:
            uplink.wait_text("state starting -> connecting")
        results, threads = _start_callers(port, 2)
        try:
            deadline = time.monotonic() + scaled(10)
            while (
                httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["permissions"][
                    "pending"
                ]
                < 2
            ):
                assert time.monotonic() < deadline, "requests never became pending"
                time.sleep(0.02)
            sent_at = time.monotonic()
            uplink.signal(signal.SIGTERM)
            assert uplink.wait(10) == 0, uplink.stderr_tail()
            assert time.monotonic() - sent_at < 5, uplink.stderr_tail()
        finally:
            for thread in threads:
                thread.join(scaled(15))
        _assert_shutdown_denials(results, sent_at)


def test_sighup_while_connected_is_logged_and_ignored(gateway: Gateway, spawn) -> None:
    uplink = spawn(["--upstream-gateway", gateway.url, "--listen", "127.0.0.1:0", *FAST])
    session = gateway.session(1, timeout=scaled(10))
    gateway.frame(session, "identity")
    uplink.wait_text("state connecting -> connected")
    mark = len(uplink.lines)
    uplink.signal(signal.SIGHUP)
    line = uplink.wait_text("SIGHUP", start=mark)
    assert "ignored" in line
    # Still running, still on the same session.
    time.sleep(0.3)
    assert uplink.proc.poll() is None
    assert not session.closed
    assert len(gateway.sessions) == 1
    stop_cleanly(uplink)


def test_sighup_during_a_long_backoff_reconnects_now(spawn) -> None:
    port = free_port()
    gateway = Gateway()
    url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={gateway.token}"
    uplink = spawn(
        [
            "--upstream-gateway",
            url,
            "--listen",
            "127.0.0.1:0",
            "--backoff-initial",
            "30",
            "--backoff-max",
            "60",
        ]
    )
    try:
        # The gateway is down: the first connect fails and a 24-36 s wait begins.
        uplink.wait_text("-> backoff")
        gateway.start(port)
        assert uplink.proc.poll() is None
        mark = len(uplink.lines)
        hup_at = time.monotonic()
        uplink.signal(signal.SIGHUP)
        session = gateway.session(1, timeout=scaled(5))
        gateway.frame(session, "identity")
        assert time.monotonic() - hup_at < 5
        uplink.wait_text("SIGHUP", start=mark)
        stop_cleanly(uplink)
    finally:
        gateway.stop()


# ── logging ─────────────────────────────────────────────────────────────────


def test_log_json_gives_one_object_per_line(gateway: Gateway, spawn) -> None:
    uplink = spawn(
        [
            "--upstream-gateway",
            gateway.url,
            "--listen",
            "127.0.0.1:0",
            "--log-json",
            "--log-level",
            "DEBUG",
            *FAST,
        ]
    )
    session = gateway.session(1, timeout=scaled(10))
    gateway.frame(session, "identity")
    uplink.wait_line(
        lambda line: '"state connecting -> connected' in line and '"supervisor"' in line
    )
    stop_cleanly(uplink)
    records = []
    for line in uplink.lines:
        record = json.loads(line)  # every line, including stdlib ones (pykka, websockets)
        assert isinstance(record, dict), line
        assert {"time", "level", "actor", "message"} <= record.keys(), line
        records.append(record)
    actors = {r["actor"] for r in records}
    assert {"main", "supervisor", "connection#1", "permissions", "websockets", "pykka"} <= actors, (
        actors
    )


def test_status_interval_logs_periodic_snapshots(gateway: Gateway, spawn) -> None:
    uplink = spawn(
        [
            "--upstream-gateway",
            gateway.url,
            "--listen",
            "127.0.0.1:0",
            "--status-interval",
            "0.3",
            *FAST,
        ]
    )
    port = uplink.ingress_port()
    session = gateway.session(1, timeout=scaled(10))
    gateway.frame(session, "identity")
    snapshot_line = re.compile(r"\|\s*status\s*\|\s*snapshot (\{.*\})$")

    def snapshot(line: str) -> dict[str, Any] | None:
        match = snapshot_line.search(line)
        return json.loads(match.group(1)) if match else None

    def connected_with(pending: int) -> Callable[[str], Any]:
        def check(line: str) -> Any:
            snap = snapshot(line)
            if (
                snap
                and snap["connection"]["state"] == "connected"
                and snap["permissions"]["pending"] == pending
            ):
                return snap
            return None

        return check

    first_at = time.monotonic()
    uplink.wait_line(connected_with(0), timeout=5)
    results: list[Any] = [None]
    caller = threading.Thread(target=_post_permission, args=(port, results, 0))
    caller.start()
    try:
        gateway.frame(session, "perm_request", timeout=scaled(5))
        uplink.wait_line(connected_with(1), timeout=5)
        snapshots = [s for s in map(snapshot, uplink.lines) if s]
        assert len(snapshots) >= 2
        # Periodic: several in the time it took (not just one at start).
        assert time.monotonic() - first_at < 0.3 * len(snapshots) + scaled(3)
        stop_cleanly(uplink)
    finally:
        caller.join(scaled(15))
    assert results[0][1]["reason"] == "shutdown"


def test_the_token_never_reaches_stderr_even_at_debug(spawn) -> None:
    token = "tok-9f8e7d6c5b4a-SECRET"
    with Gateway(token=token) as gateway:
        wrong = gateway.url.replace(token, "wrong-" + token)
        # First a refused handshake (its error names the URL), then a good session.
        uplink = spawn(
            ["--upstream-gateway", wrong, "--listen", "127.0.0.1:0", "--log-level", "DEBUG", *FAST]
        )
        uplink.wait_text("401")
        uplink.kill()
        uplink2 = spawn(
            [
                "--upstream-gateway",
                gateway.url,
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "DEBUG",
                "--heartbeat-interval",
                "0.2",
                *FAST,
            ]
        )
        port = uplink2.ingress_port()
        session = gateway.session(1, timeout=scaled(10))
        gateway.frame(session, "heartbeat", timeout=scaled(5))
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=scaled(5)).text
        stop_cleanly(uplink2)
    text = uplink.stderr + "\n" + uplink2.stderr
    assert token not in text
    assert token not in status
    assert "token=***" in text
    # websockets' own DEBUG lines (the handshake request line) were there, redacted.
    assert re.search(r"websockets.*GET /api/sled-uplink\?token=\*\*\*", text), uplink2.stderr_tail(
        80
    )
