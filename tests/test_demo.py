"""The one-command demo, run the way the README says: ``bash scripts/demo.sh``.

It runs on free ports (``SLED_DEMO_*_PORT``); the test follows the printed
next steps literally (it runs the very commands the demo prints), approves the
sample permission request through the gateway's REST API (what the console's
Approve button does), calls the sled's tools with the MCP SDK client through
the gateway, then stops the demo the way a user does (Ctrl-C, i.e. SIGINT to
the foreground process group; or SIGTERM) and checks that every process exited
0 and every port is free again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
# The first run of scripts/demo.sh may install the demo extra into .venv.
READY_TIMEOUT = 240.0 * FACTOR
PROJECT = "demo-sled"


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class DemoRun:
    """``bash scripts/demo.sh`` in its own process group, its output readable as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "demo.sh")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a shell job: its own group, for Ctrl-C
        )
        self.output = ""
        self._cond = threading.Condition()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._cond:
                self.output += chunk.decode("utf-8", "replace")
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = re.search(pattern, self.output, re.MULTILINE)
            if m:
                found.append(m)
            return m is not None or self.proc.poll() is not None

        with self._cond:
            self._cond.wait_for(check, timeout)
        if not found:
            raise AssertionError(
                f"{pattern!r} not printed (exit {self.proc.poll()}):\n{self.output[-6000:]}"
            )
        return found[0]

    def finish(self) -> str:
        """All of the output, once the process has exited."""
        self._pump_thread.join(T)
        return self.output

    def pids(self) -> dict[str, int]:
        return {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"^\s+(mcp|gateway|uplink)\s+pid (\d+)", self.output, re.M)
        }

    def command(self, module: str) -> list[str]:
        """The command line the demo printed for ``python -m <module>``."""
        m = re.search(rf"^\s+(\S+ -m {re.escape(module)}\b.*)$", self.output, re.M)
        assert m, f"the demo did not print a {module} command:\n{self.output}"
        return shlex.split(m.group(1))

    def cleanup(self) -> None:
        """Whatever happened, leave no process behind (ours only: by pid)."""
        pids = self.pids()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(T)
        for pid in pids.values():
            # The children die with the orchestrator (PDEATHSIG); make sure anyway.
            with contextlib.suppress(OSError):  # gone already: nothing to do
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if (
                    b"run_gateway.py" in cmdline
                    or b"run_uplink.py" in cmdline
                    or b"demo." in cmdline
                ):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ports() -> dict[str, int]:
    gateway, mcp, uplink = free_ports(3)
    return {"gateway": gateway, "mcp": mcp, "uplink": uplink}


