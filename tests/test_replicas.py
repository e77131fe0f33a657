"""Two gateway replicas on one real PostgreSQL and one real nats-server are one gateway.

The replicas are in-process :class:`~sled_gateway.Gateway` objects (short sweeps and
leases, so the timing guarantees show in seconds); the sled is a raw WebSocket
client on replica A. B lists A's sled and its pending request, decides it, and A's
sled gets the one answer; a second decider on A gets 409. With NATS stopped, a
decision on B still reaches the sled, through A's sweep of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import ConfigError
from sled_gateway import Gateway
from sled_gateway.store.fleet import FleetStore, SledRow
from tests.conftest import REFERENCE_TOKEN
from tests.pg import PostgresServer
from tests.support import nats as nats_support
from tests.support.nats import NatsServer
from tests.support.relay import FreezableRelay
from tests.test_exactly_once import SLED_TOKEN, GatewayProcess
from tests.test_gateway import api, frame, perm_request, recv, sled, sled_of

pytestmark = pytest.mark.timeout(90)

FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 10.0 * FACTOR
OPERATOR = "replicas-operator-t0ken"
SWEEP = 0.5
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with nats_support.running_server() as server:
        yield server


@pytest.fixture
def replica(nats_server: NatsServer, pg_url: str) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**settings: Any) -> Gateway:
        gateway = Gateway(
            token=REFERENCE_TOKEN,
            operator_token=OPERATOR,
            **{
                "db": pg_url,
                "bus": nats_server.url,
                "sweep_interval": SWEEP,
                "lease_seconds": 4 * SWEEP,
                **settings,
            },
        )
        made.append(gateway.start())
        return made[-1]

    yield make
    for gw in made:
        gw.stop()


def listed(gw: Gateway, project: str, req_id: str) -> bool:
    state = gw.state()
    return any(
        s["project"] == project and s["state"] == "connected" for s in state["sleds"]
    ) and any(p["project"] == project and p["req_id"] == req_id for p in state["pending"])


def test_replica_b_lists_and_decides_a_request_of_a_sled_held_by_replica_a(
    replica: Callable[..., Gateway], nats_server: NatsServer
) -> None:
    a, b = replica(), replica()

    async def scenario() -> dict[str, float]:
        figures: dict[str, float] = {}
        async with (
            httpx.AsyncClient(base_url=a.http_url, headers=api(a), timeout=T) as on_a,
            httpx.AsyncClient(base_url=b.http_url, headers=api(b), timeout=T) as on_b,
            sled(a, "web") as ws,
        ):
            await ws.send(perm_request("r1"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "web", "r1"), T)
            seen = (await on_b.get("/api/state")).json()
            sled_row = next(s for s in seen["sleds"] if s["project"] == "web")
            assert sled_row["replica"] is not None  # held by another replica
            got = await on_b.post("/api/permissions/web/r1", json={"decision": "approve"})
            assert got.status_code == 200, got.text
            answer = await recv(ws)
            assert (answer["type"], answer["req_id"]) == ("perm_response", "r1")
            assert answer["payload"]["approved"] is True
            late = await on_a.post("/api/permissions/web/r1", json={"decision": "deny"})
            assert late.status_code == 409, late.text
            # Both replicas drop it from their lists.
            for gw in (a, b):
                await asyncio.to_thread(
                    gw.wait_for, lambda s: not any(p["req_id"] == "r1" for p in s["pending"]), T
                )

            # The bus stops: no ring reaches A, and A's sweep delivers B's decision.
            await asyncio.to_thread(nats_server.stop)
            await ws.send(perm_request("r2"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "web", "r2"), T)
            got = await on_b.post("/api/permissions/web/r2", json={"decision": "deny"})
            assert got.status_code == 200, got.text
            began = time.monotonic()
            answer = await recv(ws)
            figures["sweep_delivery_s"] = time.monotonic() - began
            assert (answer["req_id"], answer["payload"]["approved"]) == ("r2", False)
        return figures

    figures = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    print(f"\nFIGURES {figures}")
    assert figures["sweep_delivery_s"] < 4 * FACTOR
    rows = [(r["req_id"], r["decision"]) for r in a.audit() if r["project"] == "web"]
    assert sorted(rows) == [("r1", "approve"), ("r2", "deny")]


@pytest.mark.slow  # about 8 s (sweeps and leases on two replicas): in CI's second pass
def test_a_dead_replicas_pending_requests_are_withdrawn_by_a_survivor(
    replica: Callable[..., Gateway], pg_url: str, nats_server: NatsServer
) -> None:
    """kill -9 of replica A with two requests pending there: its sled's socket drops
    (the sled denies them itself), and once A's lease expires the survivor B withdraws
    both (audited), forgets A's sled, and a late decision of one gets 409."""
    b = replica()
    a = GatewayProcess(
        pg_url,  # type: ignore[arg-type]
        extra=("--bus", nats_server.url, "--sweep-interval", str(SWEEP), "--lease-seconds", "2"),
    )
    try:

        async def scenario() -> float:
            url = a.url.replace("http://", "ws://") + f"/api/sled-uplink?token={SLED_TOKEN}"
            async with connect(url) as ws:
                await ws.send(frame("identity", "identity", {"project": "web"}))
                await ws.send(perm_request("r1"))
                await ws.send(perm_request("r2"))
                await asyncio.to_thread(
                    b.wait_for, lambda _s: listed(b, "web", "r1") and listed(b, "web", "r2"), T
                )
                await asyncio.to_thread(a.kill)
                killed = time.monotonic()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), T)  # the uplink would deny both now

            def withdrawn() -> bool:
                rows = b.audit(project="web")
                return {r["req_id"] for r in rows if r["decision"] == "withdrawn"} == {"r1", "r2"}

            while not await asyncio.to_thread(withdrawn):
                assert time.monotonic() - killed < 2 + 15 * FACTOR, "not withdrawn in time"
                await asyncio.sleep(0.1)
            after = time.monotonic() - killed
            await asyncio.to_thread(
                b.wait_for,
                lambda s: not s["pending"] and not any(x["project"] == "web" for x in s["sleds"]),
                T,
            )
            async with httpx.AsyncClient(base_url=b.http_url, headers=api(b), timeout=T) as on_b:
                late = await on_b.post("/api/permissions/web/r1", json={"decision": "approve"})
                assert late.status_code == 409, late.text
            return after

        after = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    finally:
        a.kill()
    print(f"\nFIGURES withdrawn {after:.1f} s after the kill (lease 2 s)")
    rows = b.audit(project="web")
    assert sorted((r["req_id"], r["decision"], r["by"]) for r in rows) == [
        ("r1", "withdrawn", "replica_lost"),
        ("r2", "withdrawn", "replica_lost"),
    ]


