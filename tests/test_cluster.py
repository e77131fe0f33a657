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
import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

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
    """The replica whose hub holds ``project``'s socket; None while none does.

    Every replica's ``/api/state`` lists the whole fleet, so each is asked
    which sleds *it* holds: those it lists with ``replica`` null (another
    replica's carry that replica's id). Two holders at once is a bug, and
    fails the test here rather than letting it pick one.
    """
    holders = []
    for replica in c.replicas:
        try:
            state = httpx.get(replica.http + "/api/state", headers=c.headers(), timeout=5).json()
        except httpx.HTTPError:
            continue  # killed, or stopped by the test
        if any(
            s["project"] == project and s["state"] == "connected" and s["replica"] is None
            for s in state["sleds"]
        ):
            holders.append(replica)
    assert len(holders) <= 1, f"{project!r} held by each of {[r.address for r in holders]}"
    return holders[0] if holders else None


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
                # HAProxy's PROXY header named this client (127.0.0.1), not HAProxy itself.
                (sled,) = [
                    s
                    for s in (await api.get("/api/state")).json()["sleds"]
                    if s["project"] == "through-haproxy"
                ]
                assert sled["remote"].startswith("127.0.0.1:"), sled["remote"]
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


DRAIN_S = 4.0
HEARTBEAT_S = 5.0


