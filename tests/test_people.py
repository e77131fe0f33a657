"""People on the gateway: the ``--access`` file, roles per project, person API tokens, the audit
by person. Against the real gateway and raw WebSocket sleds; people act with person tokens.

Each attack is a test that fails on the gateway before roles per project and tokens
(a person could not be told from the operator, or the request went through).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol import input_sha256
from sled_gateway import Gateway
from sled_gateway.access import AccessError, load_access, parse_access
from sled_gateway.people import Person
from sled_gateway.principal import Channel, Role
from tests.test_gateway import TOKEN, T, pending_ids, perm_request, recv, run, sled, wait_state
from tests.test_store import frame_payload

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
JSON_TYPE = {"Content-Type": "application/json"}

ACCESS = """\
# The team of the tests.
[[grant]]
who = "vera@example.test"
role = "viewer"
projects = ["web-*"]

[[grant]]
who = "alice@example.test"
role = "approver"
projects = ["web-*"]

[[grant]]
who = "group:ops"
role = "admin"

[[person]]
id = "olga@example.test"
groups = ["ops"]
"""

VIEWER, APPROVER, ADMIN = "vera@example.test", "alice@example.test", "olga@example.test"


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    path = tmp_path / "access.toml"
    path.write_text(ACCESS)
    return make_reference_gateway(token=TOKEN, access=load_access(path))


def operator(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.http_url, headers={**gw.api_headers(), **JSON_TYPE}, timeout=T)


def person_token(gw: Gateway, person: str, expires_in: float = 3600) -> tuple[int, str]:
    with operator(gw) as client:
        made = client.post("/api/tokens", json={"person": person, "expires_in": expires_in})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["person"] == person and body["token"].startswith("sgp_")
    return body["id"], body["token"]


def as_person(gw: Gateway, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=gw.http_url,
        headers={"Authorization": f"Bearer {token}", **JSON_TYPE},
        timeout=T,
    )


def decide(client: httpx.Client, project: str, req_id: str, decision: str) -> httpx.Response:
    return client.post(f"/api/permissions/{project}/{req_id}", json={"decision": decision})


async def pending_on(gw: Gateway, project: str, req_id: str) -> Any:
    """A sled of ``project`` with request ``req_id`` pending; the caller keeps it open."""
    cm = sled(gw, project)
    ws = await cm.__aenter__()
    await ws.send(perm_request(req_id, "Bash", {"command": f"make {req_id}"}))
    await wait_state(gw, lambda s: req_id in pending_ids(s))
    return cm, ws


# -- the access file ------------------------------------------------------------------


def test_the_access_file_gives_roles_per_project_and_through_groups(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(ACCESS)
    access = load_access(path)
    alice = access.principal_for(Person("https://idp", "1", APPROVER), Channel.CONSOLE)
    assert alice.has(Role.APPROVER, "web-1") and not alice.has(Role.APPROVER, "api-1")
    assert not alice.has(Role.ADMIN, "web-1") and not alice.has(Role.APPROVER)
    assert alice.by == APPROVER and alice.channel is Channel.CONSOLE
    ops = access.principal_for(Person("https://idp", "2", groups=frozenset({"ops"})), Channel.API)
    assert ops.has(Role.ADMIN) and ops.has(Role.APPROVER, "api-1")
    nobody = access.principal_for(Person("https://idp", "3", "eve@example.test"), Channel.API)
    assert not nobody.has_somewhere(Role.VIEWER)
    # A token's person gets the groups of their [[person]] table.
    assert access.principal_for(access.person(ADMIN), Channel.API).has(Role.ADMIN)


@pytest.mark.parametrize(
    ("change", "line", "reason"),
    [
        (('role = "viewer"', 'role = "boss"'), 4, "unknown role 'boss'"),
        (('projects = ["web-*"]', 'projects = ["web-["]'), 5, "invalid project glob 'web-['"),
        (('projects = ["web-*"]', "projects = []"), 5, "projects must be a non-empty list"),
        (("[[person]]", "[[person]\n"), 16, "not TOML"),
        (('who = "group:ops"', 'who = "group:ops"\nrloe = "x"'), 14, "unknown key 'rloe'"),
        (("# The team", '[[quorum]]\nrule = "Read(x)"\napprovals = 2\n# The team'), 2, "rule"),
        (("# The team", '[[quorum]]\nrule = "Bash(x)"\napprovals = 0\n# The team'), 3, "1 to"),
    ],
)
def test_a_bad_access_file_exits_2_with_its_line_and_reason(
    tmp_path: Path, change: tuple[str, str], line: int, reason: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(ACCESS.replace(*change, 1))
    with pytest.raises(AccessError) as caught:
        load_access(path)
    assert str(caught.value).startswith(f"{path}:{line}: "), caught.value
    assert reason in str(caught.value)
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), "--no-auth", "--access", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:{line}: " in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_quorum_rule_matches_any_part_of_a_compound_command() -> None:
    access = parse_access(
        {"quorum": [{"rule": "Bash(git push *)", "approvals": 2, "projects": ["web-*"]}]}
    )
    push = {"command": "make && git push --force origin main"}
    assert access.approvals_needed("web-1", "Bash", push) == 2
    assert access.approvals_needed("api-1", "Bash", push) == 1
    assert access.approvals_needed("web-1", "Bash", {"command": "git status"}) == 1


# -- roles per project (attacks) ------------------------------------------------------


def test_a_viewer_cannot_approve(gw: Gateway) -> None:
    _, token = person_token(gw, VIEWER)

    async def scenario() -> None:
        cm, _ws = await pending_on(gw, "web-1", "r1")
        try:
            with as_person(gw, token) as vera:
                refused = await asyncio.to_thread(decide, vera, "web-1", "r1", "approve")
            assert refused.status_code == 403, refused.text
            assert refused.json()["needs"] == "approver"
            assert gw.is_pending("web-1", "r1")
        finally:
            await cm.__aexit__(None, None, None)

    run(scenario())


def test_an_approver_of_web_projects_cannot_decide_an_api_sled(gw: Gateway) -> None:
    _, token = person_token(gw, APPROVER)

    async def scenario() -> None:
        api_cm, _ = await pending_on(gw, "api-1", "a1")
        web_cm, web = await pending_on(gw, "web-1", "w1")
        try:
            with as_person(gw, token) as alice:
                refused = await asyncio.to_thread(decide, alice, "api-1", "a1", "approve")
                assert refused.status_code == 403, refused.text
                assert refused.json()["needs"] == "approver"
                assert gw.is_pending("api-1", "a1")
                done = await asyncio.to_thread(decide, alice, "web-1", "w1", "approve")
                assert done.status_code == 200, done.text
                assert done.json()["decided"]["by"] == APPROVER
            assert await recv(web) == frame_payload("w1", "approve")
        finally:
            await web_cm.__aexit__(None, None, None)
            await api_cm.__aexit__(None, None, None)

    run(scenario())
    row = next(r for r in gw.audit() if r["req_id"] == "w1")
    assert (row["by"], row["who"], row["channel"]) == (APPROVER, APPROVER, "api")
    with operator(gw) as client:
        mine = client.get("/api/audit", params={"person": APPROVER}).json()["entries"]
    assert [r["req_id"] for r in mine] == ["w1"]


def test_a_viewer_sees_only_the_projects_it_may_view(gw: Gateway) -> None:
    _, token = person_token(gw, VIEWER)

    async def scenario() -> None:
        api_cm, _ = await pending_on(gw, "api-1", "secret")
        web_cm, _ = await pending_on(gw, "web-1", "shown")
        try:
            with as_person(gw, token) as vera:
                one = await asyncio.to_thread(vera.get, "/api/permissions/api-1/secret")
                assert one.status_code == 403 and one.json()["needs"] == "viewer"
                assert "make secret" not in one.text
                mine = await asyncio.to_thread(vera.get, "/api/permissions/web-1/shown")
                assert mine.status_code == 200 and mine.json()["state"] == "pending"
                state = (await asyncio.to_thread(vera.get, "/api/state")).json()
                assert pending_ids(state) == {"shown"}
                assert [s["project"] for s in state["sleds"]] == ["web-1"]
                assert state["counts"]["pending"] == 1 and state["counts"]["sleds"] == 1
                assert "make secret" not in json.dumps(state)
                first = await asyncio.to_thread(first_event, vera)
                assert pending_ids(first) == {"shown"}
        finally:
            await web_cm.__aexit__(None, None, None)
            await api_cm.__aexit__(None, None, None)

    run(scenario())
    with as_person(gw, token) as vera:
        rows = vera.get("/api/audit").json()["entries"]
        assert rows and {r["project"] for r in rows} == {"web-1"}
        assert vera.get("/api/audit", params={"project": "api-1"}).status_code == 403


def first_event(client: httpx.Client) -> dict[str, Any]:
    with client.stream("GET", "/api/events") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                document: dict[str, Any] = json.loads(line[6:])
                return document
    raise AssertionError("no event")


def test_no_role_at_all_reads_nothing(gw: Gateway) -> None:
    _, token = person_token(gw, "eve@example.test")
    with as_person(gw, token) as eve:
        for path in ("/api/state", "/api/events", "/api/audit", "/api/rules", "/api/tokens"):
            refused = eve.get(path)
            assert refused.status_code == 403, (path, refused.text)


def test_a_non_admin_cannot_make_tokens_or_rules(gw: Gateway) -> None:
    _, token = person_token(gw, APPROVER)
    with as_person(gw, token) as alice:
        made = alice.post("/api/tokens", json={"person": APPROVER, "expires_in": 60})
        assert made.status_code == 403 and made.json()["needs"] == "admin"
        rule = alice.post("/api/rules", json={"rule": "Bash(ls *)", "action": "allow"})
        assert rule.status_code == 403 and rule.json()["needs"] == "admin"
        exact = alice.post(
            "/api/rules", json={"action": "allow", "tool_name": "Bash", "project": "web-1"}
        )
        assert exact.status_code == 403 and exact.json()["needs"] == "admin"
        imported = alice.post("/api/rules/import", json={"permissions": {"allow": ["Read"]}})
        assert imported.status_code == 403
        assert alice.get("/api/tokens").status_code == 403
    assert gw.rules() == []
    _, admin = person_token(gw, ADMIN)
    with as_person(gw, admin) as olga:
        made = olga.post("/api/rules", json={"rule": "Bash(ls *)", "action": "allow"})
        assert made.status_code == 201 and made.json()["rule"]["created_by"] == ADMIN


# -- person tokens ---------------------------------------------------------------------


def test_a_revoked_token_is_refused_at_once(gw: Gateway) -> None:
    token_id, token = person_token(gw, APPROVER)
    with as_person(gw, token) as alice:
        assert alice.get("/api/state").status_code == 200
        with operator(gw) as client:
            revoked = client.delete(f"/api/tokens/{token_id}")
            assert revoked.status_code == 200 and revoked.json()["token"]["active"] is False
            again = client.delete(f"/api/tokens/{token_id}")
            assert again.status_code == 409
            assert client.delete("/api/tokens/999").status_code == 404
        assert alice.get("/api/state").status_code == 401


def test_an_expired_token_is_refused(gw: Gateway) -> None:
    _, token = person_token(gw, APPROVER, expires_in=1.0)
    with as_person(gw, token) as alice:
        assert alice.get("/api/state").status_code == 200
        time.sleep(1.2)
        assert alice.get("/api/state").status_code == 401
        assert alice.get("/api/state").status_code == 401


def test_tokens_are_stored_hashed_listed_without_secrets_and_audited(gw: Gateway) -> None:
    token_id, token = person_token(gw, APPROVER)
    with operator(gw) as client:
        listed = client.get("/api/tokens").json()["tokens"]
        assert [(t["id"], t["person"], t["active"]) for t in listed] == [(token_id, APPROVER, True)]
        assert token not in json.dumps(listed) and "sha256" not in json.dumps(listed)
        client.delete(f"/api/tokens/{token_id}")
        assert client.get("/api/tokens").json()["tokens"] == []
        assert len(client.get("/api/tokens?include_revoked=1").json()["tokens"]) == 1
        for bad in (
            {"person": ""},
            {"person": "group:ops"},
            {"person": "operator"},  # would pass for the operator in the audit
            {"person": "rule:1"},
            {"person": "a@b", "expires_in": 0},
            {"person": "a@b", "expires_in": True},
            {"person": "a@b", "expires_in": 400 * 86400},
            {"person": "a@b", "scope": "x"},
        ):
            assert client.post("/api/tokens", json=bad).status_code == 400, bad
    rows = [r for r in gw.audit() if r["tool_name"] == "person_token"]
    assert [(r["decision"], r["req_id"], r["who"], r["channel"]) for r in rows] == [
        ("token_revoked", f"token:{token_id}", "operator", "api"),
        ("token_created", f"token:{token_id}", "operator", "api"),
    ]
    assert all(r["tool_input"]["person"] == APPROVER for r in rows)
    assert token not in json.dumps(rows)
    # Only the hash is in the database.
    stored = run(gw.store.tokens(include_revoked=True))  # type: ignore[attr-defined]
    assert stored[0].secret_sha256 != token and len(stored[0].secret_sha256) == 64


def test_the_operator_is_still_the_bootstrap_admin_and_named_in_the_audit(gw: Gateway) -> None:
    async def scenario() -> None:
        cm, ws = await pending_on(gw, "api-9", "op1")
        try:
            with operator(gw) as client:
                done = await asyncio.to_thread(decide, client, "api-9", "op1", "approve")
            assert done.status_code == 200
            assert await recv(ws) == frame_payload("op1", "approve")
        finally:
            await cm.__aexit__(None, None, None)

    run(scenario())
    row = next(r for r in gw.audit() if r["req_id"] == "op1")
    assert (row["by"], row["who"], row["channel"]) == ("api", "operator", "api")


# -- quorum ------------------------------------------------------------------------------

QUORUM = """\
[[grant]]
who = "group:web"
role = "approver"
projects = ["web-*"]