def test_a_lease_shorter_than_two_sweeps_is_refused() -> None:
    with pytest.raises(ConfigError, match="--lease-seconds"):
        Gateway(lease_seconds=3, sweep_interval=2)
    argv = ["--no-auth", "--lease-seconds", "1", "--sweep-interval", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), *argv],
        capture_output=True,
        text=True,
        timeout=T,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--lease-seconds" in done.stderr, done.stderr


def test_the_embedded_gateway_is_no_replica() -> None:
    """SQLite and the local bus: one process, its pending requests in memory only."""
    with Gateway(token=REFERENCE_TOKEN, operator_token=OPERATOR) as gw:
        assert gw._app.replicas is None and gw._app.approvals.replicas is None


@pytest.mark.slow  # about 8 s (sweeps and leases on two replicas): in CI's second pass
def test_a_replica_released_while_alive_lists_its_sled_again_and_drops_what_ended(
    replica: Callable[..., Gateway],
) -> None:
    """A survivor released replica A (A's lease renewal came late) while A lives on: A's
    pending request was withdrawn in the store, so A stops showing it; A's sled is
    listed again on B, and its next request is decided on B and delivered by A."""
    a, b = replica(), replica()
    fleet_a = a._app.replicas
    assert fleet_a is not None

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=b.http_url, headers=api(b), timeout=T) as on_b,
            sled(a, "web") as ws,
        ):
            await ws.send(perm_request("r1"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "web", "r1"), T)
            released = b.run_on_loop(
                b._app.store.release_replica(  # type: ignore[attr-defined]
                    fleet_a.id, time.time(), "replica_lost", "replica_lost", "gateway"
                )
            )
            assert await asyncio.wrap_future(released) == (1, 0)
            await asyncio.to_thread(a.wait_for, lambda s: not s["pending"], T)
            late = await on_b.post("/api/permissions/web/r1", json={"decision": "approve"})
            assert late.status_code == 409, late.text
            await ws.send(perm_request("r2"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "web", "r2"), T)
            got = await on_b.post("/api/permissions/web/r2", json={"decision": "approve"})
            assert got.status_code == 200, got.text
            answer = await recv(ws)
            assert (answer["req_id"], answer["payload"]["approved"]) == ("r2", True)

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))


