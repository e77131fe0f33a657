"""The engines fail and the gateway fails closed (issue 24, "Engine failures fail closed").

PostgreSQL stopped, and frozen with ``SIGSTOP`` (every process of it: its
sockets stay open and the kernel keeps acknowledging, so nothing on the
client's side notices by itself): no decision is taken while it is away and
its deciders get ``503``, ``/readyz`` turns ``503`` within 5 s, and the
first decision after it returns succeeds within 10 s. The engines are real
(``tests/pg.py``); the sled is a raw websocket client, so what it gets is
seen as a sled sees it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sled_gateway import Gateway
from sled_gateway.store import StoreError, make_store
from sled_gateway.store.postgresql import CONNECT_TIMEOUT_S
from tests.pg import PostgresServer
from tests.test_gateway import T, pending_ids, perm_request, recv, run, sled, wait_state
from tests.test_store_postgresql import entry

pytestmark = pytest.mark.timeout(180)

#: The contract's bounds (docs/deploy.md, "When a part dies"), with room for a loaded machine
#: only where the contract gives none.
READYZ_WITHIN_S = 5.0
RECOVERY_WITHIN_S = 10.0


@pytest.fixture
def frozen_later(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """The session's server, thawed whatever the test did (later tests need it)."""
    try:
        yield postgres
    finally:
        postgres.thaw()


@pytest.mark.slow  # every operation against a frozen PostgreSQL (14 s): in CI's second pass
def test_every_store_operation_ends_while_postgresql_is_frozen_then_works_again(
    frozen_later: PostgresServer, pg_url: str
) -> None:
    postgres = frozen_later
    store = make_store(pg_url).open()
    try:

        async def scenario() -> None:
            await store.record(entry("before"))
            postgres.freeze()
            for req_id in ("while-frozen", "again"):
                started = time.monotonic()
                with pytest.raises(StoreError):
                    await asyncio.wait_for(store.record(entry(req_id)), 3 * T)
                assert time.monotonic() - started < 3 * T
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.check(2.0), 3 * T)
            # The writer thread was freed too, not only its callers: its connection was shut.
            assert store._watchdog is not None and store._watchdog.fired >= 1
            postgres.thaw()
            back = time.monotonic()
            while True:  # the first operations after the thaw may still meet the old socket
                try:
                    await store.record(entry("after"))
                    break
                except StoreError:
                    assert time.monotonic() - back < RECOVERY_WITHIN_S, "no recovery in 10 s"
                    await asyncio.sleep(0.2)
            ids = [e.req_id for e in await store.audit()]
            assert ids[0] == "after" and "before" in ids

        run(scenario())
    finally:
        postgres.thaw()
        store.close()


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        gw = Gateway(**kwargs)
        made.append(gw.start())
        return gw

    yield make
    for gw in made:
        gw.stop()


async def _until_status(client: httpx.AsyncClient, path: str, status: int, within: float) -> float:
    """Seconds until ``GET path`` answers ``status``; fails the test after ``within``."""
    started = time.monotonic()
    while True:
        try:
            if (await client.get(path, timeout=within)).status_code == status:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > within:
            raise AssertionError(f"{path} not {status} within {within:g} s")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "how",
    ["stopped", pytest.param("frozen", marks=pytest.mark.slow)],  # frozen: 16 s, second pass
)
def test_no_allow_while_postgresql_is_away_readyz_503_and_recovery_after(
    frozen_later: PostgresServer, pg_url: str, make_gateway: Callable[..., Gateway], how: str
) -> None:
    postgres = frozen_later
    gw = make_gateway(db=pg_url)

    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(
                base_url=gw.http_url, headers=gw.api_headers(), timeout=3 * T
            ) as client,
        ):
            await ws.send(perm_request("r1", "Bash", {"command": "make"}))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            assert (await client.get("/readyz")).status_code == 200
            if how == "stopped":
                await asyncio.to_thread(postgres.stop)
            else:
                postgres.freeze()
            await _until_status(client, "/readyz", 503, READYZ_WITHIN_S)
            for _ in range(2):  # the second one queues behind nothing: still bounded
                started = time.monotonic()
                response = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
                assert response.status_code == 503, response.text
                assert time.monotonic() - started < 3 * T
            assert gw.is_pending("p", "r1")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)  # the sled got nothing: no allow
            if how == "stopped":
                await asyncio.to_thread(postgres.start)
            else:
                postgres.thaw()
            await _until_status(client, "/readyz", 200, RECOVERY_WITHIN_S)
            back = time.monotonic()
            while True:
                response = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
                if response.status_code == 200:
                    break
                # A decision sent while the server was away may have reached it after all
                # (whether a commit landed is unknown to its caller): then it is decided.
                assert response.status_code in (409, 503), response.text
                if response.status_code == 409:
                    break
                assert time.monotonic() - back < RECOVERY_WITHIN_S, "no recovery in 10 s"
                await asyncio.sleep(0.2)
            audit = (await client.get("/api/audit")).json()["entries"]
            decisions = [(r["req_id"], r["decision"]) for r in audit if r["req_id"] == "r1"]
            assert len(decisions) == 1, decisions
            if response.status_code == 200:
                answer = await recv(ws)
                assert answer["type"] == "perm_response", answer

    run(scenario())


@pytest.mark.slow  # 11 s (a frozen PostgreSQL's timeouts): in CI's second pass
def test_a_gateway_started_against_a_frozen_postgresql_exits_2_with_one_line(
    frozen_later: PostgresServer, pg_url: str
) -> None:
    """The start is bounded: a replica that cannot reach its database does not hang (its
    supervisor would never restart it) but exits 2 saying why, as with NATS unreachable
    (docs/deploy.md). Frozen is the worst case: the server's port accepts connections
    (the kernel does) and nothing answers."""
    frozen_later.freeze()
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "run_gateway.py", "--listen=127.0.0.1:0", "--no-auth", "--db", pg_url],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=CONNECT_TIMEOUT_S + 60,
            check=False,
        )
    finally:
        frozen_later.thaw()  # before the test's database is dropped
    took = time.monotonic() - started
    print(f"\nFIGURES the start gave up after {took:.1f} s")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--db" in lines[0], lines
    assert ("hunter2" not in lines[0] and "***" in lines[0]) or "@" not in lines[0], lines
    assert took < CONNECT_TIMEOUT_S + 30  # the connect timeout, and room for a loaded machine