class _RollingSled:
    """A raw sled that reconnects through HAProxy as the uplink does: after a close with
    ``retry_after=<s>`` it waits a random time in ``[0, s]``. Each session asks one
    permission that nobody decides, so it is pending when its replica drains."""

    def __init__(self, cluster: Cluster, project: str) -> None:
        self.cluster, self.project = cluster, project
        self.sent: list[str] = []  # req ids, one per session that got to send its request
        self.closes: list[tuple[float, int | None, str]] = []  # (when, code, reason)
        # For each close, the req id its session sent (None: closed before it could).
        self.sent_in_closed: list[str | None] = []
        self.connected = asyncio.Event()
        self.stop = False

    @staticmethod
    async def _send(ws: ClientConnection, kind: str, req_id: str, payload: object) -> None:
        await ws.send(json.dumps({"type": kind, "req_id": req_id, "payload": payload}))

    async def _heartbeats(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._send(ws, "heartbeat", "", None)
                await asyncio.sleep(HEARTBEAT_S)

    async def _session(self, ws: ClientConnection, req_id: str) -> None:
        await self._send(ws, "identity", "identity", {"project": self.project})
        await self._send(
            ws, "perm_request", req_id, {"tool_name": "Bash", "tool_input": {"command": req_id}}
        )
        self.sent.append(req_id)
        self.connected.set()
        async for message in ws:
            frame = json.loads(message)
            if frame.get("type") == "mcp_request":
                await self._send(ws, "mcp_response", frame["req_id"], {"ok": True})
            if self.stop:
                return

    async def run(self) -> None:
        session = 0
        while not self.stop:
            try:
                ws = await connect(f"{self.cluster.sled_url}?token={SLED_TOKEN}")
            except (OSError, InvalidStatus, InvalidHandshake):
                await asyncio.sleep(random.uniform(0, 1))
                continue
            session += 1
            req_id = f"{self.project}-s{session}"
            sent_before = len(self.sent)
            async with ws:
                beat = asyncio.create_task(self._heartbeats(ws))
                try:
                    await self._session(ws, req_id)
                except ConnectionClosed:
                    pass
                finally:
                    beat.cancel()
            self.connected.clear()
            self.closes.append((time.monotonic(), ws.close_code, ws.close_reason or ""))
            self.sent_in_closed.append(req_id if len(self.sent) > sent_before else None)
            hint = re.search(r"retry_after=(\d+(?:\.\d+)?)", ws.close_reason or "")
            await asyncio.sleep(random.uniform(0, float(hint.group(1)) if hint else 1.0))


@dataclass
class RollingRestart:
    sleds: list[_RollingSled]
    relays: list[tuple[int, str | None]]  # (status, Retry-After) of each MCP call
    windows: list[tuple[int, float, float]]  # (replica, drain started, drain ended)
    audit: list[dict[str, object]]


@pytest.fixture(scope="module")
def rolling_restart() -> RollingRestart:
    """Three replicas restarted in turn with drain (SIGTERM, exit, start, ready), while
    twelve sleds hold requests through HAProxy and an MCP client calls them."""
    reason = cluster_support.skip_reason()
    if reason:
        pytest.skip(reason)
    random.seed(24)
    extra = ("--drain-seconds", f"{DRAIN_S:g}", "--mcp-timeout", "5")
    with Cluster(replicas=3, extra=extra, heartbeat_interval=HEARTBEAT_S) as cluster:

        async def scenario() -> tuple[
            list[_RollingSled], list[tuple[int, str | None]], list[tuple[int, float, float]]
        ]:
            sleds = [_RollingSled(cluster, f"roll-{i}") for i in range(12)]
            tasks = [asyncio.create_task(s.run()) for s in sleds]
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in sleds)), 30)
            relays: list[tuple[int, str | None]] = []
            done = asyncio.Event()

            async def mcp_client() -> None:
                body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
                async with httpx.AsyncClient(headers=cluster.headers(), timeout=20) as http:
                    while not done.is_set():
                        project = random.choice(sleds).project
                        try:
                            r = await http.post(f"{cluster.http}/sleds/{project}/mcp", json=body)
                            relays.append((r.status_code, r.headers.get("retry-after")))
                        except httpx.HTTPError as exc:
                            relays.append((0, type(exc).__name__))
                        await asyncio.sleep(0.1)

            client = asyncio.create_task(mcp_client())
            windows: list[tuple[int, float, float]] = []
            for i in range(len(cluster.replicas)):
                started = time.monotonic()
                assert await asyncio.to_thread(cluster.drain, i, 60) == 0
                windows.append((i, started, time.monotonic()))
                await asyncio.to_thread(cluster.replicas[i].start)
                await asyncio.to_thread(
                    eventually,
                    lambda i=i: cluster.readyz(cluster.replicas[i].http) == 200,
                    30,
                    f"replica {i} ready again",
                )
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in sleds)), 30)
            except TimeoutError:
                lost = {s.project: s.closes[-3:] for s in sleds if not s.connected.is_set()}
                raise AssertionError(f"not reconnected after the restart: {lost}") from None
            done.set()
            await client
            for s in sleds:
                s.stop = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return sleds, relays, windows

        sleds, relays, windows = asyncio.run(scenario())
        return RollingRestart(sleds, relays, windows, _read_audit(cluster))


def test_rolling_restart_moves_every_sled_spread_over_the_drain_window(
    rolling_restart: RollingRestart,
) -> None:
    sleds = rolling_restart.sleds
    for s in sleds:  # every sled was moved at least once, by a 1012 with its hint
        drained = [c for c in s.closes if c[1] == 1012]
        assert drained, (s.project, s.closes)
        assert all("retry_after=" in reason for _, _, reason in drained)
    for _i, start, end in rolling_restart.windows:  # spread over the window, not at once
        times = sorted(
            t for s in sleds for t, code, _ in s.closes if code == 1012 and start <= t <= end
        )
        if len(times) >= 3:
            assert times[-1] - times[0] >= DRAIN_S / 4, times


def test_rolling_restart_withdraws_every_request_pending_on_a_drained_session(
    rolling_restart: RollingRestart,
) -> None:
    sleds = rolling_restart.sleds
    # A session closed by a drain as it opened never sent its request: nothing to withdraw.
    drained_ids = {
        req_id
        for s in sleds
        for (_, code, _), req_id in zip(s.closes, s.sent_in_closed, strict=True)
        if code == 1012 and req_id is not None
    }
    assert drained_ids
    withdrawn = {r["req_id"] for r in rolling_restart.audit if r["decision"] == "withdrawn"}
    missing = drained_ids - withdrawn
    assert not missing, f"{len(missing)} of {len(drained_ids)} not withdrawn: {sorted(missing)}"


