"""Exactly once, judged by the history checker (tests/history.py) on real gateways.

The gateways are ``run_gateway.py`` processes; the sleds are raw websocket
clients that record every ``perm_response`` they receive and deny what is
left when their connection ends, as the uplink does; two deciders (separate
API clients) answer every pending request at the same time with conflicting
answers. The scenarios take a list of gateway base URLs (:class:`Gateways`),
so the same runs can point at several replicas: sleds and deciders are spread
over the list.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, select
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import input_sha256
from sled_gateway import Gateway as ReferenceGateway
from sled_gateway.store.fleet import DELIVERED, PENDING_REQUESTS
from sled_gateway.store.postgresql import driver_url
from tests.history import History, Verdict
from tests.support import nats as nats_support
from tests.support.proc import WatchedProcess
from tests.test_gateway import api as gw_api
from tests.test_gateway import pending_ids as gw_pending_ids
from tests.test_gateway import perm_request as gw_perm_request
from tests.test_gateway import sled as gw_sled
from tests.test_gateway import wait_state as gw_wait_state

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 10.0 * FACTOR
OPERATOR = "op-" + "x" * 40
SLED_TOKEN = "sled-" + "y" * 40
REQUESTS = 500
SLEDS = 5


# -- the gateways -------------------------------------------------------------------------


class GatewayProcess(WatchedProcess):
    """One ``run_gateway.py`` on loopback, with its own database file."""

    def __init__(self, db: Path, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
        env["SLED_GATEWAY_OPERATOR_TOKEN"] = OPERATOR
        env["SLED_GATEWAY_TOKEN"] = SLED_TOKEN
        super().__init__(
            [
                sys.executable,
                str(ROOT / "run_gateway.py"),
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(db),
                "--log-level",
                "INFO",
                "--max-pending-per-sled",
                str(REQUESTS),
                *extra,
            ],
            cwd=ROOT,
            env=env,
            timeout=T,
        )
        self.db = db
        self.extra = extra
        self.port = int(self.wait_for(r"gateway listening on http://[^\s]+:(\d+)").group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Gateways:
    """The gateways a scenario runs against: their base URLs, and how to kill one."""

    procs: list[GatewayProcess]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def kill(self, i: int) -> None:
        """``kill -9`` (no drain, nothing flushed)."""
        self.procs[i].kill()

    def restart(self, i: int) -> None:
        """Start it again on the same port and database."""
        old = self.procs[i]
        old.kill()  # reaps it and closes its pipes (it has exited already)
        self.procs[i] = GatewayProcess(old.db, old.port, old.extra)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    made = Gateways([GatewayProcess(tmp_path / "gateway.db")])
    yield made
    for p in made.procs:
        p.kill()


#: The replicas' sweep and lease (short, so a dead replica is released in seconds).
SWEEP_S = 0.5
LEASE_S = 3.0


@pytest.fixture
def nats_url() -> Iterator[str]:
    with nats_support.running_server() as server:
        yield server.url


def replica_options(nats: str) -> tuple[str, ...]:
    return ("--bus", nats, "--sweep-interval", str(SWEEP_S), "--lease-seconds", str(LEASE_S))


@pytest.fixture
def replicas(pg_url: str, nats_url: str) -> Iterator[Gateways]:
    """Two replicas on one PostgreSQL database and one nats-server: one gateway."""
    made = Gateways([])
    try:
        for _ in range(2):
            made.procs.append(GatewayProcess(pg_url, extra=replica_options(nats_url)))  # type: ignore[arg-type]
        yield made
    finally:
        for p in made.procs:
            p.kill()


# -- the parties --------------------------------------------------------------------------


@dataclass
class RawSled:
    """A sled as the gateway sees it: identity, ``perm_request``s, and what comes back."""

    project: str
    base_url: str
    history: History
    outstanding: set[str] = field(default_factory=set)
    ws: ClientConnection | None = None
    reader: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        url = self.base_url.replace("http://", "ws://") + f"/api/sled-uplink?token={SLED_TOKEN}"
        self.ws = await connect(url, max_size=None)
        await self.send("identity", "identity", {"project": self.project})
        self.reader = asyncio.create_task(self._read())

    async def send(self, kind: str, req_id: str, payload: Any) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": kind, "req_id": req_id, "payload": payload}))

    async def ask(self, req_id: str) -> None:
        self.outstanding.add(req_id)
        self.history.sent(self.project, req_id)
        await self.send(
            "perm_request", req_id, {"tool_name": "Bash", "tool_input": {"command": req_id}}
        )

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for message in self.ws:
                frame = json.loads(message)
                if frame.get("type") != "perm_response":
                    continue
                req_id = frame["req_id"]
                # Whatever arrives is recorded: a second answer is the checker's to find.
                self.history.delivered(self.project, req_id, frame["payload"])
                self.outstanding.discard(req_id)
        except (ConnectionClosed, OSError):
            pass
        finally:
            # The uplink fails closed: what was not answered is denied by the sled.
            for req_id in sorted(self.outstanding):
                self.history.denied_by_sled(self.project, req_id, "session ended")
            self.outstanding.clear()
            self.ended.set()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        assert self.ws is not None
        self.ws.transport.abort()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


def client(base_url: str, token: str = OPERATOR) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=T,
        # Three deciders stay under the gateway's --max-connections-per-client (32):
        # beyond it, the gateway closes a client's oldest connections by design.
        limits=httpx.Limits(max_connections=10),
    )


async def vote(
    api: httpx.AsyncClient, name: str, history: History, project: str, req_id: str, value: str
) -> None:
    """One decider's answer; a refused connection or a timeout is recorded as status 0."""
    try:
        r = await api.post(f"/api/permissions/{project}/{req_id}", json={"decision": value})
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    history.voted(name, project, req_id, value, status)