[[quorum]]
rule = "Bash(git push *)"
approvals = 2
projects = ["web-*"]

[[person]]
id = "alice@example.test"
groups = ["web"]

[[person]]
id = "bob@example.test"
groups = ["web"]

[[person]]
id = "carol@example.test"
groups = ["web"]
"""
ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
PUSH = {"command": "git push --force origin main"}


@pytest.fixture
def qgw(make_reference_gateway: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    path = tmp_path / "quorum.toml"
    path.write_text(QUORUM)
    return make_reference_gateway(token=TOKEN, access=load_access(path))


#: The clients ``tokens_of`` made in the running test, closed when it ends: left to the
#: collector, their sockets warn as unclosed inside whatever test runs then.
_OPEN_CLIENTS: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def tokens_of(gw: Gateway, *people: str) -> list[httpx.Client]:
    clients = [as_person(gw, person_token(gw, p)[1]) for p in people]
    _OPEN_CLIENTS.extend(clients)
    return clients


def test_one_person_voting_twice_does_not_make_a_quorum_of_two(qgw: Gateway) -> None:
    alice, bob = tokens_of(qgw, ALICE, BOB)

    async def scenario() -> None:
        async with sled(qgw, "web-1") as ws:
            await ws.send(perm_request("push", "Bash", PUSH))
            await wait_state(qgw, lambda s: "push" in pending_ids(s))
            state = await asyncio.to_thread(qgw.state)
            assert state["pending"][0]["needs"] == 2
            first = await asyncio.to_thread(decide, alice, "web-1", "push", "approve")
            assert first.status_code == 202, first.text
            assert first.json()["message"] == f"1 of 2 approvals: {ALICE}"
            again = await asyncio.to_thread(decide, alice, "web-1", "push", "always_allow")
            assert again.status_code == 409, again.text
            assert "already voted" in again.json()["error"] and again.json()["needs"] == 2
            assert qgw.is_pending("web-1", "push")
            shown = (await asyncio.to_thread(alice.get, "/api/permissions/web-1/push")).json()
            assert shown["state"] == "pending" and shown["needs"] == 2
            assert [(v["person"], v["decision"]) for v in shown["votes"]] == [(ALICE, "approve")]
            done = await asyncio.to_thread(decide, bob, "web-1", "push", "approve")
            assert done.status_code == 200, done.text
            assert await recv(ws) == frame_payload("push", "approve")

    run(scenario())
    after = alice.get("/api/permissions/web-1/push").json()
    assert after["state"] == "approve" and after["needs"] == 2
    assert [v["person"] for v in after["votes"]] == [ALICE, BOB]
    row = next(r for r in qgw.audit() if r["req_id"] == "push")
    assert row["who"] == BOB and row["reason"] == f"quorum 2 of 2: {ALICE}, {BOB}"
    assert qgw.rules() == []  # the "always allow" vote made no rule


def test_the_sleds_owner_cannot_complete_a_quorum_alone(qgw: Gateway) -> None:
    alice, bob, carol = tokens_of(qgw, ALICE, BOB, CAROL)

    async def scenario() -> None:
        async with sled(qgw, "web-2", owner=ALICE) as ws:
            await ws.send(perm_request("push", "Bash", PUSH))
            await wait_state(qgw, lambda s: "push" in pending_ids(s))
            mine = await asyncio.to_thread(decide, alice, "web-2", "push", "approve")
            assert mine.status_code == 409, mine.text
            assert "owner" in mine.json()["error"]
            one = await asyncio.to_thread(decide, bob, "web-2", "push", "approve")
            assert one.status_code == 202, one.text
            assert [v["person"] for v in one.json()["votes"]] == [BOB]
            again = await asyncio.to_thread(decide, alice, "web-2", "push", "approve")
            assert again.status_code == 409
            assert qgw.is_pending("web-2", "push")
            done = await asyncio.to_thread(decide, carol, "web-2", "push", "approve")
            assert done.status_code == 200, done.text
            assert await recv(ws) == frame_payload("push", "approve")

    run(scenario())


def test_one_approvers_deny_decides_a_quorum_request(qgw: Gateway) -> None:
    alice, bob = tokens_of(qgw, ALICE, BOB)

    async def scenario() -> None:
        async with sled(qgw, "web-3", owner=ALICE) as ws:
            await ws.send(perm_request("push", "Bash", PUSH))
            await wait_state(qgw, lambda s: "push" in pending_ids(s))
            one = await asyncio.to_thread(decide, bob, "web-3", "push", "approve")
            assert one.status_code == 202
            # The owner may always refuse.
            no = await asyncio.to_thread(decide, alice, "web-3", "push", "deny")
            assert no.status_code == 200, no.text
            assert await recv(ws) == frame_payload("push", "deny")

    run(scenario())


def test_an_allow_rule_does_not_answer_a_request_under_a_quorum(qgw: Gateway) -> None:
    with operator(qgw) as client:
        made = client.post("/api/rules", json={"rule": "Bash(git *)", "action": "allow"})
        assert made.status_code == 201

    async def scenario() -> None:
        async with sled(qgw, "web-4") as ws:
            await ws.send(perm_request("status", "Bash", {"command": "git status"}))
            assert await recv(ws) == frame_payload("status", "always_allow")
            await ws.send(perm_request("push", "Bash", PUSH))
            await wait_state(qgw, lambda s: "push" in pending_ids(s))

    run(scenario())


def test_the_uplinks_owner_reaches_the_gateway_in_its_identity(
    qgw: Gateway, make_uplink: Callable[..., Any]
) -> None:
    make_uplink(qgw.url_for_sleds(), project="web-5", owner=ALICE)
    state = qgw.wait_for(
        lambda s: any(x["project"] == "web-5" and x["state"] == "connected" for x in s["sleds"]),
        T,
    )
    sled_info = next(x for x in state["sleds"] if x["project"] == "web-5")["info"]
    assert sled_info["owner"] == ALICE
    make_uplink(qgw.url_for_sleds(), project="web-6")
    state = qgw.wait_for(lambda s: any(x["project"] == "web-6" for x in s["sleds"]), T)
    assert "owner" not in next(x for x in state["sleds"] if x["project"] == "web-6")["info"]


# -- bulk decisions under roles and quorum ------------------------------------------------


def test_a_bulk_decision_is_authorized_and_counted_item_by_item(
    make_reference_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """An approver of web-* who slips an api-* request into a bulk approve gets 403 for that
    one item only; a quorum request in the same bulk gets its vote counted (202), not decided."""
    path = tmp_path / "bulk.toml"
    path.write_text(QUORUM)
    gw = make_reference_gateway(token=TOKEN, access=load_access(path))
    (alice,) = tokens_of(gw, ALICE)
    build = {"command": "make build"}

    def item(project: str, req_id: str, tool_input: dict[str, Any]) -> dict[str, str]:
        return {"project": project, "req_id": req_id, "input_sha256": input_sha256(tool_input)}

    async def scenario() -> None:
        async with sled(gw, "web-1") as web, sled(gw, "api-1") as api_sled:
            await web.send(perm_request("build", "Bash", build))
            await web.send(perm_request("push", "Bash", PUSH))
            await api_sled.send(perm_request("api-build", "Bash", build))
            await wait_state(gw, lambda s: len(pending_ids(s)) == 3)
            items = [
                item("web-1", "build", build),
                item("web-1", "push", PUSH),
                item("api-1", "api-build", build),
            ]
            answer = await asyncio.to_thread(
                alice.post, "/api/permissions/decide", json={"decision": "approve", "items": items}
            )
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert [r["status"] for r in results] == [200, 202, 403], results
            assert results[2]["needs"] == "approver"
            assert results[1]["message"] == f"1 of 2 approvals: {ALICE}"
            assert await recv(web) == frame_payload("build", "approve")
            assert gw.is_pending("web-1", "push") and gw.is_pending("api-1", "api-build")

    run(scenario())
    rows = [(r["project"], r["req_id"], r["who"]) for r in gw.audit() if r.get("decision")]
    assert ("web-1", "build", ALICE) in rows
    assert not any(p == "api-1" and who == ALICE for p, _, who in rows)


def test_a_viewer_is_refused_a_bulk_decision_as_a_whole(gw: Gateway) -> None:
    _, token = person_token(gw, VIEWER)
    with as_person(gw, token) as vera:
        answer = vera.post(
            "/api/permissions/decide",
            json={
                "decision": "approve",
                "items": [{"project": "web-1", "req_id": "x", "input_sha256": "0" * 64}],
            },
        )
    assert answer.status_code == 403 and answer.json()["needs"] == "approver", answer.text