def test_a_relay_to_a_sled_between_replicas_is_a_hinted_503_on_every_replica(
    replica: Callable[..., Gateway],
) -> None:
    # The store keeps when a sled left without saying goodbye, so even a replica started
    # after it left tells "reconnecting, retry" (503) from "unknown" (404).
    a, b = replica(), replica()

    def relay(gw: Gateway, project: str) -> httpx.Response:
        return httpx.post(gw.mcp_url(project), content="{}", headers=api(gw), timeout=T)

    async def scenario() -> None:
        async with sled(a, "moving") as ws:
            ws.transport.abort()  # lost, as a killed replica's or a dropped link's sleds are
        async with sled(a, "stopped"):
            pass  # a normal close (1000): the sled stopped
        await asyncio.to_thread(
            b.wait_for,
            lambda s: (
                not any(x["project"] == "moving" and x["state"] == "connected" for x in s["sleds"])
            ),
            T,
        )

    asyncio.run(scenario())
    c = replica()  # knows nothing of the sled but what the store says
    for gw in (a, b, c):
        moving = relay(gw, "moving")
        assert moving.status_code == 503, moving.text
        assert moving.headers["retry-after"] == "1"
        assert "reconnecting" in moving.json()["error"]
        assert relay(gw, "stopped").status_code == 404
        assert relay(gw, "never-seen").status_code == 404


def _relay_started(gw: Gateway, project: str, timeout: float) -> asyncio.Task[httpx.Response]:
    """An MCP relay to ``project`` through ``gw``, under way in the background."""
    return asyncio.create_task(
        asyncio.to_thread(
            httpx.post,
            gw.mcp_url(project),
            content='{"jsonrpc":"2.0","id":1,"method":"ping"}',
            headers=api(gw),
            timeout=timeout,
        )
    )


async def _answered_by_new(
    new: ClientConnection, asking: asyncio.Task[httpx.Response], timeout: float
) -> None:
    """The relay ``asking`` reaches the sled's ``new`` session, and comes back with its answer."""
    request = await recv(new)
    assert request["type"] == "mcp_request", request
    await new.send(frame("mcp_response", request["req_id"], {"from": "new"}))
    got = await asyncio.wait_for(asking, timeout)
    assert got.status_code == 200, got.text
    assert got.json() == {"from": "new"}


@pytest.mark.slow  # about 8 s (sweeps and leases on two replicas): in CI's second pass
def test_a_sled_reconnected_to_another_replica_is_let_go_by_its_old_one(
    replica: Callable[..., Gateway],
) -> None:
    """A sled whose link to A went half-open reconnects to B. Every replica serving a sled
    gets each MCP relay and the requester takes the first reply, so while A still serves
    the old session, A's "not sent" (retry) or "gone" can beat B's real answer, and a
    retry runs the call twice. A must let the old session go as one replica lets a
    replaced one go (4000), at once rather than after its missed heartbeats, and answer
    no relay for it."""
    a, b = replica(), replica()

    async def scenario() -> None:
        async with sled(a, "moved") as old:
            await asyncio.to_thread(b.wait_for, lambda s: sled_of(s, "moved") is not None, T)
            async with connect(b.url_for_sleds()) as new:
                await new.send(frame("identity", "identity", {"project": "moved"}))
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(old.recv(), T)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4000, closed.value.rcvd
                for gw in (a, b):  # both list the new session as the sled's, held by B
                    await asyncio.to_thread(
                        gw.wait_for,
                        lambda s, gw=gw: (
                            (x := sled_of(s, "moved")) is not None
                            and x["state"] == "connected"
                            and (x["replica"] is None) == (gw is b)
                        ),
                        T,
                    )
                # A relay through A is B's sled's answer: nothing from A's old session.
                await _answered_by_new(new, _relay_started(a, "moved", T), T)

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))


