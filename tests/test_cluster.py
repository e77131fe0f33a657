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
from websockets.asyncio.client import connect

from tests.conftest import eventually
from tests.support import cluster as cluster_support
from tests.support.cluster import SLED_TOKEN, Cluster
from tests.support.proc import WatchedProcess

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = cluster_support.skip_reason()
    if reason:
        pytest.skip(reason)
    with Cluster(replicas=3, extra=("--drain-seconds", "2")) as made:
        yield made


def _holder(c: Cluster, project: str) -> int | None:
    """The replica whose hub holds ``project``'s socket."""
    for i, replica in enumerate(c.replicas):
        try:
            state = httpx.get(replica.http + "/api/state", headers=c.headers(), timeout=5).json()
        except httpx.HTTPError:
            continue
        if any(s["project"] == project and s["state"] == "connected" for s in state["sleds"]):
            return i
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
            base = cluster.replicas[holder].http
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