# A relay to a sled that is between replicas (closed by a drain, reconnecting after its
# random wait) answers 503 with Retry-After: the store keeps when it left.
def test_rolling_restart_gives_no_mcp_error_but_hinted_503s(
    rolling_restart: RollingRestart,
) -> None:
    relays = rolling_restart.relays
    bad = [(s, hint) for s, hint in relays if s != 200 and not (s == 503 and hint)]
    assert not bad, f"{len(bad)} of {len(relays)} relays: {sorted(set(bad))}"


def _read_audit(cluster: Cluster) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    before = None
    while True:
        params: dict[str, object] = {"limit": 500}
        if before is not None:
            params["before"] = before
        page = httpx.get(
            f"{cluster.replicas[0].http}/api/audit",
            params=params,
            headers=cluster.headers(),
            timeout=10,
        ).json()
        rows += page["entries"]
        before = page["next_before"]
        if before is None:
            return rows


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_postgresql_away_every_replica_refuses_and_haproxy_has_none_then_all_recover(
    cluster: Cluster, how: str
) -> None:
    project = f"pg-{how}"
    postgres = cluster.postgres
    assert postgres is not None

    async def scenario() -> None:
        async with _Sled(cluster, project) as sled:
            holder = await asyncio.to_thread(
                eventually, lambda: _holder(cluster, project), 15, "a replica holds it"
            )
            await sled.send(
                "perm_request", "r1", {"tool_name": "Bash", "tool_input": {"command": "make"}}
            )
            async with httpx.AsyncClient(
                base_url=holder.http, headers=cluster.headers(), timeout=30
            ) as api:
                await asyncio.to_thread(
                    eventually,
                    lambda: httpx.get(f"{holder.http}/api/state", headers=cluster.headers()).json()[
                        "pending"
                    ],
                    15,
                    "r1 pending",
                )
                away = time.monotonic()
                if how == "stopped":
                    await asyncio.to_thread(postgres.stop)
                else:
                    postgres.freeze()
                try:
                    for replica in cluster.replicas:  # each one's own probe: within 5 s
                        await asyncio.to_thread(
                            eventually,
                            lambda r=replica: cluster.readyz(r.http) == 503,
                            max(0.1, 5.0 - (time.monotonic() - away)),
                            f"{replica.http} 503",
                        )
                    assert cluster.readyz() == 503  # HAProxy has no ready replica left
                    r = await api.post(
                        f"/api/permissions/{project}/r1", json={"decision": "approve"}
                    )
                    assert r.status_code == 503, r.text
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(sled.frames.get(), 1)  # no allow reached it
                finally:
                    if how == "stopped":
                        await asyncio.to_thread(postgres.start)
                    else:
                        postgres.thaw()
                back = time.monotonic()
                for replica in cluster.replicas:
                    await asyncio.to_thread(
                        eventually,
                        lambda r=replica: cluster.readyz(r.http) == 200,
                        max(0.1, 10.0 - (time.monotonic() - back)),
                        f"{replica.http} back",
                    )
                while True:
                    r = await api.post(
                        f"/api/permissions/{project}/r1", json={"decision": "approve"}
                    )
                    if r.status_code in (200, 409):  # 409: a commit on the wire landed at thaw
                        break
                    assert r.status_code == 503, r.text
                    assert time.monotonic() - back < 10, "no decision within 10 s of the return"
                    await asyncio.sleep(0.2)
            audit = _read_audit(cluster)
            assert len([e for e in audit if e["req_id"] == "r1"]) == 1, audit
            if r.status_code == 200:
                answer = await asyncio.wait_for(sled.frames.get(), 10)
                assert answer["type"] == "perm_response", answer

    asyncio.run(scenario())