def test_a_relay_in_flight_to_a_sleds_old_session_is_answered_by_its_new_one(
    replica: Callable[..., Gateway],
) -> None:
    """A relay through A reached the sled's old session on A (half-open: no answer comes)
    just before the sled reconnected to B. When A lets that session go, its "gone" (502:
    it may have run) would answer a call that never reached the sled: A defers, and the
    relay goes on over NATS to the sled's new session on B."""
    a, b = replica(), replica()

    async def scenario() -> None:
        async with sled(a, "moving") as old:
            await asyncio.to_thread(b.wait_for, lambda s: sled_of(s, "moving") is not None, T)
            asking = _relay_started(a, "moving", 3 * T)
            lost = await recv(old)  # the old link swallows it
            assert lost["type"] == "mcp_request", lost
            async with connect(b.url_for_sleds()) as new:
                await new.send(frame("identity", "identity", {"project": "moving"}))
                await _answered_by_new(new, asking, 3 * T)

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))


def _holder(gw: Gateway, project: str) -> tuple[str, int] | None:
    """The replica and session the shared store names as holding ``project``'s sled."""
    row = _row(gw, project)
    return None if row is None else (row.replica, row.session)


def _row(gw: Gateway, project: str) -> SledRow | None:
    """``project``'s row as the shared store has it, read through ``gw``'s store (whose
    writer runs it after every operation queued there before it)."""
    store = gw.store
    assert isinstance(store, FleetStore)
    sleds, _pending = gw.run_on_loop(store.fleet()).result(T)
    return next((s for s in sleds if s.project == project), None)


async def _until(predicate: Callable[[], object], what: str) -> None:
    """Poll ``predicate`` (in a thread: it may wait on a gateway's loop) until it holds."""
    deadline = time.monotonic() + T
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"{what}: not within {T:g} s"
        await asyncio.sleep(0.05)


def test_a_sled_moved_to_a_replica_whose_clock_is_behind_is_let_go_by_its_old_one(
    replica: Callable[..., Gateway],
    pg_url: str,
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Which of two replicas' sessions of a sled is the newer is the database's order of
    their rows, not the replicas' clocks. B's wall clock runs 3 s behind A's (more than
    the sled takes to move from A to B): judged by the connection times each clock wrote,
    B's session would look older than A's, and A would keep serving the sled's old,
    half-open session beside the live one. A lets it go (4000) as soon as it reads B's
    row, and the sled stays B's."""
    behind = 3.0
    # B's whole process sees its host's clock 3 s slow (its monotonic clock is its own
    # anyway). Leases of 30 s keep that skew far from making either take the other for
    # dead.
    (tmp_path / "sitecustomize.py").write_text(
        f"import time\n_real = time.time\ntime.time = lambda: _real() - {behind!r}\n"
    )
    with monkeypatch.context() as env:
        env.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
        skewed = subprocess.run(
            [sys.executable, "-c", "import time; print(time.time())"],
            capture_output=True,
            text=True,
            check=True,
            timeout=T,
        )
        assert abs(float(skewed.stdout) - (time.time() - behind)) < 1, skewed.stdout
        b = GatewayProcess(
            pg_url,  # type: ignore[arg-type]
            extra=(
                "--bus",
                nats_server.url,
                "--sweep-interval",
                str(SWEEP),
                "--lease-seconds",
                "30",
            ),
        )
    try:
        a = replica(lease_seconds=30)
        fleet_a = a.replicas
        assert fleet_a is not None

        async def scenario() -> None:
            async with sled(a, "moved") as old:
                await _until(lambda: _holder(a, "moved") is not None, "A's row of the sled")
                on_b = b.url.replace("http://", "ws://") + f"/api/sled-uplink?token={SLED_TOKEN}"
                async with connect(on_b) as new:
                    await new.send(frame("identity", "identity", {"project": "moved"}))
                    with pytest.raises(ConnectionClosed) as closed:
                        await asyncio.wait_for(old.recv(), T)
                    assert closed.value.rcvd is not None
                    assert closed.value.rcvd.code == 4000, closed.value.rcvd
                    held = await asyncio.to_thread(_holder, a, "moved")
                    assert held is not None and held[0] != fleet_a.id, held
                    # The live session stays, sweeps later.
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(new.recv(), 6 * SWEEP)
                    assert await asyncio.to_thread(_holder, a, "moved") == held

        asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    finally:
        b.kill()


