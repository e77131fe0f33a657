"""Three replicas on PostgreSQL and NATS behind HAProxy (issue 24; docs/deploy.md).

The whole cluster is real (``tests/support/cluster.py``): HAProxy's health
checks follow ``/readyz``, a sled's WebSocket crosses HAProxy, a decision
through HAProxy reaches the sled, and ``scripts/cluster.sh`` starts all of
it, prints what to paste, and leaves nothing behind on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import eventually
from tests.support import cluster as cluster_support
from tests.support.cluster import SLED_TOKEN, Cluster, Replica
from tests.support.proc import WatchedProcess

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
MCP_TIMEOUT_S = 3.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = cluster_support.skip_reason()
    if reason:
        pytest.skip(reason)
    extra = ("--drain-seconds", "2", "--mcp-timeout", f"{MCP_TIMEOUT_S:g}")
    with Cluster(replicas=3, extra=extra) as made:
        yield made


def _holder(c: Cluster, project: str) -> Replica | None:
    """The replica whose hub holds ``project``'s socket."""
    for replica in c.replicas:
        try:
            state = httpx.get(replica.http + "/api/state", headers=c.headers(), timeout=5).json()
        except httpx.HTTPError:
            continue
        if any(s["project"] == project and s["state"] == "connected" for s in state["sleds"]):
            return replica
    return None


def test_readyz_through_haproxy_and_a_sled_decided_through_it(cluster: Cluster) -> None:
    assert cluster.readyz() == 200
    for replica in cluster.replicas:
        assert cluster.readyz(replica.http) == 200

    async def scenario() -> None:
        url = f"{cluster.sled_url}?token={SLED_TOKEN}"
        async with connect(url) as ws:  # the WebSocket upgrade crosses HAProxy
            await ws.send(
                json.dumps(
                    {
                        "type": "identity",
                        "req_id": "identity",
                        "payload": {"project": "through-haproxy"},
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "perm_request",
                        "req_id": "r1",
                        "payload": {"tool_name": "Bash", "tool_input": {"command": "make"}},
                    }
                )
            )
            holder = await asyncio.to_thread(
                eventually, lambda: _holder(cluster, "through-haproxy"), 15, "a replica holds it"
            )
            base = holder.http
            async with httpx.AsyncClient(
                base_url=base, headers=cluster.headers(), timeout=10
            ) as api:
                for _ in range(100):
                    r = await api.post(
                        "/api/permissions/through-haproxy/r1", json={"decision": "approve"}
                    )
                    if r.status_code != 404:  # 404 until the request is registered
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 200, r.text
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer["type"] == "perm_response" and answer["req_id"] == "r1", answer

    asyncio.run(scenario())


def test_a_draining_replica_leaves_haproxy_and_comes_back(cluster: Cluster) -> None:
    status = cluster.drain(0, timeout=30)
    assert status == 0
    assert cluster.readyz() == 200  # the others still take sleds through HAProxy
    cluster.replicas[0].start()
    eventually(lambda: cluster.readyz(cluster.replicas[0].http) == 200, 15, "replica 0 ready")


def _descendants(pid: int) -> set[int]:
    found = [pid]
    for p in found:
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return set(found[1:])


def test_cluster_sh_starts_everything_prints_the_urls_and_ctrl_c_stops_it_all() -> None:
    reason = cluster_support.skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
    env["SLED_CLUSTER_SKIP_BOOTSTRAP"] = "1"  # the test's venv is set up already
    script = WatchedProcess(["bash", "scripts/cluster.sh"], cwd=ROOT, env=env, timeout=60)
    try:
        console = script.wait_for(r"console: (http://127\.0\.0\.1:\d+)/\S*", "stdout").group(1)
        command = script.wait_for(r"run_uplink\.py [^\n]+", "stdout").group(0)
        temp = script.wait_for(r"temp dir: (\S+)", "stdout").group(1)
        assert "--upstream-gateway ws://127.0.0.1:" in command
        assert httpx.get(console + "/readyz", timeout=10).status_code == 200
        children = _descendants(script.proc.pid)
        assert len(children) >= 6, children  # postgres, nats, haproxy, three replicas (+ theirs)
        started = time.monotonic()
        script.proc.send_signal(signal.SIGINT)  # Ctrl-C, as bash passes it on
        assert script.proc.wait(60) == 0, script.out["stderr"][-3000:]
        assert time.monotonic() - started < 60
        alive = [
            pid
            for pid in children
            if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        ]
        assert not alive, f"left running: {alive}"
        assert not Path(temp).exists()
    finally:
        for pid in _descendants(script.proc.pid):  # only when the test failed midway
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        script.kill()


class _Sled:
    """A raw sled through HAProxy that answers every ``mcp_request`` and keeps the rest."""

    def __init__(self, cluster: Cluster, project: str) -> None:
        self.cluster, self.project = cluster, project
        self.frames: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Sled:
        self.ws = await connect(f"{self.cluster.sled_url}?token={SLED_TOKEN}")
        await self.send("identity", "identity", {"project": self.project})
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.ws is not None and self.reader is not None
        await self.ws.close()
        self.reader.cancel()

    async def send(self, kind: str, req_id: str, payload: object) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": kind, "req_id": req_id, "payload": payload}))

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            frame = json.loads(message)
            if frame.get("type") == "mcp_request":
                await self.send("mcp_response", frame["req_id"], {"answered_by": "sled"})
            else:
                await self.frames.put(frame)


def test_nats_stopped_relay_fails_fast_and_decisions_still_reach_the_sled(
    cluster: Cluster,
) -> None:
    project = "nats-down"

    async def scenario() -> None:
        async with _Sled(cluster, project) as sled:
            holder = await asyncio.to_thread(
                eventually, lambda: _holder(cluster, project), 15, "a replica holds it"
            )
            near = holder.http
            far = next(r for r in cluster.replicas if r is not holder).http
            body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}

            async def relay(base: str) -> tuple[int, float]:
                started = time.monotonic()
                async with httpx.AsyncClient(headers=cluster.headers(), timeout=30) as http:
                    r = await http.post(f"{base}/sleds/{project}/mcp", json=body)
                return r.status_code, time.monotonic() - started

            assert (await relay(far))[0] == 200  # across replicas, over NATS
            assert cluster.nats is not None
            await asyncio.to_thread(cluster.nats.stop)
            status, took = await relay(far)
            assert status in (503, 504), status
            assert took < MCP_TIMEOUT_S + 2, took  # at once (503), at worst the relay's timeout
            assert (await relay(near))[0] == 200  # the holder reaches its own sled

            await sled.send(
                "perm_request", "r1", {"tool_name": "Bash", "tool_input": {"command": "make"}}
            )
            async with httpx.AsyncClient(
                base_url=near, headers=cluster.headers(), timeout=10
            ) as api:
                for _ in range(100):
                    r = await api.post(
                        f"/api/permissions/{project}/r1", json={"decision": "approve"}
                    )
                    if r.status_code != 404:
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 200, r.text
            answer = await asyncio.wait_for(sled.frames.get(), 10)
            assert answer["type"] == "perm_response" and answer["req_id"] == "r1", answer

            await asyncio.to_thread(cluster.nats.start)  # same port: the replicas reconnect
            deadline = time.monotonic() + 15
            while (await relay(far))[0] != 200:
                assert time.monotonic() < deadline, "the relay across replicas never came back"
                await asyncio.sleep(0.3)

    asyncio.run(scenario())
