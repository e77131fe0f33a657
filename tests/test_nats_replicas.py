"""Two ``run_gateway.py`` replicas on one real nats-server: the MCP relay across replicas.

Each replica has its own SQLite file (the shared PostgreSQL store is another
part of issue 24); what crosses between them here is only the bus. A sled
connected to replica A is reached by an MCP client that talks to replica B:
B's relay asks NATS, A's hub answers from the sled. Then NATS stops: B's
relay answers 503 at once, A still relays to its own sled, and after NATS
comes back B reaches the sled again. Then the relay's answers across two
in-process replicas, with a raw WebSocket sled on A: the round trip, 504,
502 (the sled left), 404 (nobody holds it), 503 (A stopping).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from actors import Uplink
from sled_gateway import Gateway
from tests.conftest import REFERENCE_TOKEN, eventually
from tests.support import nats as nats_support
from tests.support.mcp_servers import McpSdkServer
from tests.support.nats import NatsServer
from tests.support.proc import WatchedProcess
from tests.test_gateway import api, frame, recv, run, sled, sled_of, wait_state

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
T = 5.0 * float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
OPERATOR = "replica-operator-t0ken"
HEADERS = {"Authorization": f"Bearer {OPERATOR}"}
PROJECT = "team.web-app"  # a dot: one token on NATS, escaped at the edge


class Replica:
    def __init__(self, nats_url: str, db: Path) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HUSKIES_")
            and k not in ("SLED_GATEWAY_TOKEN", "SLED_GATEWAY_OPERATOR_TOKEN")
        }
        env.update(
            PYTHONUNBUFFERED="1",
            SLED_GATEWAY_TOKEN=REFERENCE_TOKEN,
            SLED_GATEWAY_OPERATOR_TOKEN=OPERATOR,
        )
        argv = [sys.executable, str(ROOT / "run_gateway.py"), "--listen", "127.0.0.1:0"]
        argv += ["--db", str(db), "--bus", nats_url, "--mcp-timeout", "5"]
        self.proc = WatchedProcess(argv, cwd=ROOT, env=env, timeout=3 * T)
        match = self.proc.wait_for(r"gateway listening on http://127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mcp_url(self, project: str) -> str:
        return f"{self.http}/sleds/{quote(project, safe='')}/mcp"

    def sleds(self) -> list[str]:
        state = httpx.get(f"{self.http}/api/state", headers=HEADERS, timeout=T).json()
        return [s["project"] for s in state["sleds"] if s["state"] == "connected"]


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with nats_support.running_server() as server:
        yield server


@pytest.fixture
def replicas(nats_server: NatsServer, tmp_path: Path) -> Iterator[Callable[[], Replica]]:
    made: list[Replica] = []

    def make() -> Replica:
        replica = Replica(nats_server.url, tmp_path / f"replica-{len(made)}.db")
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.proc.kill()


async def tools_via(url: str) -> dict[str, Any]:
    async with (
        streamable_http_client(url, http_client=create_mcp_http_client(headers=HEADERS)) as (
            read,
            write,
        ),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        echo = await session.call_tool("echo", {"text": "across replicas"})
        return {"server": init.server_info.name, "echo": echo.content[0].text}  # type: ignore[union-attr]


def relay(url: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    return httpx.post(url, json=body, headers=HEADERS, timeout=3 * T)


def test_an_mcp_call_to_replica_b_reaches_the_sled_held_by_replica_a(
    replicas: Callable[[], Replica],
    nats_server: NatsServer,
    make_uplink: Callable[..., Uplink],
) -> None:
    a, b = replicas(), replicas()
    with McpSdkServer(stateless=True) as server:
        uplink = make_uplink(
            f"ws://127.0.0.1:{a.port}/api/sled-uplink?token={REFERENCE_TOKEN}",
            project=PROJECT,
            local_mcp_url=server.url,
        )
        assert uplink.wait_connected(T)
        eventually(lambda: PROJECT in a.sleds(), T, "the sled connected to A")

        got = asyncio.run(asyncio.wait_for(tools_via(b.mcp_url(PROJECT)), 6 * T))
        assert got == {"server": "sled-uplink-test", "echo": "across replicas"}
        # The registry of sleds is still per replica: B relays to the sled but does not
        # list it (the shared store of issue 24 item 1 will).
        assert PROJECT not in b.sleds()

        # A sled nobody holds is still a 404 on B, after asking the bus.
        assert relay(b.mcp_url("no.such sled*")).status_code == 404

        # Larger than NATS carries (its max_payload, 1 MiB by default): a 413, not a 500.
        big = {"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x" * 1_500_000}}
        response = httpx.post(b.mcp_url(PROJECT), json=big, headers=HEADERS, timeout=3 * T)
        assert response.status_code == 413
        assert "bus" in response.json()["error"]

        nats_server.stop()
        started = time.monotonic()
        down = eventually(lambda: (r := relay(b.mcp_url(PROJECT))).status_code == 503 and r, T)
        assert "bus" in down.json()["error"]
        assert time.monotonic() - started < T
        # A relays to its own sled without NATS.
        assert relay(a.mcp_url(PROJECT)).status_code == 200

        nats_server.start()
        eventually(lambda: relay(b.mcp_url(PROJECT)).status_code == 200, 3 * T, "B relays again")


# -- the relay's answers across replicas: in-process gateways, a raw WebSocket sled on A --


@pytest.fixture
def replica(nats_server: NatsServer) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**settings: Any) -> Gateway:
        gateway = Gateway(
            token=REFERENCE_TOKEN, operator_token=OPERATOR, bus=nats_server.url, **settings
        )
        made.append(gateway.start())
        return made[-1]

    yield make
    for gw in made:
        gw.stop()


def test_relay_answers_across_replicas_round_trip_504_502_and_503_at_stop(
    replica: Callable[..., Gateway],
) -> None:
    a, b, c = replica(), replica(mcp_timeout=0.5), replica()

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=T, headers=api(b)) as http:
            async with sled(a, "p") as ws:
                # Relayed to A once A has taken the sled's identity (asked before, A has no p).
                await wait_state(a, lambda s: (sled_of(s, "p") or {}).get("state") == "connected")
                post = asyncio.create_task(http.post(b.mcp_url("p"), content='{"id":1}'))
                request = await recv(ws)
                assert request["type"] == "mcp_request"
                await ws.send(frame("mcp_response", request["req_id"], {"ok": 1}))
                assert (await post).json() == {"ok": 1}

                post = asyncio.create_task(http.post(b.mcp_url("p"), content='{"id":2}'))
                await recv(ws)  # and no answer: B's deadline passes
                assert (await post).status_code == 504

                post = asyncio.create_task(http.post(b.mcp_url("p"), content='{"id":3}'))
                await recv(ws)
            assert (await post).status_code == 502  # the sled left before answering
            await wait_state(a, lambda s: sled_of(s, "p")["state"] == "disconnected")  # type: ignore[index]
            assert (await http.post(b.mcp_url("p"), content="{}")).status_code == 404

            async with sled(a, "q") as ws:
                await wait_state(a, lambda s: (sled_of(s, "q") or {}).get("state") == "connected")
                # Asked through C (--mcp-timeout 30 s): A's stop answers before that.
                post = asyncio.create_task(http.post(c.mcp_url("q"), content='{"id":4}'))
                await recv(ws)
                await asyncio.to_thread(a.stop)
                assert (await post).status_code == 503  # A is stopping

    run(scenario())


def test_a_replica_whose_nats_is_unreachable_does_not_start_and_says_why(tmp_path: Path) -> None:
    nats_support.require()
    port = nats_support.free_port()
    proc = WatchedProcess(
        [
            sys.executable,
            str(ROOT / "run_gateway.py"),
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "gw.db"),
            "--bus",
            f"nats://gw:hunter2@127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env={**os.environ, "SLED_GATEWAY_TOKEN": REFERENCE_TOKEN, "PYTHONUNBUFFERED": "1"},
        timeout=3 * T,
    )
    try:
        assert proc.proc.wait(3 * T) == 2
        proc.wait_for(rf"--bus: cannot reach NATS at nats://\*\*\*@127\.0\.0\.1:{port}", "stderr")
        assert "--listen" not in proc.out["stderr"]
        assert "hunter2" not in proc.out["stderr"] + proc.out["stdout"]
    finally:
        proc.kill()