@pytest.mark.slow  # about 8 s (sweeps and leases on two replicas): in CI's second pass
def test_a_hold_that_waited_past_its_sessions_end_writes_nothing(
    replica: Callable[..., Gateway], postgres: PostgresServer, pg_url: str
) -> None:
    """A's link to the database stalls (for less than a store operation's timeout) while
    the sled connects to A and leaves again, then connects to B, whose row commits. A's
    hold of the ended session waited behind the stall: committed now, it would name a
    session that is gone, after B's row. B, reading it, would let go of the live session,
    or A's let-go of the old session would erase the row and B claim the sled back a
    sweep later. A's hold sees, before it commits, that its session has ended, and
    writes nothing: B's row stands as B wrote it, and the sled's session on B stays."""
    with FreezableRelay(postgres.port) as link:
        # The same database as B's, through the relay (the port is the URL's only one).
        a = replica(db=pg_url.replace(f":{postgres.port}/", f":{link.port}/"), lease_seconds=30)
        b = replica(lease_seconds=30)
        assert a.replicas is not None and b.replicas is not None
        fleet_b = b.replicas

        async def scenario() -> None:
            link.pause()
            try:
                async with sled(a, "moved"):
                    pass  # identified on A, then gone: A's hold and let-go wait behind the stall
                async with connect(b.url_for_sleds()) as new:
                    await new.send(frame("identity", "identity", {"project": "moved"}))
                    await _until(
                        lambda: (row := _row(b, "moved")) is not None and row.replica == fleet_b.id,
                        "B's row of the sled",
                    )
                    written = await asyncio.to_thread(_row, b, "moved")
                    link.resume()
                    # A's read runs after its hold and its let-go: both have answered.
                    await asyncio.to_thread(_row, a, "moved")
                    # Sweeps of both replicas later, the row is B's as it wrote it, and
                    # the session is still live.
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(new.recv(), 6 * SWEEP)
                    assert await asyncio.to_thread(_row, b, "moved") == written
            finally:
                link.resume()

        try:
            asyncio.run(asyncio.wait_for(scenario(), 6 * T))
        finally:
            a.stop()  # while its link to the database still stands (idempotent)


def test_a_replica_never_claims_back_a_sled_that_another_replica_holds(pg_url: str) -> None:
    """The sled's link to A went half-open with A's writes to it stuck (its socket
    buffers full), and the sled reconnected to B. A lets the old session go, but its
    close waits behind those writes, so A still has the session for a while. Were A's
    sweep to claim the sled back for it meanwhile, as it re-claims sleds after a
    release, B would read A's row as newer than its own and close the sled's live
    session (4000), and again whenever the sled came back while A held the old one."""
    # The in-process bus: no rings, so every sweep of each replica reads the whole fleet
    # (where a replica re-claims its sleds), and an MCP relay has no size cap of a bus.
    made = [
        Gateway(
            token=REFERENCE_TOKEN,
            operator_token=OPERATOR,
            db=pg_url,
            sweep_interval=SWEEP,
            lease_seconds=4 * SWEEP,
        ).start()
        for _ in range(2)
    ]
    a, b = made
    assert a.replicas is not None and b.replicas is not None
    fleet_b = b.replicas
    logged: list[str] = []
    sink = logger.add(
        lambda m: logged.append(str(m)),
        level="DEBUG",
        format="{message}",
        filter="sled_gateway.hub",
    )

    def said(words: str) -> bool:
        return any(words in line for line in logged)

    async def scenario() -> None:
        # A socket with little room to receive, and frames not compressed: A's writes to
        # it fill its buffers (the kernel's, then A's own) and stay there.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", a.port))
        async with connect(
            a.url_for_sleds(), sock=sock, compression=None, max_size=None, close_timeout=1
        ) as old:
            await old.send(frame("identity", "identity", {"project": "moved"}))
            await asyncio.to_thread(
                b.wait_for, lambda s: (x := sled_of(s, "moved")) is not None and x["replica"], T
            )
            old.transport.pause_reading()  # half-open: nothing it is sent is read
            padding = "x" * (6 << 20)
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": padding})
            relay = asyncio.create_task(
                asyncio.to_thread(
                    httpx.post, a.mcp_url("moved"), content=body, headers=api(a), timeout=3 * T
                )
            )
            await _until(lambda: said("relaying MCP request"), "the relay reaching the sled")
            async with connect(b.url_for_sleds()) as new:
                await new.send(frame("identity", "identity", {"project": "moved"}))
                await _until(
                    lambda: said(f"a newer session on replica {fleet_b.id}"),
                    "A letting its session of the sled go",
                )
                # Sweeps of both replicas later, B's session is the sled's still.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(new.recv(), 6 * SWEEP)
                live = sled_of(b.state(), "moved")
                assert live is not None and live["replica"] is None, live
                assert await asyncio.to_thread(_holder, b, "moved") == (
                    fleet_b.id,
                    live["session"],
                )
                # A's close of the old session still waits behind the relay's frame.
                mine = sled_of(a.state(), "moved")
                assert mine is not None and mine["replica"] is None, mine
                assert mine["disconnected_at"] is None, mine
                # The old link reads again: behind the relay comes A's close (4000).
                old.transport.resume_reading()
                assert (await recv(old))["type"] == "mcp_request"
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(old.recv(), T)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4000, closed.value.rcvd
            with contextlib.suppress(httpx.HTTPError):
                await relay

    try:
        asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    finally:
        logger.remove(sink)
        for gw in made:
            gw.stop()


