"""The store on PostgreSQL: what only a server database brings (the shared behaviour is
in ``test_store_interface.py``, run there on every engine).

A real PostgreSQL 15 (``tests/pg.py``), stopped and started where the point is
losing it; a real gateway with a raw ``websockets`` sled where the point is
what an operator and a sled see.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, text

from actors import Uplink
from protocol import Decision
from sled_gateway import Gateway
from sled_gateway.store import AlreadyRecorded, AuditEntry, Rule, Store, StoreError, make_store
from sled_gateway.store.sql import PING_AFTER_IDLE_S, SCHEMA_VERSION
from tests.pg import PG_BIN, PostgresServer
from tests.test_gateway import TOKEN, T, pending_ids, perm_request, recv, run, sled, wait_state
from tests.test_store import audit_rows

pytestmark = pytest.mark.timeout(120)

T0 = 1767225600.0


def entry(req_id: str, project: str = "p", decision: str = "approve") -> AuditEntry:
    return AuditEntry(
        project, 1, req_id, "Bash", {"command": "make"}, decision, "console", None, T0, T0 + 1
    )


def count_rows(db: str, project: str) -> int:
    reader = create_engine(make_store(db).url)
    try:
        with reader.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM audit WHERE project = :p"), {"p": project}
                ).scalar_one()
            )
    finally:
        reader.dispose()


@pytest.fixture
def make_gateway(make_reference_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    return functools.partial(make_reference_gateway, token=TOKEN)


def test_a_postgresql_url_uses_psycopg_and_hides_its_password(pg_url: str) -> None:
    with_password = pg_url.replace("sled@", "sled:hunter2@")
    store = make_store(with_password).open()  # trust auth: the password is not checked
    try:
        assert store.url.drivername == "postgresql+psycopg"
        assert "hunter2" not in store.location
    finally:
        store.close()


def test_the_store_fails_while_postgresql_is_down_and_reconnects_when_it_is_back(
    postgres: PostgresServer, pg_url: str
) -> None:
    store = make_store(pg_url).open()
    try:

        async def scenario() -> None:
            await store.record(entry("before"))
            # A restart between two operations: the next one still succeeds (its
            # connection died unseen, and is replaced before it is used).
            await asyncio.to_thread(postgres.stop)
            await asyncio.to_thread(postgres.start)
            await store.record(entry("after-restart"))
            await asyncio.to_thread(postgres.stop)
            with pytest.raises(StoreError):
                await store.record(entry("while-down"))
            with pytest.raises(StoreError):  # still down: fails again, promptly
                await asyncio.wait_for(store.record(entry("still-down")), T)
            await asyncio.to_thread(postgres.start)
            await store.record(entry("after"))  # the first operation after: no error
            assert [e.req_id for e in await store.audit()] == ["after", "after-restart", "before"]

        run(scenario())
    finally:
        store.close()


def test_a_connection_killed_between_two_quick_operations_is_replaced_unseen(pg_url: str) -> None:
    # The writer pings only a connection idle for a while; one that died between two
    # operations a few milliseconds apart is found dead by the second's first
    # statement, before any COMMIT, and that operation runs again on a new connection:
    # it succeeds, once.
    store = make_store(pg_url).open()
    killer = create_engine(make_store(pg_url).url, isolation_level="AUTOCOMMIT")
    try:

        async def scenario() -> None:
            await store.record(entry("first", project="killed"))
            with killer.connect() as conn:
                ended = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend'"
                    )
                ).scalar_one()
            assert ended >= 1
            await store.record(entry("second", project="killed"))

        run(scenario())
        assert count_rows(pg_url, "killed") == 2
    finally:
        killer.dispose()
        store.close()


def test_a_connection_ended_between_the_pings_two_statements_leaves_the_writer_serving(
    pg_url: str,
) -> None:
    # The writer pings a connection idle for a while: SELECT 1, then ROLLBACK. The server
    # can end the connection between the two (a fast shutdown, pg_terminate_backend), so
    # that the ROLLBACK is what fails. That failure must cost at most the batch, never
    # the writer thread: without it, no operation is answered again, even once the
    # server is back. The backend is ended for real, right after the ping's SELECT 1
    # (SQLAlchemy's public cursor events mark the moment).
    store = make_store(pg_url).open()
    killer = create_engine(make_store(pg_url).url, isolation_level="AUTOCOMMIT")
    armed = threading.Event()
    ended: list[int] = []

    def end_the_backend(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement != "SELECT 1" or not armed.is_set():
            return
        armed.clear()
        pid = conn.connection.dbapi_connection.info.backend_pid
        with killer.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
        ended.append(pid)

    event.listen(Engine, "after_cursor_execute", end_the_backend)
    try:

        async def scenario() -> None:
            await store.rules()
            await asyncio.sleep(PING_AFTER_IDLE_S + 0.3)  # so that the next batch pings first
            armed.set()
            assert await asyncio.wait_for(store.rules(), 2 * T) == []
            assert ended, "the ping's SELECT 1 was not seen"
            await asyncio.wait_for(store.record(entry("after", project="pinged")), 2 * T)

        run(scenario())
        assert count_rows(pg_url, "pinged") == 1
    finally:
        event.remove(Engine, "after_cursor_execute", end_the_backend)
        killer.dispose()
        store.close()


def test_a_decision_is_not_taken_while_postgresql_is_down_and_is_after(
    postgres: PostgresServer, pg_url: str, make_gateway: Callable[..., Gateway]
) -> None:
    gw = make_gateway(db=pg_url)

    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client,
        ):
            await ws.send(perm_request("r1", "Bash", {"command": "make"}))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            await asyncio.to_thread(postgres.stop)
            response = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
            assert response.status_code == 503, response.text
            assert "still pending" in response.json()["error"]
            assert gw.is_pending("p", "r1")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)  # the sled got nothing
            await asyncio.to_thread(postgres.start)
            response = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
            assert response.status_code == 200, response.text
            answer = await recv(ws)
            assert answer["type"] == "perm_response", answer
            audit = (await client.get("/api/audit")).json()
            rows = audit["entries"] if isinstance(audit, dict) else audit
            assert [(r["req_id"], r["decision"]) for r in rows] == [("r1", "approve")]

    run(scenario())


def test_an_unreachable_or_unknown_database_url_is_refused_in_one_line() -> None:
    from tests.conftest import closed_port
    from tests.test_store import GatewayProcess

    for url, said in (
        (f"postgresql://sled:hunter2@127.0.0.1:{closed_port()}/gw", "cannot open"),
        ("nosuchdb://somewhere/gw", "cannot open"),
    ):
        done = GatewayProcess("--listen", "127.0.0.1:0", "--db", url)
        try:
            assert done.proc.wait(3 * T) == 2
        finally:
            done.kill()
        stderr = done.out["stderr"]
        assert "--db" in stderr and said in stderr, stderr
        assert "Traceback" not in stderr
        assert "hunter2" not in stderr  # the password is never printed


def test_a_pg_dump_restored_into_a_new_database_is_the_same_store(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """docs/deploy.md's backup and restore, as written there."""
    store = make_store(pg_url).open()
    try:
        run(store.record(entry("kept")))
        rule = run(store.add_rule(Rule(0, "p", "Bash", "make", "allow", T0, "console")))
    finally:
        store.close()
    dump = tmp_path / "gw.dump"
    pg = postgres.url("postgres").rsplit("/", 1)[0]
    subprocess.run(
        [str(PG_BIN / "pg_dump"), "--format=custom", f"--file={dump}", pg_url], check=True
    )
    restored = postgres.create_database()
    try:
        subprocess.run(
            [str(PG_BIN / "pg_restore"), "--no-owner", f"--dbname={pg}/{restored}", str(dump)],
            check=True,
        )
        again = make_store(f"{pg}/{restored}").open()
        try:
            assert again.found_version == SCHEMA_VERSION
            assert [e.req_id for e in run(again.audit())] == ["kept"]
            assert [r.id for r in run(again.rules())] == [rule.id]
            # The sequences came along: new rows do not collide with restored ones.
            assert run(again.record(entry("new"))).id > 1
        finally:
            again.close()
    finally:
        postgres.drop_database(restored)


