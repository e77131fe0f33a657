"""Start the whole demo on loopback, print what to do next, stop it all on Ctrl-C.

    bash scripts/demo.sh            # sets up .venv, then runs: python -m demo.run

Three processes, each in its own session (so a terminal's Ctrl-C reaches only
this orchestrator, which then stops them in a safe order):

1. the sled's local MCP server — ``python -m demo.local_mcp_server`` (MCP SDK) on :3001
2. the reference gateway — ``run_gateway.py`` on :8080, with a fresh operator
   token (``SLED_GATEWAY_OPERATOR_TOKEN``) and one sled token for the demo sled
   (a ``--sled-tokens`` file in the log directory, mode 0600)
3. the uplink — ``run_uplink.py --project demo-sled --local-mcp-url
   http://127.0.0.1:3001/mcp --listen 127.0.0.1:3002``, connecting to the
   gateway (the URL in ``HUSKIES_UPSTREAM_GATEWAY`` and the sled token in
   ``HUSKIES_UPSTREAM_TOKEN``, not on the command line, where ``ps`` would
   show it)

It prints the console URL with the operator token in it (opening it logs the
browser in), and the MCP client command reads that token from a file.

Ports: ``SLED_DEMO_GATEWAY_PORT``, ``SLED_DEMO_MCP_PORT``,
``SLED_DEMO_UPLINK_PORT``; the sled's name: ``SLED_DEMO_PROJECT``; logs go to
``SLED_DEMO_LOG_DIR`` (default: a fresh temporary directory).

On SIGINT or SIGTERM: the uplink first (it denies whatever is still waiting
and closes its WebSocket with 1001), then the gateway, then the MCP server;
each gets SIGTERM and up to 8 s, then SIGKILL. A second Ctrl-C kills at once.
Exit status: 0 after a clean stop, 1 if something failed, 2 if a port is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from demo import (
    DEFAULT_GATEWAY_PORT,
    DEFAULT_MCP_PORT,
    DEFAULT_PROJECT,
    DEFAULT_UPLINK_PORT,
    GATEWAY_PORT_ENV,
    LOOPBACK,
    MCP_PORT_ENV,
    PROJECT_ENV,
    UPLINK_PORT_ENV,
    env_port,
    env_project,
)
from sled_gateway.store import default_db_path

ROOT = Path(__file__).resolve().parent.parent
READY_MARKER = "sled-uplink demo is ready"
STOP_GRACE = 8.0  # seconds each process gets after SIGTERM before SIGKILL
EXIT_OK, EXIT_FAILED, EXIT_PORT_TAKEN = 0, 1, 2


def say(text: str = "") -> None:
    print(text, flush=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    """Linux: SIGTERM this child if the orchestrator dies without stopping it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C is ours to forward, in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty)"

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gateway_port: int = args.gateway_port
        self.mcp_port: int = args.mcp_port
        self.uplink_port: int = args.uplink_port
        self.project: str = args.project
        self.token = secrets.token_urlsafe(18)  # the demo sled's own token
        self.operator_token = secrets.token_urlsafe(24)  # console, REST API, MCP relay
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="sled-demo-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.signals = 0

    # -- URLs -------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def console_url(self) -> str:
        return f"{self.gateway_url}/?token={self.operator_token}"

    @property
    def operator_token_file(self) -> Path:
        return self.log_dir / "operator-token"

    @property
    def db_path(self) -> Path:
        """The demo's own gateway database, kept across demo restarts, apart from
        the user's default one so no other gateway run shows up in its audit log."""
        return default_db_path().parent / "demo" / "gateway.db"

    @property
    def sled_tokens_file(self) -> Path:
        return self.log_dir / "sled-tokens.json"

    @property
    def ingress_url(self) -> str:
        return f"http://{LOOPBACK}:{self.uplink_port}"

    @property
    def local_mcp_url(self) -> str:
        return f"http://{LOOPBACK}:{self.mcp_port}/mcp"

    @property
    def relay_url(self) -> str:
        from urllib.parse import quote

        return f"{self.gateway_url}/sleds/{quote(self.project, safe='')}/mcp"

    # -- signals ----------------------------------------------------------------

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        self.stop_requested.set()
        if self.signals > 1:
            # Second Ctrl-C: no more patience.
            for child in self.children:
                if child.exited() is None and child.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()

    # -- steps ------------------------------------------------------------------

    def check_ports(self) -> str | None:
        """None if every port is free, else what to tell the user."""
        wanted = {
            "gateway": (self.gateway_port, GATEWAY_PORT_ENV),
            "local MCP server": (self.mcp_port, MCP_PORT_ENV),
            "uplink ingress": (self.uplink_port, UPLINK_PORT_ENV),
        }
        ports = [p for p, _ in wanted.values()]
        if len(set(ports)) != len(ports):
            return f"the three ports must differ, got {ports}"
        for name, (port, env) in wanted.items():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # Same options the servers use, so TIME_WAIT leftovers do not count.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((LOOPBACK, port))
                except OSError as exc:
                    return (
                        f"port {port} ({name}) is already in use on {LOOPBACK}: "
                        f"{exc.strerror or exc}.\n"
                        f"  Stop whatever holds it (e.g. a demo already running), or pick "
                        f"another port: {env}=<port> bash scripts/demo.sh"
                    )
        return None

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HUSKIES_")
            and k not in ("SLED_GATEWAY_TOKEN", "SLED_GATEWAY_OPERATOR_TOKEN")
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def build_children(self) -> None:
        py = sys.executable
        ws_url = f"ws://{LOOPBACK}:{self.gateway_port}/api/sled-uplink"
        self.children = [
            Child(
                "mcp",
                [py, "-m", "demo.local_mcp_server", "--port", str(self.mcp_port)],
                self._env(),
                self.log_dir / "mcp.log",
            ),
            Child(
                "gateway",
                [
                    py,
                    str(ROOT / "run_gateway.py"),
                    "--listen",
                    f"{LOOPBACK}:{self.gateway_port}",
                    "--sled-tokens",
                    str(self.sled_tokens_file),
                    "--db",
                    str(self.db_path),
                ],
                self._env(SLED_GATEWAY_OPERATOR_TOKEN=self.operator_token),
                self.log_dir / "gateway.log",
            ),
            Child(
                "uplink",
                [
                    py,
                    str(ROOT / "run_uplink.py"),
                    "--project",
                    self.project,
                    "--local-mcp-url",
                    self.local_mcp_url,
                    "--listen",
                    f"{LOOPBACK}:{self.uplink_port}",
                    "--backoff-max",
                    "5",
                ],
                # The sled token travels as ?token=, but never in argv or the URL text.
                self._env(HUSKIES_UPSTREAM_GATEWAY=ws_url, HUSKIES_UPSTREAM_TOKEN=self.token),
                self.log_dir / "uplink.log",
            ),
        ]

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def _wait_until(self, what: str, check: Any, deadline: float) -> bool:
        """Poll ``check()`` until true; False (after saying why) on failure or Ctrl-C."""
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self.stop_requested.is_set():
                    return False
                for c in self.children:
                    status = c.exited()
                    if status is not None:
                        say(f"demo: the {c.name} exited with status {status} while starting.")
                        say(f"  last lines of {c.log_path}:\n{c.log_tail()}")
                        return False
                with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                    if check(http):
                        return True
                if time.monotonic() > deadline:
                    say(f"demo: timed out waiting for {what}.")
                    for c in self.children:
                        say(f"  last lines of {c.log_path}:\n{c.log_tail(10)}")
                    return False
                self.stop_requested.wait(0.1)

    def start(self) -> bool:
        deadline = time.monotonic() + self.args.ready_timeout
        self.build_children()
        mcp, gateway, uplink = (self.child(n) for n in ("mcp", "gateway", "uplink"))

        say(f"demo: starting the local MCP server on {self.local_mcp_url} ...")
        mcp.start()

        def mcp_up(_http: httpx.Client) -> bool:
            with socket.create_connection((LOOPBACK, self.mcp_port), timeout=0.5):
                return True

        if not self._wait_until("the local MCP server", mcp_up, deadline):
            return False

        say(f"demo: starting the gateway on {self.gateway_url} ...")
        gateway.start()
        if not self._wait_until(
            "the gateway",
            lambda http: http.get(f"{self.gateway_url}/healthz").status_code == 200,
            deadline,
        ):
            return False

        say(f"demo: starting the uplink for sled {self.project!r} (ingress {self.ingress_url}) ...")
        uplink.start()

        def sled_connected(http: httpx.Client) -> bool:
            if http.get(f"{self.ingress_url}/ready").status_code != 200:
                return False
            state = http.get(
                f"{self.gateway_url}/api/state",
                headers={"Authorization": f"Bearer {self.operator_token}"},
            ).json()
            return any(
                s["project"] == self.project and s["state"] == "connected" for s in state["sleds"]
            )

        return self._wait_until("the sled to connect to the gateway", sled_connected, deadline)

    def next_steps(self) -> str:
        # Commands as the user can paste them where they stand: relative to the
        # repository only when that is their directory (scripts/demo.sh says).
        py = sys.executable
        caller = Path(os.environ.get("SLED_DEMO_CALLER_CWD") or Path.cwd()).resolve()
        if caller == ROOT:
            with contextlib.suppress(ValueError):
                py = str(Path(py).relative_to(ROOT))
        ask = f"{py} -m demo.ask_permission"
        if self.uplink_port != DEFAULT_UPLINK_PORT:
            ask += f" --ingress {self.ingress_url}"
        call = f"{py} -m demo.call_tools --token-file {self.operator_token_file}"
        if self.gateway_port != DEFAULT_GATEWAY_PORT:
            call += f" --gateway {self.gateway_url}"
        if self.project != DEFAULT_PROJECT:
            call += f" --project {self.project}"
        curl = (
            f"curl -s -X POST {self.ingress_url}/permission "
            "-H 'Content-Type: application/json' \\\n"
            """            -d '{"tool_name": "Bash", "tool_input": {"command": "ls -la"}}'"""
        )
        pids = "\n".join(f"    {c.name:<8} pid {c.pid:<7} log {c.log_path}" for c in self.children)
        from sled_claude import claude_config

        claude = claude_config(self.ingress_url, None, 120.0, "http")["command"]
        uplink_cli = "run_uplink.py" if caller == ROOT else str(ROOT / "run_uplink.py")
        return f"""
==> {READY_MARKER}: sled {self.project!r} is connected to the gateway.

  1. Open the web console in a browser (the operator token in this URL logs
     the browser in; keep it to yourself):

         {self.console_url}

  2. In another terminal, ask for a permission (it waits for your click on
     Approve / Deny / Always allow in the console):

         {ask}

     or the same with curl:

         {curl}

  3. Call the sled's tools through the gateway with the MCP SDK client:

         {call}

     Any MCP client works: the sled's MCP endpoint, relayed, is
     {self.relay_url}

  4. Let Claude Code ask the console before it runs a tool:

         {claude} \\
             -p 'Create the directory d1 with mkdir'

     Hooks and the Agent SDK instead: {py} {uplink_cli} claude-config
     --ingress {self.ingress_url} (docs/claude-code.md).

  Running (logs: tail -f {self.log_dir}/*.log):
{pids}
  The uplink's status: curl -s {self.ingress_url}/status
  The sled's token is in {self.sled_tokens_file}; the operator token in
  {self.operator_token_file} (API clients send Authorization: Bearer <it>).
  Every decision and rule is kept in {self.db_path}: restart the demo
  and the console still shows them (the Audit log and Rules sections).

  Press Ctrl-C to stop everything.
"""

    def wait(self) -> int:
        """Run until a signal (EXIT_OK) or until a process dies (EXIT_FAILED)."""
        while not self.stop_requested.wait(0.25):
            for c in self.children:
                status = c.exited()
                if status is not None:
                    say(f"demo: the {c.name} (pid {c.pid}) exited unexpectedly (status {status}).")
                    say(f"  last lines of {c.log_path}:\n{c.log_tail()}")
                    return EXIT_FAILED
        return EXIT_OK

    def stop(self) -> bool:
        """Stop uplink, gateway, MCP server (in that order); True if all exited 0."""
        clean = True
        for name in ("uplink", "gateway", "mcp"):
            c = next((x for x in self.children if x.name == name), None)
            if c is None or c.proc is None:
                continue
            sent_term = False
            if c.exited() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
                    sent_term = True
                try:
                    c.proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    say(f"demo: the {c.name} did not stop within {STOP_GRACE:.0f} s; killing it")
                    c.proc.kill()
                    c.proc.wait()
            status = c.proc.returncode
            if status == -signal.SIGTERM and sent_term:
                # Still starting up (no handler yet): our SIGTERM's default action is a clean stop.
                say(f"demo: {c.name} (pid {c.pid}) stopped by SIGTERM while starting")
            else:
                clean = clean and status == 0
                say(f"demo: {c.name} (pid {c.pid}) exited with status {status}")
            c.close()
        return clean

    def run(self) -> int:
        problem = self.check_ports()
        if problem is not None:
            say(f"demo: {problem}")
            return EXIT_PORT_TAKEN
        for path, text in (
            (self.log_dir / "token", self.token + "\n"),
            (self.sled_tokens_file, json.dumps({self.project: self.token}) + "\n"),
            (self.operator_token_file, self.operator_token + "\n"),
        ):
            # Created 0600 before the secret is written: no window where others may read it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            path.chmod(0o600)
        status = EXIT_FAILED
        try:
            if self.start():
                say(self.next_steps())
                status = self.wait()
            elif self.stop_requested.is_set():
                status = EXIT_OK  # Ctrl-C while starting is a clean stop
            if self.stop_requested.is_set():
                say("\ndemo: stopping (uplink, gateway, MCP server) ...")
        finally:
            # Ignore further Ctrl-C handling beyond "kill now" while stopping.
            clean = self.stop()
        if status == EXIT_OK and not clean:
            status = EXIT_FAILED
        say("demo: stopped." if status == EXIT_OK else f"demo: stopped (status {status}).")
        say(f"demo: logs kept in {self.log_dir}")
        return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.sh",
        description="Run the sled-uplink demo on loopback: gateway + uplink + local MCP server.",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=env_port(GATEWAY_PORT_ENV, DEFAULT_GATEWAY_PORT),
        help=f"gateway + web console port (env {GATEWAY_PORT_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--mcp-port",
        type=int,
        default=env_port(MCP_PORT_ENV, DEFAULT_MCP_PORT),
        help=f"local MCP server port (env {MCP_PORT_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--uplink-port",
        type=int,
        default=env_port(UPLINK_PORT_ENV, DEFAULT_UPLINK_PORT),
        help=f"uplink ingress port (env {UPLINK_PORT_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--project",
        default=env_project(),
        help=f"the sled's name (env {PROJECT_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--log-dir",
        default=os.environ.get("SLED_DEMO_LOG_DIR") or None,
        help="where the three logs go (env SLED_DEMO_LOG_DIR; default: a new temp dir)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=float(os.environ.get("SLED_DEMO_READY_TIMEOUT", "60")),
        help="seconds to wait for everything to come up (default %(default)s)",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="also start a local Matrix homeserver and approve from a Matrix client "
        "(port: env SLED_DEMO_MATRIX_PORT, default 8008)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option in ("gateway_port", "mcp_port", "uplink_port"):
        if not 0 < getattr(args, option) < 65536:
            build_parser().error(f"--{option.replace('_', '-')} must be 1-65535")
    if args.matrix:
        from demo.matrix_mode import MatrixDemo

        demo: Demo = MatrixDemo(args)
    else:
        demo = Demo(args)
    signal.signal(signal.SIGINT, demo.on_signal)
    signal.signal(signal.SIGTERM, demo.on_signal)
    return demo.run()


if __name__ == "__main__":
    sys.exit(main())