def test_a_clean_stop_gives_up_the_lease_and_ends_what_it_held_at_once(
    replica: Callable[..., Gateway],
) -> None:
    # With a lease of a minute, only the stopping replica's own release can end its
    # requests within seconds: the survivors would otherwise wait for the lease.
    a, b = replica(lease_seconds=60), replica(lease_seconds=60)

    async def scenario() -> None:
        async with sled(a, "leaving") as ws:
            await ws.send(perm_request("r1"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "leaving", "r1"), T)
            stopped_at = time.monotonic()
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(
                b.wait_for,
                lambda s: not any(p["req_id"] == "r1" for p in s["pending"]),
                T,
            )
            assert time.monotonic() - stopped_at < 15  # far below the 60 s lease
        audit = httpx.get(f"{b.http_url}/api/audit", headers=api(b), timeout=T).json()
        rows = [r for r in audit["entries"] if r["req_id"] == "r1"]
        assert [r["decision"] for r in rows] == ["withdrawn"], rows
        late = httpx.post(
            f"{b.http_url}/api/permissions/leaving/r1",
            json={"decision": "approve"},
            headers=api(b),
            timeout=T,
        )
        assert late.status_code in (404, 409), late.text
        # A's lease is gone: no survivor has anything left to release for it.
        store = b.store
        assert isinstance(store, FleetStore)
        replicas = b.run_on_loop(store.expired_replicas(time.time() + 3600)).result(T)
        assert len(replicas) == 1, replicas  # B's own only

    asyncio.run(scenario())


def test_a_ring_names_rows_and_only_the_store_says_what_they_hold(
    replica: Callable[..., Gateway], nats_server: NatsServer
) -> None:
    # Sweeps a minute apart: B learns A's sled and request from the rings alone, which
    # name the rows B then reads. A ring naming a row the store does not have shows
    # nothing; a ring B cannot read makes it re-read everything, and nothing breaks.
    import nats

    slow = {"sweep_interval": 60, "lease_seconds": 180}
    a, b = replica(**slow), replica(**slow)

    async def scenario() -> None:
        bus = await nats.connect(nats_server.url)
        try:
            async with sled(a, "rung") as ws:
                await ws.send(perm_request("r1"))
                await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "rung", "r1"), T)
                for forged in (
                    {"from": "x", "requests": [["rung", "ghost"]], "sleds": ["ghost-sled"]},
                    {"from": "x", "requests": "all", "sleds": [1]},
                    {"from": "x", "requests": [["rung"]]},
                ):
                    await bus.publish("gateway.changed", json.dumps(forged).encode())
                await bus.flush()
                await ws.send(perm_request("r2"))  # rung after the forged rings
                await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "rung", "r2"), T)
                state = b.state()
                assert not any(p["req_id"] == "ghost" for p in state["pending"])
                assert not any(s["project"] == "ghost-sled" for s in state["sleds"])
                got = httpx.post(
                    f"{b.http_url}/api/permissions/rung/r1",
                    json={"decision": "approve"},
                    headers=api(b),
                    timeout=T,
                )
                assert got.status_code == 200, got.text
                assert (await recv(ws))["req_id"] == "r1"
                await asyncio.to_thread(
                    a.wait_for, lambda s: not any(p["req_id"] == "r1" for p in s["pending"]), T
                )
                await asyncio.to_thread(
                    b.wait_for, lambda s: not any(p["req_id"] == "r1" for p in s["pending"]), T
                )
            await asyncio.to_thread(
                b.wait_for,
                lambda s: (
                    not any(
                        x["project"] == "rung" and x["state"] == "connected" for x in s["sleds"]
                    )
                ),
                T,
            )
        finally:
            await bus.close()

    asyncio.run(scenario())