async def bulk_vote(
    api: httpx.AsyncClient,
    name: str,
    history: History,
    chunk: list[tuple[str, str]],
    value: str,
) -> None:
    """One bulk decision of ``chunk``; each item's own status is its vote's."""
    items = [
        {"project": p, "req_id": r, "input_sha256": input_sha256({"command": r})} for p, r in chunk
    ]
    try:
        r = await api.post("/api/permissions/decide", json={"decision": value, "items": items})
        statuses = [int(x["status"]) for x in r.json()["results"]] if r.status_code == 200 else []
    except httpx.HTTPError:
        statuses = []
    for (project, req_id), status in zip(chunk, statuses or [0] * len(chunk), strict=True):
        history.voted(name, project, req_id, value, status)


async def pending_count(api: httpx.AsyncClient) -> int:
    r = await api.get("/api/state")
    r.raise_for_status()
    return len(r.json()["pending"])


async def read_audit(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if before is not None:
            params["before"] = before
        r = await api.get("/api/audit", params=params)
        r.raise_for_status()
        page = r.json()
        rows.extend(page["entries"])
        before = page["next_before"]
        if before is None:
            return rows


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Run:
    history: History
    sleds: list[RawSled]
    statuses: dict[tuple[str, str], list[int]]
    verdict: Verdict | None = None


async def burst(
    urls: list[str],
    *,
    seed: int,
    during: Any = None,
    after_votes: int = REQUESTS // 2,
    bulk: int = 0,
    people: dict[str, str] | None = None,
) -> Run:
    """``REQUESTS`` pending requests over ``SLEDS`` sleds, each decided by two deciders
    at once (approve and deny, in random order); ``during(run)`` is awaited once
    ``after_votes`` requests' votes have been sent. ``bulk``: the second decider sends
    ``POST /api/permissions/decide`` with this many items (one value for them all).
    ``people``: the deciders instead, by name and API token, all approving but one."""
    rng = random.Random(seed)
    history = History()
    sleds = [RawSled(f"sled{i}", urls[i % len(urls)], history) for i in range(SLEDS)]
    for s in sleds:
        await s.start()
    ids = [(sleds[i % SLEDS], f"r{i:04d}") for i in range(REQUESTS)]
    for s, req_id in ids:
        await s.ask(req_id)
    first = client(urls[0])
    try:
        await until(lambda: _at_least(first, REQUESTS), T, f"{REQUESTS} requests pending")
    finally:
        await first.aclose()
    deciders = (
        [
            (name, client(urls[i % len(urls)], token))
            for i, (name, token) in enumerate(people.items())
        ]
        if people
        else [
            ("api-A", client(urls[0])),
            ("bulk-B" if bulk else "api-B", client(urls[1 % len(urls)])),
        ]
    )
    run = Run(history, sleds, {})
    try:
        keys = [(s.project, req_id) for s, req_id in ids]
        rng.shuffle(keys)
        size = max(bulk, 1)
        chunks: list[tuple[list[str], list[tuple[str, str]]]] = []
        for at in range(0, len(keys), size):
            values = ["approve"] * (len(deciders) - 1) + ["deny"]
            rng.shuffle(values)
            chunks.append((values, keys[at : at + size]))
        semaphore = asyncio.Semaphore(40 // size or 1)
        started = 0
        triggered = asyncio.Event()

        async def decide(values: list[str], chunk: list[tuple[str, str]]) -> None:
            nonlocal started
            async with semaphore:
                started += len(chunk)
                if during is not None and started >= after_votes and not triggered.is_set():
                    triggered.set()
                if bulk:
                    (a_name, a_api), (b_name, b_api) = deciders
                    await asyncio.gather(
                        *(vote(a_api, a_name, history, p, r, values[0]) for p, r in chunk),
                        bulk_vote(b_api, b_name, history, chunk, values[1]),
                    )
                    return
                await asyncio.gather(
                    *(
                        vote(api, name, history, *chunk[0], value)
                        for (name, api), value in zip(deciders, values, strict=True)
                    )
                )

        tasks = [asyncio.create_task(decide(*c)) for c in chunks]
        if during is not None:
            await triggered.wait()
            await during(run)
        await asyncio.gather(*tasks)
    finally:
        for _, api in deciders:
            await api.aclose()
    for e in history.events:
        if e.kind == "voted":
            assert e.status is not None
            run.statuses.setdefault(e.key, []).append(e.status)
    return run


async def _at_least(api: httpx.AsyncClient, n: int) -> bool:
    return await pending_count(api) >= n


async def settle(run: Run, urls: list[str]) -> Verdict:
    """Wait until every sled has settled what it asked (or its session ended), end the
    sessions, read the audit, and judge."""

    async def settled() -> bool:
        return all(not s.outstanding or s.ended.is_set() for s in run.sleds)

    await until(settled, T, "every request answered at its sled")
    for s in run.sleds:
        await s.close()
    api = client(urls[0])
    try:
        run.history.audited(await read_audit(api))
    finally:
        await api.aclose()
    verdict = run.history.check()
    print(f"\nVERDICT {verdict}")
    return verdict


# -- the runs --------------------------------------------------------------------------------


def test_two_conflicting_deciders_get_one_200_and_one_409_per_request(
    gateways: Gateways,
) -> None:
    async def scenario() -> Verdict:
        run = await burst(gateways.urls, seed=1)
        verdict = await settle(run, gateways.urls)
        assert sorted(map(sorted, run.statuses.values())) == [[200, 409]] * REQUESTS
        return verdict

    verdict = asyncio.run(scenario())
    assert verdict.ok, str(verdict)
    c = verdict.counts
    assert (c["sent"], c["votes_200"], c["votes_409"]) == (REQUESTS, REQUESTS, REQUESTS)
    assert (c["audit_decisions"], c["delivered"]) == (REQUESTS, REQUESTS)
    assert c.get("audit_withdrawn", 0) == 0


def test_two_conflicting_deciders_on_two_replicas_get_one_200_and_one_409_per_request(
    replicas: Gateways,
) -> None:
    """The sleds are spread over two replicas, and so are the deciders: each request is
    decided at once on both replicas, with conflicting answers."""
    test_two_conflicting_deciders_get_one_200_and_one_409_per_request(replicas)


def test_a_single_decider_against_a_bulk_decider(gateways: Gateways) -> None:
    async def scenario() -> Run:
        run = await burst(gateways.urls, seed=6, bulk=25)
        run.verdict = await settle(run, gateways.urls)
        return run

    run = asyncio.run(scenario())
    assert run.verdict is not None and run.verdict.ok, str(run.verdict)
    assert sorted(map(sorted, run.statuses.values())) == [[200, 409]] * REQUESTS
    assert run.verdict.counts["audit_decisions"] == run.verdict.counts["delivered"] == REQUESTS


@pytest.mark.parametrize("seed", [2, 3])
def test_sleds_disconnecting_mid_burst(gateways: Gateways, seed: int) -> None:
    async def drop(run: Run) -> None:
        run.sleds[0].abort()  # no close frame
        await run.sleds[1].close()  # with a close frame

    async def scenario() -> Verdict:
        run = await burst(gateways.urls, seed=seed, during=drop)
        return await settle(run, gateways.urls)

    verdict = asyncio.run(scenario())
    assert verdict.ok, str(verdict)
    c = verdict.counts
    assert c["denied_by_sled"] > 0 and c["audit_withdrawn"] > 0, c


def killed_mid_burst(gateways: Gateways, seed: int) -> Verdict:
    """The burst, with the first gateway killed (-9) half-way and started again."""

    async def kill(run: Run) -> None:
        await asyncio.to_thread(gateways.kill, 0)

    async def scenario() -> Verdict:
        run = await burst(gateways.urls, seed=seed, during=kill)
        await asyncio.to_thread(gateways.restart, 0)
        return await settle(run, gateways.urls)

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "seed", [4, *(pytest.param(s, marks=pytest.mark.slow) for s in range(100, 120))]
)
def test_a_gateway_killed_mid_burst_loses_and_duplicates_no_decision(
    gateways: Gateways, seed: int
) -> None:
    """One seeded run always; twenty more behind ``-m slow`` (each about 6 s)."""
    verdict = killed_mid_burst(gateways, seed=seed)
    # What a kill -9 of the one process must never do: two outcomes, an answer the
    # audit does not hold, a 200 the audit lost. (The requests it held pending are
    # the next test's.)
    assert set(verdict.kinds()) <= {"unaccounted"}, str(verdict)
    c = verdict.counts
    # A decision committed just before the kill may have reached neither its decider
    # nor its sled (counted as decided_undelivered): more rows than 200s, never fewer.
    assert 0 < c["votes_200"] <= c["audit_decisions"], c
    assert c["denied_by_sled"] >= c.get("violations", 0), c


@pytest.mark.xfail(
    strict=True,
    reason="one embedded gateway keeps pending requests in memory only: those pending at a "
    "kill -9 never get an audit row (replicas on PostgreSQL do: the next test)",
)
def test_a_gateway_killed_mid_burst_accounts_for_every_request(gateways: Gateways) -> None:
    verdict = killed_mid_burst(gateways, seed=5)
    assert verdict.ok, str(verdict)


def handed_over_by(store_url: str, replica: str) -> set[tuple[str, str]]:
    """The requests whose answers ``replica`` recorded delivered in the shared store.

    "Delivered" means handed to the sled's connection: the frames have no
    acknowledgement. An answer handed over just before a kill -9 can die with the
    socket, so its sled denies the request, and no survivor may record undelivered a
    row that says delivered."""
    engine = create_engine(driver_url(make_url(store_url)))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(PENDING_REQUESTS.c.project, PENDING_REQUESTS.c.req_id).where(
                    PENDING_REQUESTS.c.state == DELIVERED, PENDING_REQUESTS.c.replica == replica
                )
            ).all()
    finally:
        engine.dispose()
    return {(row.project, row.req_id) for row in rows}


