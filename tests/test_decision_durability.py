"""A decision exists only once its audit row is committed.

The store is failed for real: a SQLite trigger, added to the gateway's own
database file by a second connection, makes every insert into ``audit`` raise.
A decision taken while it is there must leave the request pending (the decider
hears 503 and the sled hears nothing), and once the store works again the same
request can still be decided, exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from sled_gateway import Gateway
from tests.test_gateway import (
    APPROVE,
    DENY,
    T,
    pending_ids,
    perm_request,
    recv,
    run,
    sled,
    wait_state,
)

pytestmark = pytest.mark.timeout(60)


@contextmanager
def audit_refused(db: Path) -> Iterator[None]:
    """While inside, every insert into the audit table fails (as a full or broken disk)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit refused by the test'); END"
        )
        yield
    finally:
        conn.execute("DROP TRIGGER IF EXISTS refuse_audit")
        conn.close()


def test_an_unrecorded_decision_leaves_the_request_pending(
    make_reference_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    gw = make_reference_gateway(db=db)

    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client,
        ):
            await ws.send(perm_request("r1", "Bash", {"command": "make"}))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            with audit_refused(db):
                refused = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
                assert refused.status_code == 503, refused.text
                assert "pending" in refused.json()["error"]
                state = (await client.get("/api/state")).json()
                assert "r1" in pending_ids(state)
                assert not any(d["req_id"] == "r1" for d in state["decisions"])
                assert gw.is_pending("p", "r1")
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.3)  # the sled hears nothing yet
            decided = await client.post("/api/permissions/p/r1", json={"decision": "deny"})
            assert decided.status_code == 200, decided.text
            assert decided.json()["decided"]["decision"] == "deny"
            assert (await recv(ws))["payload"] == DENY
            again = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
            assert again.status_code == 409
            assert again.json()["decided"]["decision"] == "deny"
        rows = [r for r in gw.audit() if r["req_id"] == "r1"]
        assert [(r["decision"], r["by"]) for r in rows] == [("deny", "api")]

    run(scenario())


def test_a_rule_answer_that_cannot_be_recorded_is_a_deny_everywhere(
    make_reference_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    gw = make_reference_gateway(db=db)

    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client,
        ):
            made = await client.post("/api/rules", json={"action": "allow", "tool_name": "Read"})
            assert made.status_code == 201, made.text
            with audit_refused(db):
                await ws.send(perm_request("r2", "Read", {"file_path": "/etc/hostname"}))
                assert (await recv(ws))["payload"] == DENY  # fail closed
                state = await wait_state(
                    gw, lambda s: any(d["req_id"] == "r2" for d in s["decisions"])
                )
            shown = next(d for d in state["decisions"] if d["req_id"] == "r2")
            assert shown["decision"] == "deny"
            await ws.send(perm_request("r3", "Read", {"file_path": "/etc/hostname"}))
            assert (await recv(ws))["payload"] == {**APPROVE, "always_allow": True}

    run(scenario())