def test_a_decision_that_overtakes_its_request_waits_for_it_on_another_replica(
    replica: Callable[..., Gateway],
) -> None:
    # A script (or a fast console) may POST on B before A has put the request in the
    # store: B waits for the request's ring rather than answer 404 at once. An id that
    # never comes is a 404 after the short wait; a sled connected nowhere, at once.
    a, b = replica(), replica()

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=b.http_url, headers=api(b), timeout=T) as on_b,
            sled(a, "quick") as ws,
        ):
            await asyncio.to_thread(
                b.wait_for,
                lambda s: any(
                    x["project"] == "quick" and x["state"] == "connected" for x in s["sleds"]
                ),
                T,
            )
            post = asyncio.create_task(
                on_b.post("/api/permissions/quick/early", json={"decision": "approve"})
            )
            await asyncio.sleep(0.1)  # the POST is waiting on B
            await ws.send(perm_request("early"))
            got = await post
            assert got.status_code == 200, got.text
            answer = await recv(ws)
            assert (answer["req_id"], answer["payload"]["approved"]) == ("early", True)

            began = time.monotonic()
            never = await on_b.post("/api/permissions/quick/never", json={"decision": "deny"})
            assert never.status_code == 404
            assert 0.3 < time.monotonic() - began < 5
            began = time.monotonic()
            nowhere = await on_b.post("/api/permissions/nowhere/x", json={"decision": "deny"})
            assert nowhere.status_code == 404
            assert time.monotonic() - began < 0.3

    asyncio.run(scenario())


