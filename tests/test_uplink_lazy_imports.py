"""What an idle uplink has loaded, and that each part loaded on first use works the first time.

The uplink runs as ``run_uplink.py`` starts it (ingress on, so the Claude Code
endpoint too), in a subprocess, connected to a real websockets gateway peer,
with a real local JSON-RPC server for MCP replays. A SIGUSR2 handler installed
before ``run_uplink.main`` writes the process's ``sys.modules`` to a file: the
uplink's own code runs unchanged.

Idle, the heavy libraries are not loaded (the MCP SDK with pydantic and
Starlette, httpx with click and pygments, prometheus_client), nor anything of
the gateway (SQLAlchemy, ``sled_gateway``). Then the first permission, the
first MCP replay, the first ``/metrics`` and the first Claude Code permission
prompt on ``/mcp`` each work, and load what they need. With those libraries
broken (a shadowing module that raises ImportError), the uplink still starts
and connects, permissions are still decided, ``/mcp`` answers a JSON 503 and
the MCP replay a JSON-RPC error: a lazy import adds no failure mode of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import closed_port, scaled
from tests.support.gateway import Gateway
from tests.support.mcp_servers import RecordingJsonServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
T = scaled(15.0)

#: Top-level packages an idle uplink must not have loaded (some load on first use).
LAZY = (
    "mcp",
    "mcp_types",
    "pydantic",
    "starlette",
    "httpx",
    "httpcore",
    "aiohttp",
    "httpx_aiohttp",
    "prometheus_client",
)
#: The gateway's side: never part of the uplink.
NEVER = ("sled_gateway", "sqlalchemy", "alembic")

PROBE = """
import json, os, signal, sys

def dump(_signum, _frame):
    path = os.environ["MODULES_OUT"]
    with open(path + ".tmp", "w") as out:
        json.dump(sorted(sys.modules), out)
    os.replace(path + ".tmp", path)