def replica_id(proc: WatchedProcess) -> str:
    """The id a replica names itself by in the shared store."""
    return proc.wait_for(r"replica (\w+) on the shared store").group(1)


async def final_after_kill(
    run: Run, survivor: str, killed_at: float, *, store_url: str, killed: str
) -> tuple[Verdict, float]:
    """After a replica's kill -9 mid burst: wait until every sled settled, end the
    sessions, then re-read the audit on ``survivor`` until the checker is content and
    every decision the dead replica's sleds never got is recorded undelivered (its
    lease expired, a survivor released it) or was recorded delivered by the replica
    ``killed`` (:func:`handed_over_by`), or ``LEASE_S`` + 15 s have passed.
    The last verdict, and how long after the kill it came."""

    async def settled() -> bool:
        return all(not s.outstanding or s.ended.is_set() for s in run.sleds)

    # The bound (final within 15 s of the lease expiring) for the sleds too: a
    # survivor's sled waits for the sweep, which a loaded machine slows beyond T.
    deadline = killed_at + LEASE_S + 15.0 * FACTOR
    await until(settled, deadline - time.monotonic(), "every request answered at its sled")
    for s in run.sleds:
        await s.close()
    handed_over: set[tuple[str, str]] | None = None
    while True:
        history = History()
        history.events = list(run.history.events)
        api = client(survivor)
        try:
            history.audited(await read_audit(api))
        finally:
            await api.aclose()
        verdict = history.check()
        # (A row may also say undelivered of an answer the sled did get: the replica
        # died between sending it and recording that.)
        undelivered = {
            (r["project"], r["req_id"])
            for r in history.audit_rows
            if r["decision"] == "undelivered"
        }
        denied = {e.key for e in history.events if e.kind == "denied_by_sled"}
        decided = {
            (r["project"], r["req_id"])
            for r in history.audit_rows
            if r["decision"] in ("approve", "deny", "always_allow")
        }
        unreleased = (denied & decided) - undelivered
        if unreleased and handed_over is None:
            # Read once: a dead replica records nothing more, and a delivered row is final.
            handed_over = await asyncio.to_thread(handed_over_by, store_url, killed)
        released = not (unreleased - (handed_over or set()))
        if (verdict.ok and released) or time.monotonic() > deadline:
            return verdict, time.monotonic() - killed_at
        await asyncio.sleep(0.25)