def test_a_sealed_delivery_ring_is_sent_without_a_read_and_a_forged_one_is_not_believed(
    replica: Callable[..., Gateway], nats_server: NatsServer
) -> None:
    # B decides A's request and rings A with the decision, sealed under the key in the
    # database: A sends it without reading its decided rows. A ring from anyone else
    # (no seal, another key, a sealed ring altered or sent to another replica) only
    # makes A read the store, which has nothing decided: the sled gets nothing.
    import nats

    from sled_gateway.replicas import deliver_subject, delivery_seal

    slow = {"sweep_interval": 60, "lease_seconds": 180}
    a, b = replica(**slow), replica(**slow)
    holder = a.replicas
    assert holder is not None and b.replicas is not None
    reads: list[str] = []
    read_decided = holder.store.decided_for

    async def counted(replica_id: str) -> Any:
        reads.append(replica_id)
        return await read_decided(replica_id)

    holder.store.decided_for = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        bus = await nats.connect(nats_server.url)
        seen: list[dict[str, Any]] = []

        async def heard(msg: Any) -> None:
            seen.append(json.loads(msg.data))

        await bus.subscribe(deliver_subject(holder.id), cb=heard)
        try:
            async with sled(a, "sealed") as ws:
                await ws.send(perm_request("r1"))
                await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "sealed", "r1"), T)
                requested_at = holder.state.pending_item("sealed", "r1").received_at
                forged_fields = ["sealed", "r1", requested_at, "allow", "mallory", time.time()]
                wrong_key = b"\x01" * 32
                for forged in (
                    {"from": "x", "decided": forged_fields},
                    {"from": "x", "decided": forged_fields, "seal": "0" * 64},
                    {
                        "from": "x",
                        "decided": forged_fields,
                        "seal": delivery_seal(wrong_key, holder.id, forged_fields),
                    },
                    {"from": "x", "decided": ["sealed", "r1"], "seal": 7},
                ):
                    await bus.publish(deliver_subject(holder.id), json.dumps(forged).encode())
                await bus.flush()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(recv(ws), 1.5 * FACTOR)
                assert any(p["req_id"] == "r1" for p in a.state()["pending"])
                assert reads  # the forged rings only made A read the store

                reads.clear()
                got = httpx.post(
                    f"{b.http_url}/api/permissions/sealed/r1",
                    json={"decision": "deny"},
                    headers=api(b),
                    timeout=T,
                )
                assert got.status_code == 200, got.text
                answer = await recv(ws)
                assert (answer["req_id"], answer["payload"]["approved"]) == ("r1", False)
                assert reads == []  # sent from the sealed ring, with no read
                genuine = next(m for m in seen if m.get("from") == b.replicas.id)
                assert genuine["decided"][3] == "deny"

                # The genuine ring again, once the sled asks anew under the same id, or
                # altered to name a later request, is not believed either.
                await ws.send(perm_request("r1", tool_input={"command": "rm -rf /"}))
                await ws.send(perm_request("r2"))
                await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "sealed", "r2"), T)
                await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "sealed", "r1"), T)
                r2_at = holder.state.pending_item("sealed", "r2").received_at
                altered = dict(genuine, decided=["sealed", "r2", r2_at, *genuine["decided"][3:]])
                for ring in (genuine, altered):
                    await bus.publish(deliver_subject(holder.id), json.dumps(ring).encode())
                await bus.flush()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(recv(ws), 1.5 * FACTOR)
                pending = {p["req_id"] for p in a.state()["pending"]}
                assert pending == {"r1", "r2"}
        finally:
            await bus.close()

    asyncio.run(scenario())


@pytest.mark.slow  # about 8 s (sweeps and leases on two replicas): in CI's second pass
def test_with_the_bus_up_rings_carry_changes_and_the_whole_fleet_is_read_only_while_it_is_away(
    replica: Callable[..., Gateway], nats_server: NatsServer
) -> None:
    """At 10,000 sleds one read of the whole fleet holds the store's writer for about
    45 ms: with the bus up, a sweep must not make one, and the rings keep B current."""
    from sled_gateway.replicas import FULL_READ_EVERY

    a, b = replica(), replica()
    assert b.replicas is not None and b.store is b.replicas.store
    fleet_reads = 0
    real_fleet = b.store.fleet

    async def counted_fleet() -> Any:
        nonlocal fleet_reads
        fleet_reads += 1
        return await real_fleet()

    quiet_sweeps = FULL_READ_EVERY - 3
    assert quiet_sweeps >= 4, "the bound leaves too few sweeps to tell"

    async def scenario() -> tuple[int, int]:
        # The first sweeps read it all (nothing is known yet): let them pass.
        await asyncio.sleep(2 * SWEEP)
        b.store.fleet = counted_fleet  # type: ignore[method-assign]
        started = time.monotonic()
        async with sled(a, "rung") as ws:
            await ws.send(perm_request("q1"))
            await asyncio.to_thread(b.wait_for, lambda _s: listed(b, "rung", "q1"), T)
            await asyncio.sleep(max(0.0, quiet_sweeps * SWEEP - (time.monotonic() - started)))
            reads_with_the_bus = fleet_reads

            await asyncio.to_thread(nats_server.stop)
            deadline = time.monotonic() + T
            while fleet_reads - reads_with_the_bus < 2 and time.monotonic() < deadline:
                await asyncio.sleep(SWEEP / 5)
            reads_without = fleet_reads - reads_with_the_bus
            await asyncio.to_thread(nats_server.start)
        return reads_with_the_bus, reads_without

    with_the_bus, without = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    # Its whole-fleet reads in ~quiet_sweeps sweeps: none were due (a loaded machine may
    # stretch a sweep, never add one; one late read of the start is allowed), where a
    # sweep that re-reads everything makes one each.
    assert with_the_bus <= 1, f"{with_the_bus} whole-fleet reads with the bus up"
    # With the bus away no ring can arrive: every sweep reads it all again.
    assert without >= 2, f"{without} whole-fleet reads in {T:g} s with the bus away"
