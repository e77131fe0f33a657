"""The gateway's durable store: the audit log, rules, restarts, crashes and migrations.

Real sockets throughout: a raw ``websockets`` client or a real uplink plays
the sled, httpx the operator, ``run_gateway.py`` runs as a process where a
restart or a ``kill -9`` is the point, and every database is a real SQLite
file in the test's temporary directory. The tests that take ``db`` run on
SQLite and again on a real PostgreSQL (``tests/pg.py``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from actors import Uplink
from protocol import Decision
from sled_gateway import Gateway
from sled_gateway.policy import rule_key
from sled_gateway.store import make_store
from sled_gateway.store.sql import SCHEMA_VERSION
from tests.conftest import eventually
from tests.support.proc import WatchedProcess
from tests.test_gateway import (
    ALWAYS,
    APPROVE,
    DENY,
    ROOT,
    TOKEN,
    T,
    frame,
    pending_ids,
    perm_request,
    recv,
    run,
    sled,
    wait_state,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_gateway(make_reference_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    """conftest's gateway factory with this file's sled token (a call may still pass its own)."""
    return functools.partial(make_reference_gateway, token=TOKEN)


def http(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T)


# A DELETE changes state, so it declares a JSON body like every other change.
JSON_TYPE = {"Content-Type": "application/json"}
OPERATOR_TOKEN = "operator-t0ken-for-cli-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


class GatewayProcess(WatchedProcess):
    def __init__(self, *args: str) -> None:
        super().__init__(
            [
                sys.executable,
                str(ROOT / "run_gateway.py"),
                "--token",
                TOKEN,
                "--operator-token",
                OPERATOR_TOKEN,
                *args,
            ],
            cwd=ROOT,
            env=None,
            timeout=T,
        )

    def port(self) -> int:
        return int(self.wait_for(r"gateway listening on http://[^\s]+:(\d+)").group(1))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's gateway keeps its store: a SQLite file, or an empty PostgreSQL
    database (``--db postgresql://...``)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "gw.db")


def audit_rows(db: str, project: str) -> dict[str, str]:
    """``req_id → decision`` of a project, read straight from the database."""
    reader = create_engine(make_store(db).url)
    try:
        with reader.connect() as conn:
            found = conn.execute(
                text("SELECT req_id, decision FROM audit WHERE project = :p"), {"p": project}
            ).all()
    finally:
        reader.dispose()
    return {str(row.req_id): str(row.decision) for row in found}


@pytest.fixture
def spawn() -> Iterator[Callable[..., GatewayProcess]]:
    procs: list[GatewayProcess] = []

    def start(*args: str) -> GatewayProcess:
        p = GatewayProcess(*args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


# -- rule keys -------------------------------------------------------------------------


def test_rule_keys_are_the_whole_input_seen() -> None:
    assert rule_key("Bash", {"command": "make test", "description": "x"}) == (
        'input:{"command":"make test"}'
    )
    assert rule_key("Edit", {"file_path": "/src/a.py", "old_string": "x"}) == (
        'input:{"file_path":"/src/a.py","old_string":"x"}'
    )
    assert rule_key("WebFetch", {"url": "https://example.org"}) == (
        'input:{"url":"https://example.org"}'
    )


# -- the audit log and restarts (library) ------------------------------------------------


def test_decisions_survive_a_restart_of_the_library_gateway(
    make_gateway: Callable[..., Gateway], db: str
) -> None:
    gw = make_gateway(db=db)

    async def decide_some(gw: Gateway, prefix: str) -> None:
        async with sled(gw, "p") as ws:
            for i, choice in enumerate(("approve", "deny")):
                req = f"{prefix}-{i}"
                await ws.send(perm_request(req, "Bash", {"command": f"echo {req}"}))
                await wait_state(gw, lambda s, r=req: r in pending_ids(s))  # type: ignore[misc]
                await asyncio.to_thread(gw.decide, "p", req, choice, by="console")
                assert await recv(ws) == frame_payload(req, choice)

    run(decide_some(gw, "before"))
    gw.stop()
    gw2 = make_gateway(db=db)
    earlier = gw2.audit()
    assert [(e["req_id"], e["decision"], e["by"]) for e in earlier] == [
        ("before-1", "deny", "console"),
        ("before-0", "approve", "console"),
    ]
    assert earlier[0]["tool_input"] == {"command": "echo before-1"}
    assert earlier[0]["project"] == "p"
    assert earlier[0]["requested_at"] <= earlier[0]["decided_at"]
    run(decide_some(gw2, "after"))
    assert [e["req_id"] for e in gw2.audit()] == ["after-1", "after-0", "before-1", "before-0"]


def frame_payload(req: str, decision: str) -> dict[str, Any]:
    payloads = {"approve": APPROVE, "deny": DENY, "always_allow": ALWAYS}
    return {"type": "perm_response", "req_id": req, "payload": payloads[decision]}


def test_the_audit_records_who_withdrawn_and_invalid_requests(
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway(auto="approve")

    async def scenario() -> None:
        async with connect(gw.url_for_sleds()) as early:
            await early.send(perm_request("early"))
            assert (await recv(early))["payload"] == DENY
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("auto-1", "Write", {"file_path": "/tmp/x"}))
            assert (await recv(ws))["payload"] == APPROVE
            await ws.send(frame("perm_request", "no-tool", {"tool_input": {}}))
            assert (await recv(ws))["payload"] == DENY

    run(scenario())
    rows = {e["req_id"]: e for e in gw.audit()}
    assert rows["auto-1"]["by"] == "auto"
    assert rows["auto-1"]["decision"] == "approve"
    assert rows["auto-1"]["tool_input"] == {"file_path": "/tmp/x"}
    assert rows["no-tool"]["by"] == "invalid"
    assert rows["no-tool"]["decision"] == "deny"
    assert "tool_name" in rows["no-tool"]["reason"]
    assert rows["early"]["by"] == "invalid"
    assert "before identity" in rows["early"]["reason"]

    # Withdrawn by a disconnect (a gateway that asks a person this time).
    gw2 = make_gateway()

    async def withdraw() -> None:
        async with sled(gw2, "p") as ws:
            await ws.send(perm_request("left"))
            await wait_state(gw2, lambda s: "left" in pending_ids(s))
        await wait_state(gw2, lambda s: s["pending"] == [])

    run(withdraw())
    deadline = time.monotonic() + T
    while not (rows2 := gw2.audit()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the withdrawn row is queued without being awaited
    assert rows2[0]["req_id"] == "left"
    assert rows2[0]["decision"] == "withdrawn"
    assert rows2[0]["by"] == "sled_disconnected"


def test_audit_api_filters_and_pages_newest_first(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "gw.db"
    _fill(db, {"a": 30, "b": 12})
    gw = make_gateway(db=db, audit_retention_days=0)  # the rows are from January 2026
    with http(gw) as client:
        first = client.get("/api/audit", params={"limit": 10}).json()
        assert len(first["entries"]) == 10
        ids = [e["id"] for e in first["entries"]]
        assert ids == sorted(ids, reverse=True)
        assert first["entries"][0]["req_id"] == "b-11"  # written last
        seen = list(ids)
        cursor = first["next_before"]
        while cursor is not None:
            page = client.get("/api/audit", params={"limit": 10, "before": cursor}).json()
            seen += [e["id"] for e in page["entries"]]
            cursor = page["next_before"]
        assert len(seen) == len(set(seen)) == 42

        only_a = client.get("/api/audit", params={"project": "a", "limit": 500}).json()
        assert {e["project"] for e in only_a["entries"]} == {"a"}
        assert len(only_a["entries"]) == 30
        assert only_a["next_before"] is None
        denies = client.get("/api/audit", params={"decision": "deny", "limit": 500}).json()
        assert denies["entries"]
        assert {e["decision"] for e in denies["entries"]} == {"deny"}

        cutoff = _BASE_TIME + 20
        recent = client.get("/api/audit", params={"since": cutoff, "limit": 500}).json()
        assert recent["entries"]
        assert all(_ts(e["decided_at"]) >= cutoff for e in recent["entries"])
        iso_since = client.get(
            "/api/audit", params={"since": "2026-01-01T00:00:20", "limit": 500}
        ).json()
        assert len(iso_since["entries"]) == len(recent["entries"])

        for bad in ({"limit": "0"}, {"limit": "501"}, {"before": "x"}, {"since": "soon"}):
            response = client.get("/api/audit", params=bad)
            assert response.status_code == 400, bad
            assert "error" in response.json()
        assert client.get("/api/audit", params={"decision": "maybe"}).status_code == 400


_BASE_TIME = 1767225600.0  # 2026-01-01T00:00:00Z


def _ts(iso_text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_text).timestamp()


def _fill(db: Path, per_project: dict[str, int]) -> None:
    """Write audit rows straight into a store file (a gateway that ran before)."""
    from sled_gateway.store import AuditEntry

    store = make_store(db).open()
    try:
        futures = []
        t = _BASE_TIME
        for project, count in per_project.items():
            for i in range(count):
                decision = "deny" if i % 3 == 0 else "approve"
                entry = AuditEntry(
                    project, 1, f"{project}-{i}", "Bash", {"command": f"echo {i}"},
                    decision, "console", None, t, t + 0.5,
                )  # fmt: skip
                futures.append(store.record_later(entry))
                t += 1
        for f in futures:
            f.result(T)
    finally:
        store.close()


# -- the CLI: restart, default path, crash -------------------------------------------------


def test_cli_keeps_decisions_across_a_restart(
    spawn: Callable[..., GatewayProcess], db: str
) -> None:

    async def one_decision(port: int, req: str) -> None:
        base = f"http://127.0.0.1:{port}"
        async with (
            connect(f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}") as ws,
            httpx.AsyncClient(base_url=base, headers=OPERATOR, timeout=T) as client,
        ):
            await ws.send(frame("identity", "identity", {"project": "cli"}))
            await ws.send(perm_request(req, "Bash", {"command": "make"}))
            url = f"/api/permissions/cli/{req}"
            while (r := await client.post(url, json={"decision": "deny"})).status_code == 404:
                await asyncio.sleep(0.02)
            assert r.status_code == 200, r.text
            assert await recv(ws) == frame_payload(req, "deny")

    first = spawn("--listen", "127.0.0.1:0", "--db", db)
    run(one_decision(first.port(), "r-before"))
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(3 * T) == 0

    second = spawn("--listen", "127.0.0.1:0", "--db", db)
    port = second.port()
    run(one_decision(port, "r-after"))
    listed = httpx.get(f"http://127.0.0.1:{port}/api/audit", headers=OPERATOR, timeout=T).json()[
        "entries"
    ]
    assert [(e["req_id"], e["decision"], e["project"]) for e in listed] == [
        ("r-after", "deny", "cli"),
        ("r-before", "deny", "cli"),
    ]


def test_cli_default_db_is_in_the_users_data_dir(
    spawn: Callable[..., GatewayProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    gp = spawn("--listen", "127.0.0.1:0", "--auto", "approve")
    gp.port()
    db = tmp_path / "data" / "sled-gateway" / "gateway.db"
    assert db.exists()
    # A second gateway on the same file is refused in one line (exit 2).
    done = GatewayProcess("--listen", "127.0.0.1:0")
    assert done.proc.wait(3 * T) == 2
    done.kill()
    assert "--db" in done.out["stderr"]
    assert "in use by another gateway" in done.out["stderr"]
    assert "Traceback" not in done.out["stderr"]


def test_kill_9_during_a_burst_loses_no_decision_a_sled_received(
    spawn: Callable[..., GatewayProcess], db: str
) -> None:
    gp = spawn("--listen", "127.0.0.1:0", "--auto", "approve", "--db", db)
    port = gp.port()
    received: dict[str, dict[str, Any]] = {}

    async def burst() -> None:
        async with connect(f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}") as ws:
            await ws.send(frame("identity", "identity", {"project": "burst"}))
            for i in range(500):
                await ws.send(perm_request(f"b-{i:03d}", "Bash", {"command": f"echo {i}"}))
            try:
                while True:
                    answer = json.loads(await asyncio.wait_for(ws.recv(), T))
                    received[answer["req_id"]] = answer["payload"]
                    if len(received) == 120:
                        gp.proc.send_signal(signal.SIGKILL)  # mid-burst, no warning
            except ConnectionClosed:
                pass

    run(burst())
    assert gp.proc.wait(T) == -signal.SIGKILL
    assert 120 <= len(received) < 500, len(received)  # the kill landed inside the burst
    assert all(p == APPROVE for p in received.values())
    rows = audit_rows(db, "burst")
    missing = sorted(set(received) - set(rows))
    assert missing == [], f"{len(missing)} answered decisions are not in the audit: {missing[:5]}"
    assert all(rows[r] == "approve" for r in received)


# -- rules ---------------------------------------------------------------------------------


def test_always_allow_rule_answers_after_a_restart_with_a_real_uplink_then_revoked(
    make_gateway: Callable[..., Gateway], make_uplink: Callable[..., Uplink], db: str
) -> None:
    gw = make_gateway(db=db)
    port = gw.port
    uplink = make_uplink(gw.url_for_sleds(), project="sled-a")
    assert uplink.wait_connected(T)
    command = {"command": "pytest -q tests/", "description": "run the tests"}

    first = uplink.request_permission("Bash", command, request_id="first")
    gw.wait_for(lambda s: "first" in pending_ids(s), T)
    gw.decide("sled-a", "first", Decision.ALWAYS_ALLOW, by="console")
    assert first.result(T).decision is Decision.ALWAYS_ALLOW
    rules = gw.rules()
    assert len(rules) == 1
    rule = rules[0]
    assert (rule["project"], rule["tool_name"], rule["key"], rule["action"]) == (
        "sled-a",
        "Bash",
        'input:{"command":"pytest -q tests/"}',
        "allow",
    )
    assert rule["created_by"] == "console"

    # Restart the gateway on the same port and file; the uplink reconnects by itself.
    gw.stop()
    gw2 = make_gateway(db=db, port=port)
    shown: list[str] = []
    gw2.add_pending_listener(lambda item: shown.append(item.req_id))
    assert uplink.wait_connected(3 * T)
    gw2.wait_for(
        lambda s: any(x["project"] == "sled-a" and x["state"] == "connected" for x in s["sleds"]), T
    )
    again = uplink.request_permission("Bash", command, request_id="again").result(T)
    assert again.decision is Decision.ALWAYS_ALLOW
    assert shown == []  # never pending
    row = gw2.audit(limit=1)[0]
    assert (row["req_id"], row["decision"], row["by"]) == (
        "again",
        "always_allow",
        f"rule:{rule['id']}",
    )

    # Another command, or another sled's, is not covered.
    other = uplink.request_permission("Bash", {"command": "pytest -q"}, request_id="other")
    gw2.wait_for(lambda s: "other" in pending_ids(s), T)
    gw2.decide("sled-a", "other", "deny")
    assert other.result(T).decision is Decision.DENY

    # Revoked over the API: the same request is asked again.
    with http(gw2) as client:
        response = client.delete(f"/api/rules/{rule['id']}", headers=JSON_TYPE)
        assert response.status_code == 200, response.text
        assert response.json()["rule"]["revoked_by"] in ("console", "api")
        assert client.delete(f"/api/rules/{rule['id']}", headers=JSON_TYPE).status_code == 409
        assert client.delete("/api/rules/999", headers=JSON_TYPE).status_code == 404
        assert client.delete("/api/rules/abc", headers=JSON_TYPE).status_code == 400
        listed = client.get("/api/rules").json()["rules"]
        assert listed == []
        kept = client.get("/api/rules", params={"include_revoked": "1"}).json()["rules"]
        assert kept[0]["id"] == rule["id"]
        assert kept[0]["revoked_at"] is not None
    third = uplink.request_permission("Bash", command, request_id="third")
    gw2.wait_for(lambda s: "third" in pending_ids(s), T)
    eventually(lambda: len(shown) == 2, T, "the listener to see the request")
    assert shown == ["other", "third"]
    gw2.decide("sled-a", "third", "approve")
    assert third.result(T).decision is Decision.APPROVE


def test_deny_rule_beats_allow_and_rules_validate(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    with http(gw) as client:
        allow_all = client.post(
            "/api/rules", json={"action": "allow", "tool_name": "Bash", "project": "p"}
        )
        assert allow_all.status_code == 201, allow_all.text
        deny = client.post(
            "/api/rules",
            json={"action": "deny", "tool_name": "Bash", "key": "rm -rf /", "reason": "no"},
        )
        assert deny.status_code == 201, deny.text
        deny_id = deny.json()["rule"]["id"]
        assert deny.json()["rule"]["project"] is None  # every sled
        same = client.post(
            "/api/rules", json={"action": "deny", "tool_name": "Bash", "key": "rm -rf /"}
        )
        assert same.json()["rule"]["id"] == deny_id  # no duplicate

        for bad in (
            {"action": "maybe", "tool_name": "Bash"},
            {"action": "deny"},
            {"action": "deny", "tool_name": ""},
            {"action": "deny", "tool_name": "Bash", "key": 5},
            {"action": "deny", "tool_name": "Bash", "project": ""},
            {"action": "deny", "tool_name": "Bash", "extra": 1},
            [1, 2],
        ):
            response = client.post("/api/rules", json=bad)
            assert response.status_code == 400, bad
            assert "error" in response.json()
        not_json = client.post(
            "/api/rules", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert not_json.status_code == 400

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("danger", "Bash", {"command": "rm -rf /"}))
            assert await recv(ws) == frame_payload("danger", "deny")
            await ws.send(perm_request("fine", "Bash", {"command": "ls"}))
            assert await recv(ws) == frame_payload("fine", "always_allow")
        async with sled(gw, "q") as ws:  # the allow rule is p's only; the deny is everyone's
            await ws.send(perm_request("q-danger", "Bash", {"command": "rm -rf /"}))
            assert await recv(ws) == frame_payload("q-danger", "deny")
            await ws.send(perm_request("q-ls", "Bash", {"command": "ls"}))
            await wait_state(gw, lambda s: "q-ls" in pending_ids(s))

    run(scenario())
    rows = {e["req_id"]: e for e in gw.audit()}
    assert rows["danger"]["by"] == f"rule:{deny_id}"
    assert rows["q-danger"]["by"] == f"rule:{deny_id}"
    assert rows["fine"]["by"] == f"rule:{allow_all.json()['rule']['id']}"
    assert rows["q-ls"]["decision"] == "withdrawn"  # asked, never answered by a rule


def test_always_allow_for_a_file_tool_keys_on_the_whole_input(
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway()

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("e1", "Edit", {"file_path": "/src/a.py", "old_string": "1"}))
            await wait_state(gw, lambda s: "e1" in pending_ids(s))
            await asyncio.to_thread(gw.decide, "p", "e1", "always_allow")
            assert await recv(ws) == frame_payload("e1", "always_allow")
            # The same edit: covered. Same file, another edit, or another file: asked.
            await ws.send(perm_request("e2", "Edit", {"file_path": "/src/a.py", "old_string": "1"}))
            assert await recv(ws) == frame_payload("e2", "always_allow")
            await ws.send(perm_request("e3", "Edit", {"file_path": "/src/a.py", "old_string": "2"}))
            await ws.send(perm_request("e4", "Edit", {"file_path": "/src/b.py"}))
            await wait_state(gw, lambda s: {"e3", "e4"} <= pending_ids(s))

    run(scenario())
    assert [(r["tool_name"], r["key"]) for r in gw.rules()] == [
        ("Edit", 'input:{"file_path":"/src/a.py","old_string":"1"}')
    ]


# -- migrations ------------------------------------------------------------------------------

# The first schema exactly as version 1 shipped it, with a row in it.
V1_FIXTURE = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    session INTEGER,
    req_id TEXT NOT NULL,
    tool_name TEXT NOT NULL,
    tool_input TEXT NOT NULL,
    decision TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    requested_at REAL,
    decided_at REAL NOT NULL
);
CREATE INDEX audit_decided_at ON audit (decided_at);
CREATE INDEX audit_project ON audit (project, id);
INSERT INTO audit (project, session, req_id, tool_name, tool_input, decision, decided_by,
                   requested_at, decided_at)
VALUES ('old-sled', 3, 'old-1', 'Bash', '{"command": "make"}', 'approve', 'console',
        1767225600.0, 1767225601.5);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_migrated(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "v1.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(V1_FIXTURE)
    conn.close()
    gw = make_gateway(db=db, audit_retention_days=0)  # the row is from January 2026
    assert gw.store.found_version == 1
    (row,) = gw.audit()
    assert (row["project"], row["req_id"], row["decision"], row["by"]) == (
        "old-sled",
        "old-1",
        "approve",
        "console",
    )
    assert row["tool_input"] == {"command": "make"}
    assert row["reason"] is None
    assert row["decided_at"].startswith("2026-01-01T00:00:01.500")
    # The new parts work on the migrated file.
    with http(gw) as client:
        made = client.post("/api/rules", json={"action": "deny", "tool_name": "Bash"})
        assert made.status_code == 201
    gw.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    conn.close()
    done = GatewayProcess("--listen", "127.0.0.1:0", "--db", str(db))
    assert done.proc.wait(3 * T) == 2
    done.kill()
    err = done.out["stderr"].strip()
    assert len(err.splitlines()) == 1, err
    assert "--db" in err
    assert f"schema version {SCHEMA_VERSION + 7}" in err
    with sqlite3.connect(db) as conn:  # untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 7
    conn.close()


# -- /api/state with many sleds -----------------------------------------------------------------


def test_state_lists_the_first_n_and_counts_all(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()

    async def scenario() -> None:
        socks = []
        for i in range(12):
            ws = await connect(gw.url_for_sleds())
            await ws.send(frame("identity", "identity", {"project": f"s{i:02d}"}))
            await ws.send(perm_request(f"r{i}"))
            socks.append(ws)
        await wait_state(gw, lambda s: s["counts"]["pending"] == 12)
        async with httpx.AsyncClient(
            base_url=gw.http_url, headers=gw.api_headers(), timeout=T
        ) as client:
            state = (await client.get("/api/state", params={"limit": 5})).json()
            assert [s["project"] for s in state["sleds"]] == ["s00", "s01", "s02", "s03", "s04"]
            assert len(state["pending"]) == 5
            assert state["counts"]["sleds"] == 12
            assert state["counts"]["connected"] == 12
            assert state["counts"]["pending"] == 12
            assert (await client.get("/api/state", params={"limit": "-1"})).status_code == 400
        for ws in socks:
            await ws.close()

    run(scenario())


# -- attacks on the rules endpoints ----------------------------------------------------------


def test_a_cross_origin_form_cannot_make_or_revoke_a_rule(
    make_gateway: Callable[..., Gateway],
) -> None:
    """What a hostile web page can send without a CORS preflight: a text/plain form
    whose body is valid JSON, or a JSON body with its own Origin."""
    gw = make_gateway()
    forged = b'{"action": "allow", "tool_name": "Bash", "key": null, "reason": "="}'
    with http(gw) as client:
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ):
            response = client.post(
                "/api/rules", content=forged, headers={"Content-Type": content_type}
            )
            assert response.status_code == 415, (content_type, response.text)
            assert "error" in response.json()
        foreign = client.post(
            "/api/rules",
            content=forged,
            headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
        )
        assert foreign.status_code == 403, foreign.text
        made = client.post("/api/rules", json={"action": "deny", "tool_name": "Bash"})
        assert made.status_code == 201
        rule_id = made.json()["rule"]["id"]
        revoke = client.delete(f"/api/rules/{rule_id}", headers={"Origin": "http://evil.example"})
        assert revoke.status_code == 403
        assert [r["id"] for r in client.get("/api/rules").json()["rules"]] == [rule_id]
        same_origin = client.delete(
            f"/api/rules/{rule_id}", headers={"Origin": gw.http_url, **JSON_TYPE}
        )
        assert same_origin.status_code == 200, same_origin.text


def test_a_decision_that_cannot_be_recorded_is_not_taken(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    gw = make_gateway(db=tmp_path / "gone.db")

    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client,
        ):
            await ws.send(perm_request("r1", "Bash", {"command": "make"}))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            await asyncio.to_thread(gw.store.close)  # the store is gone (as after a disk failure)
            response = await client.post("/api/permissions/p/r1", json={"decision": "approve"})
            assert response.status_code == 503, response.text
            assert "still pending" in response.json()["error"]
            assert gw.is_pending("p", "r1")  # the sled fails closed on its own timeout
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)

    run(scenario())


def test_audit_retention_deletes_old_rows_and_keeps_rules(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    _fill(db, {"old": 5})  # decided in January 2026
    store = make_store(db).open()
    from sled_gateway.store import AuditEntry

    now = time.time()
    recent = AuditEntry("new", 1, "fresh", "Read", {}, "approve", "console", None, now, now)
    store.record_later(recent).result(T)
    store.close()

    keep_all = make_gateway(db=db, audit_retention_days=3650)
    with http(keep_all) as client:
        client.post("/api/rules", json={"action": "deny", "tool_name": "Bash"})
    assert len(keep_all.audit()) == 6
    keep_all.stop()

    month = make_gateway(db=db, audit_retention_days=30)
    eventually(lambda: [e["req_id"] for e in month.audit()] == ["fresh"], T, "old rows purged")
    assert len(month.rules()) == 1