@pytest.fixture
def demo_env(ports: dict[str, int], tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLED_DEMO_", "HUSKIES_"))
        and k not in ("SLED_GATEWAY_TOKEN", "SLED_GATEWAY_OPERATOR_TOKEN")
    }
    env.update(
        SLED_DEMO_GATEWAY_PORT=str(ports["gateway"]),
        SLED_DEMO_MCP_PORT=str(ports["mcp"]),
        SLED_DEMO_UPLINK_PORT=str(ports["uplink"]),
        SLED_DEMO_LOG_DIR=str(tmp_path / "logs"),
        # The demo's database lands under here, never in the user's own data.
        XDG_DATA_HOME=str(tmp_path / "data"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_demo(demo_env: dict[str, str]) -> Iterator[DemoRun]:
    run = DemoRun(demo_env)
    try:
        yield run
    finally:
        run.cleanup()


def helper_env() -> dict[str, str]:
    """The helpers get no SLED_DEMO_* ports: the printed command lines must suffice."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLED_DEMO_")}


def spawn_printed(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=helper_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def operator_headers(run: DemoRun) -> dict[str, str]:
    """The operator token, taken from the console URL the demo printed."""
    m = re.search(r"^\s+(http://\S+)/\?token=(\S+)$", run.output, re.M)
    assert m, f"the demo did not print the console URL with its token:\n{run.output}"
    return {"Authorization": f"Bearer {m.group(2)}"}


def wait_pending(
    gateway: str, tool: str, seen: set[str], headers: dict[str, str]
) -> dict[str, object]:
    deadline = time.monotonic() + 3 * T
    with httpx.Client(timeout=T, headers=headers) as http:
        while time.monotonic() < deadline:
            for item in http.get(f"{gateway}/api/state").json()["pending"]:
                if item["tool_name"] == tool and item["req_id"] not in seen:
                    return dict(item)
            time.sleep(0.05)
    raise AssertionError(f"no pending {tool} request appeared at the gateway")


def assert_stopped_cleanly(run: DemoRun, pids: dict[str, int], ports: dict[str, int]) -> None:
    assert run.proc.wait(30 * FACTOR) == 0, run.finish()[-4000:]
    run.finish()
    for name in ("uplink", "gateway", "mcp"):
        assert f"demo: {name} (pid {pids[name]}) exited with status 0" in run.output, run.output
    # Stop order: the uplink (it denies what still waits) before the gateway, then MCP.
    order = [run.output.index(f"demo: {n} (pid") for n in ("uplink", "gateway", "mcp")]
    assert order == sorted(order)
    assert "demo: stopped." in run.output
    for name, pid in pids.items():
        assert not pid_alive(pid), f"the {name} (pid {pid}) is still running"
    for name, port in ports.items():
        assert port_is_free(port), f"the {name} port {port} is still taken"


def ask_and_approve(ask_cmd: list[str], gateway: str, headers: dict[str, str]) -> str:
    """Step 2: the printed ask_permission command waits; approve it via the REST API."""
    ask = spawn_printed(ask_cmd)
    try:
        item = wait_pending(gateway, "Bash", set(), headers)
        assert item["project"] == PROJECT
        assert ask.poll() is None  # still waiting for a human
        decided = httpx.post(
            f"{gateway}/api/permissions/{PROJECT}/{item['req_id']}",
            json={"decision": "approve"},
            timeout=T,
            headers=headers,
        )
        assert decided.status_code == 200, decided.text
        out, _ = ask.communicate(timeout=3 * T)
    finally:
        if ask.poll() is None:
            ask.kill()
    assert ask.returncode == 0, out
    assert f'"request_id": "{item["req_id"]}"' in out
    assert "decision: approve (reason: gateway)" in out
    return str(item["req_id"])


def run_printed(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A printed command line, run to its end as a user would run it."""
    return subprocess.run(
        argv, cwd=ROOT, env=helper_env(), capture_output=True, text=True, timeout=6 * T, check=False
    )


def call_tools_as_printed(run: DemoRun, gateway: str, scratch: Path) -> None:
    """Step 3: the printed call_tools command, an MCP SDK client through the gateway."""
    call_cmd = run.command("demo.call_tools")
    assert f"--gateway {gateway}" in shlex.join(call_cmd)
    assert "--token-file " in shlex.join(call_cmd)  # the token itself stays out of argv
    done = run_printed(call_cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "initialized: demo-sled" in done.stdout
    for tool in ("echo", "add", "server_time"):
        assert f"  - {tool}:" in done.stdout
    assert "echo({'text': 'hello through the gateway'}) -> 'hello through the gateway'" in (
        done.stdout
    )
    assert "add({'a': 2, 'b': 3}) -> '5'" in done.stdout

    # A stale or wrong token: the gateway's 401 and its reason, not the SDK's bare
    # "Server returned an error response".
    wrong = scratch / "wrong-operator-token"
    wrong.write_text("op-" + "w" * 40 + "\n")
    token_at = call_cmd.index("--token-file") + 1
    refused = run_printed([*call_cmd[:token_at], str(wrong), *call_cmd[token_at + 1 :]])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "call_tools: the gateway answered 401 Unauthorized: " in refused.stderr, refused.stderr
    assert "operator token" in refused.stderr


def test_demo_end_to_end_then_ctrl_c(
    start_demo: DemoRun, ports: dict[str, int], tmp_path: Path
) -> None:
    run = start_demo
    run.wait_for(r"sled-uplink demo is ready", READY_TIMEOUT)
    pids = run.pids()
    assert set(pids) == {"mcp", "gateway", "uplink"}
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    assert f"{gateway}/?token=" in run.output  # the console URL, with the operator token
    assert f"{gateway}/sleds/{PROJECT}/mcp" in run.output
    assert "curl -s -X POST" in run.output
    headers = operator_headers(run)

    # The console page is up: without the token it asks for it; the printed
    # URL logs a browser in (a session cookie) and sends it on to /.
    assert httpx.get(f"{gateway}/", timeout=T).status_code == 401
    with httpx.Client(timeout=T, follow_redirects=True) as browser:
        m = re.search(rf"^\s+({re.escape(gateway)}/\?token=\S+)$", run.output, re.M)
        assert m
        page = browser.get(m.group(1))
        assert page.status_code == 200
        assert str(page.url) == f"{gateway}/"
        assert "data-action" in page.text

    ask_cmd = run.command("demo.ask_permission")
    assert f"--ingress http://127.0.0.1:{ports['uplink']}" in shlex.join(ask_cmd)
    first = ask_and_approve(ask_cmd, gateway, headers)
    call_tools_as_printed(run, gateway, tmp_path)

    # One more request, left unanswered: Ctrl-C must deny it (fail closed).
    late = spawn_printed([*ask_cmd, "--tool", "Write", "--input", '{"path": "x.txt"}'])
    try:
        wait_pending(gateway, "Write", {first}, headers)
        # Ctrl-C in the terminal: SIGINT to the whole foreground process group.
        os.killpg(run.proc.pid, signal.SIGINT)
        late_out, _ = late.communicate(timeout=6 * T)
    finally:
        if late.poll() is None:
            late.kill()
    assert late.returncode == 1, late_out
    assert "decision: deny (reason: shutdown)" in late_out

    assert_stopped_cleanly(run, pids, ports)
    # The sled token never shows: not in the demo's output, not in any log.
    # The operator token is printed once (the console URL), and logged nowhere.
    token = (tmp_path / "logs" / "token").read_text().strip()
    operator = (tmp_path / "logs" / "operator-token").read_text().strip()
    assert len(token) >= 16
    assert len(operator) >= 16
    assert token not in run.output
    assert run.output.count(operator) == 1
    assert headers == {"Authorization": f"Bearer {operator}"}
    for log in (tmp_path / "logs").glob("*.log"):
        text = log.read_text("utf-8", "replace")
        assert token not in text, log.name
        assert operator not in text, log.name
    # The demo keeps decisions in a database of its own, not in the default one
    # every other gateway run of this user shares.
    own = tmp_path / "data" / "sled-gateway" / "demo" / "gateway.db"
    assert own.is_file()
    assert f"kept in {own}" in " ".join(run.output.split())
    assert not (tmp_path / "data" / "sled-gateway" / "gateway.db").exists()


def test_demo_stops_cleanly_on_sigterm(start_demo: DemoRun, ports: dict[str, int]) -> None:
    run = start_demo
    run.wait_for(r"sled-uplink demo is ready", READY_TIMEOUT)
    pids = run.pids()
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    state = httpx.get(f"{gateway}/api/state", timeout=T, headers=operator_headers(run)).json()
    assert [(s["project"], s["state"]) for s in state["sleds"]] == [(PROJECT, "connected")]
    ready = httpx.get(f"http://127.0.0.1:{ports['uplink']}/ready", timeout=T)
    assert ready.status_code == 200
    run.proc.send_signal(signal.SIGTERM)  # the orchestrator alone, e.g. from a supervisor
    assert_stopped_cleanly(run, pids, ports)


def test_demo_fails_clearly_when_a_port_is_taken(
    demo_env: dict[str, str], ports: dict[str, int]
) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", ports["gateway"]))
        busy.listen()
        run = DemoRun(demo_env)
        try:
            status = run.proc.wait(READY_TIMEOUT)
        finally:
            run.cleanup()
    output = run.finish()
    assert status == 2, output
    assert f"port {ports['gateway']} (gateway) is already in use" in output
    assert "SLED_DEMO_GATEWAY_PORT" in output
    assert "demo: starting" not in output  # nothing was started
    assert port_is_free(ports["mcp"])
    assert port_is_free(ports["uplink"])