def test_two_replicas_deciding_the_same_requests_record_each_exactly_once(pg_url: str) -> None:
    """Two stores on one database are two gateway replicas. 200 requests, each decided
    at the same moment on both with conflicting answers: one row per request, one
    success and one AlreadyRecorded, and the row holds the winner's answer."""
    first, second = make_store(pg_url).open(), make_store(pg_url).open()
    ids = [f"r{i:03d}" for i in range(200)]

    async def decide(store: Store, req_id: str, decision: str) -> str | None:
        try:
            await store.record(replace(entry(req_id), decision=decision), once=True)
        except AlreadyRecorded:
            return None
        return decision

    async def both_at_once() -> list[tuple[str | None, str | None]]:
        pairs = await asyncio.gather(
            *(asyncio.gather(decide(first, r, "approve"), decide(second, r, "deny")) for r in ids)
        )
        return [tuple(p) for p in pairs]  # type: ignore[misc]

    try:
        outcomes = run(both_at_once())
        rows = audit_rows(pg_url, "p")
    finally:
        first.close()
        second.close()
    assert len(rows) == len(ids)  # the dict has one key per request id ...
    count = count_rows(pg_url, "p")
    assert count == len(ids), count  # ... and the table one row each
    for req_id, (a, b) in zip(ids, outcomes, strict=True):
        assert (a is None) != (b is None), (req_id, a, b)  # one success, one refusal
        assert rows[req_id] == (a or b), (req_id, rows[req_id], a, b)
    both = {o for pair in outcomes for o in pair if o}
    print(f"winners: {sorted(both)}; approve won {sum(a is not None for a, _ in outcomes)}")