@pytest.mark.parametrize(
    "seed", [5, *(pytest.param(s, marks=pytest.mark.slow) for s in (9, *range(200, 220)))]
)
def test_a_replica_killed_mid_burst_accounts_for_every_request(
    replicas: Gateways, pg_url: str, seed: int
) -> None:
    """kill -9 of one of two replicas half-way through the burst: its sleds deny what
    they had (their socket drops), the survivor withdraws those requests (or records
    the ones decided meanwhile as undelivered) once the dead replica's lease expires,
    and every request is final within 15 s of that."""

    killed_at: list[float] = []

    killed = replica_id(replicas.procs[0])

    async def kill(run: Run) -> None:
        await asyncio.to_thread(replicas.kill, 0)
        killed_at.append(time.monotonic())

    async def scenario() -> tuple[Verdict, float]:
        run = await burst(replicas.urls, seed=seed, during=kill)
        return await final_after_kill(
            run, replicas.urls[1], killed_at[0], store_url=pg_url, killed=killed
        )

    verdict, final_after = asyncio.run(scenario())
    print(f"\nVERDICT {verdict} (every request final {final_after:.1f} s after the kill)")
    assert verdict.ok, str(verdict)
    assert final_after < LEASE_S + 15.0 * FACTOR
    c = verdict.counts
    # The dead replica's requests were withdrawn, or decided on the survivor before
    # its lease expired (200, then recorded undelivered): either way its sleds denied them.
    assert c["denied_by_sled"] > 0, c
    assert c["denied_by_sled"] == c.get("decided_undelivered", 0) + c.get("audit_withdrawn", 0)