signal.signal(signal.SIGUSR2, dump)
sys.argv = ["run_uplink.py", *sys.argv[1:]]
import run_uplink
sys.exit(run_uplink.main())
"""


class ProbedUplink:
    """``run_uplink.py`` in a subprocess whose loaded modules the test can read."""

    def __init__(self, tmp: Path, gateway_url: str, local_mcp: str, env: dict[str, str]) -> None:
        self.port = closed_port()
        self.out = tmp / "modules.json"
        self.log = (tmp / "uplink.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROBE,
                "--upstream-gateway",
                gateway_url,
                "--project",
                "lazy",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--local-mcp-url",
                local_mcp,
                "--log-level",
                "INFO",
            ],
            cwd=ROOT,
            env={**env, "MODULES_OUT": str(self.out)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_connected(self) -> None:
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the uplink exited: {self.output()}"
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).json()["connected"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the uplink did not connect: {self.output()}")

    def modules(self) -> set[str]:
        """The top-level packages loaded in the uplink process now."""
        self.out.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + T
        while not self.out.exists():
            assert time.monotonic() < deadline, "the uplink did not write its modules"
            time.sleep(0.02)
        return {name.split(".")[0] for name in json.loads(self.out.read_text())}

    def output(self) -> str:
        return (self.out.parent / "uplink.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def peers() -> Iterator[tuple[Gateway, RecordingJsonServer]]:
    with Gateway(auto="approve") as gw, RecordingJsonServer() as local:
        yield gw, local


def start(
    tmp_path: Path, peers: tuple[Gateway, RecordingJsonServer], env: dict[str, str] | None = None
) -> ProbedUplink:
    gw, local = peers
    uplink = ProbedUplink(tmp_path, gw.url, local.url, env or dict(os.environ))
    uplink.wait_connected()
    return uplink


def ask_permission(uplink: ProbedUplink) -> dict[str, Any]:
    answer = httpx.post(
        f"{uplink.base}/permission",
        json={"tool_name": "Bash", "tool_input": {"command": "ls"}},
        timeout=T,
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def replay(gw: Gateway, req_id: str) -> dict[str, Any]:
    """The gateway relays one MCP request; the uplink's answer frame's payload."""
    session = gw.session(1, timeout=T)
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}})
    gw.send(session, "mcp_request", req_id, {"body": body})
    frame = gw.wait_until(
        lambda: next(
            (f for f in session.of_type("mcp_response") if f.get("req_id") == req_id), None
        ),
        T,
    )
    return dict(frame["payload"])


async def prompt(url: str) -> dict[str, Any]:
    """Claude Code's permission prompt through the MCP SDK's own client."""
    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool(
            "permission_prompt",
            {"tool_name": "Bash", "input": {"command": "ls"}, "tool_use_id": "toolu_lazy"},
        )
    return dict(json.loads(result.content[0].text))


def test_an_idle_uplink_has_not_loaded_what_it_loads_on_first_use(
    tmp_path: Path, peers: tuple[Gateway, RecordingJsonServer]
) -> None:
    gw, _local = peers
    uplink = start(tmp_path, peers)
    try:
        time.sleep(0.5)  # settled: the start's own helper threads have run
        idle = uplink.modules()
        assert "actors" in idle and "uvicorn" in idle, "the probe sees the uplink's modules"
        assert sorted(idle & set(LAZY)) == []
        assert sorted(idle & set(NEVER)) == []

        # The first permission after idle: decided by the gateway, nothing more loaded.
        assert ask_permission(uplink)["behavior"] == "allow"
        assert sorted(uplink.modules() & set(LAZY)) == []

        # The first MCP replay: answered, httpx on aiohttp's engine loaded for it.
        answer = replay(gw, "m1")
        assert answer["id"] == 7 and "result" in answer, answer
        assert {"httpx", "aiohttp", "httpx_aiohttp"} <= uplink.modules()

        # The first scrape: Prometheus text, prometheus_client loaded for it.
        metrics = httpx.get(f"{uplink.base}/metrics", timeout=T)
        assert metrics.status_code == 200
        assert "sled_uplink_connection_state" in metrics.text
        assert "prometheus_client" in uplink.modules()

        # The first Claude Code permission prompt: the MCP SDK loads, the gateway decides.
        assert httpx.get(f"{uplink.base}/status").json()["ingress"]["mcp"] == "not_loaded"
        assert asyncio.run(prompt(f"{uplink.base}/mcp")) == {
            "behavior": "allow",
            "updatedInput": {"command": "ls"},
        }
        assert {"mcp", "pydantic"} <= uplink.modules()
        assert httpx.get(f"{uplink.base}/status").json()["ingress"]["mcp"] == "ready"
        assert sorted(uplink.modules() & set(NEVER)) == []
    finally:
        uplink.stop()
    assert uplink.proc.returncode == 0, uplink.output()


BROKEN = 'raise ImportError("{name} is broken in this test")\n'


def test_broken_lazy_libraries_fail_their_first_use_closed(
    tmp_path: Path, peers: tuple[Gateway, RecordingJsonServer]
) -> None:
    gw, _local = peers
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("mcp_types", "httpx", "prometheus_client"):
        (shadow / f"{name}.py").write_text(BROKEN.format(name=name))
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    uplink = start(tmp_path, peers, env)
    try:
        # Permissions do not depend on any of them.
        assert ask_permission(uplink)["behavior"] == "allow"

        # /mcp: a JSON 503 (after the load fails), the same on the next call.
        for _ in range(2):
            answer = httpx.post(
                f"{uplink.base}/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                headers={"Accept": "application/json, text/event-stream"},
                timeout=T,
            )
            assert answer.status_code == 503
            assert "not available" in answer.json()["error"]
        assert httpx.get(f"{uplink.base}/status").json()["ingress"]["mcp"] == "unavailable"

        # The MCP replay: a JSON-RPC error for the request's own id.
        payload = replay(gw, "m1")
        assert payload["id"] == 7
        assert "cannot load" in payload["error"]["message"]

        # /metrics: a JSON 500, like any failing handler.
        metrics = httpx.get(f"{uplink.base}/metrics", timeout=T)
        assert metrics.status_code == 500 and "error" in metrics.json()

        # And the uplink is still up and deciding.
        assert ask_permission(uplink)["behavior"] == "allow"
        assert httpx.get(f"{uplink.base}/healthz").json()["connected"] is True
    finally:
        uplink.stop()
    assert uplink.proc.returncode == 0, uplink.output()