def test_run_gateway_on_postgresql_with_a_real_uplink_keeps_decisions_across_a_restart(
    pg_url: str, make_uplink: Callable[..., Uplink]
) -> None:
    """The command as deployed: ``run_gateway.py --db postgresql://...``, a real uplink,
    a decision over the API; the gateway restarted on the same port and database."""
    from tests.conftest import closed_port
    from tests.test_store import OPERATOR, GatewayProcess

    port = closed_port()
    base = f"http://127.0.0.1:{port}"
    listen = ("--listen", f"127.0.0.1:{port}", "--db", pg_url)
    first = GatewayProcess(*listen)
    try:
        first.port()
        uplink = make_uplink(f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}", project="pg")
        assert uplink.wait_connected(T)
        asked = uplink.request_permission("Bash", {"command": "make"}, request_id="before")
        url = f"{base}/api/permissions/pg/before"
        while (
            r := httpx.post(url, json={"decision": "deny"}, headers=OPERATOR)
        ).status_code == 404:
            time.sleep(0.02)
        assert r.status_code == 200, r.text
        assert asked.result(T).decision is Decision.DENY
    finally:
        first.kill()
    second = GatewayProcess(*listen)
    try:
        second.port()
        assert uplink.wait_connected(3 * T)  # it reconnects by itself
        asked = uplink.request_permission("Bash", {"command": "ls"}, request_id="after")
        url = f"{base}/api/permissions/pg/after"
        while (
            r := httpx.post(url, json={"decision": "approve"}, headers=OPERATOR)
        ).status_code == 404:
            time.sleep(0.02)
        assert r.status_code == 200, r.text
        assert asked.result(T).decision is Decision.APPROVE
        listed = httpx.get(f"{base}/api/audit", headers=OPERATOR, timeout=T).json()["entries"]
        assert [(e["req_id"], e["decision"], e["project"]) for e in listed] == [
            ("after", "approve", "pg"),
            ("before", "deny", "pg"),
        ]
    finally:
        second.kill()