# -- a decision being committed when its sled disconnects ---------------------------------------


@contextmanager
def store_locked(db: Path, *, then_refuse_decisions: bool = False) -> Iterator[None]:
    """While inside, a second connection holds the database's write lock (a long
    transaction, a slow disk): the gateway's commits wait (its busy timeout is 5 s).
    ``then_refuse_decisions``: when it lets go, every audit row but a withdrawal is
    refused from then on (a trigger, committed as the lock is released)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        if then_refuse_decisions:
            conn.execute(
                "CREATE TRIGGER refuse_decisions BEFORE INSERT ON audit "
                "WHEN NEW.decision != 'withdrawn' "
                "BEGIN SELECT RAISE(ABORT, 'decisions refused by the test'); END"
            )
        yield
    finally:
        conn.execute("COMMIT" if then_refuse_decisions else "ROLLBACK")
        conn.close()


@pytest.mark.parametrize("commits", [True, False], ids=["commits", "fails"])
@pytest.mark.parametrize("how", ["disconnect", "cancel"])
def test_a_decision_committing_while_its_sled_lets_go_is_its_one_outcome(
    make_reference_gateway: Callable[..., ReferenceGateway],
    tmp_path: Path,
    commits: bool,
    how: str,
) -> None:
    """Attack: the decision's audit row is being written when the sled lets the
    request go (it disconnects, or cancels it after its own timeout). The request
    must end once: decided (the decider told 200, no withdrawal row) or withdrawn
    (no decision row), never both; a decision that fails to commit (503) leaves
    the withdrawal to follow."""
    db = tmp_path / "gateway.db"
    gw = make_reference_gateway(db=db)
    history = History()

    async def scenario() -> int:
        async with httpx.AsyncClient(base_url=gw.http_url, headers=gw_api(gw), timeout=T) as api:
            async with gw_sled(gw, "p") as ws:
                await ws.send(gw_perm_request("r1"))
                history.sent("p", "r1")
                await gw_wait_state(gw, lambda s: "r1" in gw_pending_ids(s))
                with store_locked(db, then_refuse_decisions=not commits):
                    posted = asyncio.create_task(
                        api.post("/api/permissions/p/r1", json={"decision": "approve"})
                    )
                    # The decision is in the store's queue, waiting for the lock.
                    await asyncio.sleep(0.3 * FACTOR)
                    assert not posted.done()
                    if how == "disconnect":
                        await ws.close()
                        await gw_wait_state(
                            gw, lambda s: not any(x["state"] == "connected" for x in s["sleds"])
                        )
                    else:
                        # The uplink's own timeout denied it; it tells the gateway. (An
                        # answer arriving later is for an id it no longer holds: ignored.)
                        await ws.send(
                            json.dumps(
                                {
                                    "type": "perm_cancel",
                                    "req_id": "r1",
                                    "payload": {"reason": "timeout"},
                                }
                            )
                        )
                        # Frames are handled in order: once r2 is pending, the cancel was seen.
                        await ws.send(gw_perm_request("r2"))
                        history.sent("p", "r2")
                        await gw_wait_state(gw, lambda s: "r2" in gw_pending_ids(s))
                history.denied_by_sled("p", "r1", how)  # it acted on no answer
            if how == "cancel":
                history.denied_by_sled("p", "r2", "session ended")
            status = (await posted).status_code
            history.voted("api", "p", "r1", "approve", status)
            return status

    status = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    ids = {"r1"} if how == "disconnect" else {"r1", "r2"}

    def audited() -> bool:
        return {r["req_id"] for r in gw.audit()} >= ids

    gw.wait_for(lambda _s: audited(), T)
    time.sleep(0.2 * FACTOR)  # a second row written later would show by now
    history.audited(gw.audit())
    verdict = history.check()
    print(f"\nVERDICT {verdict} (the decider got {status})")
    assert verdict.ok, str(verdict)
    outcome = [r["decision"] for r in gw.audit() if r["req_id"] == "r1"]
    assert (status, outcome) == ((200, ["approve"]) if commits else (503, ["withdrawn"]))


@pytest.mark.slow  # 11 s (a burst, a stop, a restart): in CI's second pass
def test_a_gateway_stopped_mid_burst_accounts_for_every_request(gateways: Gateways) -> None:
    """SIGTERM (a deploy): the gateway closes its sleds and ends what they had pending."""

    async def stop(run: Run) -> None:
        proc = gateways.procs[0].proc
        proc.terminate()
        await asyncio.to_thread(proc.wait, T)

    async def scenario() -> Verdict:
        run = await burst(gateways.urls, seed=7, during=stop)
        await asyncio.to_thread(gateways.restart, 0)
        return await settle(run, gateways.urls)

    verdict = asyncio.run(scenario())
    assert verdict.ok, str(verdict)


# -- a quorum of two, three people at once -------------------------------------------------------

ACCESS = """
[[grant]]
who = "alice@example.test"
role = "approver"

[[grant]]
who = "bob@example.test"
role = "approver"

[[grant]]
who = "carol@example.test"
role = "approver"

[[quorum]]
rule = "Bash"
approvals = 2
"""


@pytest.mark.parametrize("where", ["one gateway", "two replicas"])
def test_a_quorum_of_two_with_three_people_voting_at_once(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """Two approve and one denies, at once, on each of 500 requests needing two approvals:
    one decision each (the deny if it came first or second, else the quorum's approve),
    told as one 200; the other votes 202 (counted) or 409 (too late). On two replicas,
    the people vote on different replicas: the ballot is counted from the store."""
    access = tmp_path / "access.toml"
    access.write_text(ACCESS)
    options = ("--access", str(access))
    if where == "one gateway":
        gateways = Gateways([GatewayProcess(tmp_path / "gateway.db", extra=options)])
    else:
        pg, nats = request.getfixturevalue("pg_url"), request.getfixturevalue("nats_url")
        extra = (*options, *replica_options(nats))
        gateways = Gateways([GatewayProcess(pg, extra=extra) for _ in range(2)])
    try:

        async def scenario() -> Run:
            people: dict[str, str] = {}
            async with client(gateways.urls[0]) as admin:
                for person in ("alice@example.test", "bob@example.test", "carol@example.test"):
                    made = await admin.post(
                        "/api/tokens", json={"person": person, "expires_in": 3600}
                    )
                    assert made.status_code == 201, made.text
                    people[person] = made.json()["token"]
            run = await burst(gateways.urls, seed=8, people=people)
            run.verdict = await settle(run, gateways.urls)
            return run

        run = asyncio.run(scenario())
    finally:
        for p in gateways.procs:
            p.kill()
    assert run.verdict is not None and run.verdict.ok, str(run.verdict)
    for key, statuses in run.statuses.items():
        assert statuses.count(200) == 1 and set(statuses) <= {200, 202, 409}, (key, statuses)
    c = run.verdict.counts
    assert c["audit_decisions"] == c["delivered"] == REQUESTS, c
