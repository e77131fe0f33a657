"""A colleague with the wrong role, as property-based requests: whatever a viewer (or an
approver outside their projects, or someone no grant names) sends to the gateway's
state-changing routes, nothing changes; and whatever they read, nothing of a sled they
have no role on comes back. A real gateway with the access file of
``tests/test_people.py``, a raw WebSocket sled on each of two projects with a request
pending, a rule and a token made by the operator; hypothesis draws the route, the
project and request named, and the body (plausible fields as often as any). Each answer
is a 4xx (never a 2xx, never a 5xx; a bulk decision by someone who approves other sleds
answers each item, each refused), and after each one the requests are still pending,
the rules and tokens are as they were, the audit has no decision, and neither sled was
sent anything. Each sled's inputs and rules carry a marker (``api-1-secret``) that no
answer to someone who may not view that sled may contain. Planting a project-blind role
check, a viewer allowed to make rules, or a read that skips its filter (the audit's, the
state's pending list) makes these tests fail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from sled_gateway import Gateway
from sled_gateway.access import load_access
from tests.test_gateway import TOKEN, T, frame, perm_request
from tests.test_http_fuzz import FUZZ_SETTINGS
from tests.test_people import ACCESS, APPROVER, VIEWER

pytestmark = [pytest.mark.security, pytest.mark.timeout(300)]

#: A person no grant names.
NOBODY = "eve@example.test"
PROJECTS = ("web-1", "api-1")
PENDING = "r1"
#: A request of each sled decided by the operator before the test: in the audit.
DECIDED = "r0"


@dataclass
class Team:
    gw: Gateway
    tokens: dict[str, str]  # person → bearer token
    sleds: list[ClientConnection]
    rules: list[dict[str, Any]]
    token_rows: list[dict[str, Any]]
    shown: dict[str, str]  # project → the SHA-256 of its pending request's input

    def operator(self) -> httpx.Client:
        return httpx.Client(base_url=self.gw.http_url, headers=self.gw.api_headers(), timeout=T)


def _pending(gw: Gateway) -> set[tuple[str, str]]:
    return {(p["project"], p["req_id"]) for p in gw.state()["pending"]}


@pytest.fixture
def team(tmp_path: Path, make_reference_gateway: Callable[..., Gateway]) -> Iterator[Team]:
    access = tmp_path / "access.toml"
    access.write_text(ACCESS)
    gw = make_reference_gateway(token=TOKEN, access=load_access(access))
    sleds: list[ClientConnection] = []
    try:
        for project in PROJECTS:
            ws = connect(gw.url_for_sleds()).__enter__()
            sleds.append(ws)
            ws.send(frame("identity", "identity", {"project": project}))
            ws.send(perm_request(DECIDED, "Bash", {"command": f"deploy {project}-secret-decided"}))
            ws.send(perm_request(PENDING, "Bash", {"command": f"make {project}-secret-pending"}))
        gw.wait_for(lambda s: len(_pending(gw)) == 2 * len(PROJECTS), T)
        with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as op:
            for project, ws in zip(PROJECTS, sleds, strict=True):
                url = f"/api/permissions/{project}/{DECIDED}"
                assert op.post(url, json={"decision": "deny"}).status_code == 200
                assert json.loads(ws.recv(timeout=T))["req_id"] == DECIDED
                made = op.post(
                    "/api/rules",
                    json={
                        "rule": f"Bash(make {project}-secret-rule:*)",
                        "action": "allow",
                        "project": project,
                    },
                )
                assert made.status_code == 201, made.text
            made = op.post("/api/rules", json={"rule": "Bash(ls:*)", "action": "allow"})
            assert made.status_code == 201, made.text
            tokens = {}
            for person in (VIEWER, APPROVER, NOBODY):
                issued = op.post("/api/tokens", json={"person": person, "expires_in": 3600})
                assert issued.status_code == 201, issued.text
                tokens[person] = issued.json()["token"]
            rules = op.get("/api/rules").json()["rules"]
            token_rows = op.get("/api/tokens").json()["tokens"]
        shown = {p["project"]: p["input_sha256"] for p in gw.state()["pending"]}
        yield Team(gw, tokens, sleds, rules, token_rows, shown)
    finally:
        for ws in sleds:
            ws.close()


DECISIONS = st.sampled_from(["approve", "deny", "always_allow"])
TEXT = st.one_of(st.sampled_from(["", "x", "Bash(rm:*)", "web-*", "*"]), st.text(max_size=20))
RULES = st.sampled_from(["Bash", "Bash(git push:*)", "Read(./**)", "Bash(*)"])


@st.composite
def attempts(
    draw: st.DrawFn, projects: tuple[str, ...], shown: dict[str, str]
) -> tuple[str, str, dict[str, Any]]:
    """(method, path, JSON body) of a state-changing request naming one of ``projects``,
    each field present or not, and right (the pending request, its input's hash) as
    often as not."""
    project = draw(st.sampled_from(projects))
    req_id = draw(st.one_of(st.just(PENDING), TEXT))
    digest = st.one_of(st.just(shown[project]), st.just(shown[project]), TEXT)
    some = st.fixed_dictionaries
    options = [
        st.tuples(
            st.just("POST"),
            st.just(f"/api/permissions/{quote(project, safe='')}/{quote(req_id, safe='') or 'x'}"),
            some(
                {"decision": DECISIONS},
                optional={"reason": TEXT, "rule": RULES, "input_sha256": digest},
            ),
        ),
        st.tuples(
            st.just("POST"),
            st.just("/api/permissions/decide"),
            some(
                {
                    "decision": DECISIONS,
                    "items": st.lists(
                        some(
                            {"project": st.just(project), "req_id": st.just(req_id)},
                            optional={"input_sha256": digest},
                        ),
                        min_size=1,
                        max_size=2,
                    ),
                },
                optional={"reason": TEXT},
            ),
        ),
        st.tuples(
            st.just("POST"),
            st.just("/api/rules"),
            some(
                {"rule": RULES, "action": st.sampled_from(["allow", "deny", "ask"])},
                optional={"project": st.just(project), "reason": TEXT},
            ),
        ),
        st.tuples(
            st.just("POST"),
            st.just("/api/rules/import"),
            some(
                {"permissions": st.fixed_dictionaries({"allow": st.lists(RULES, min_size=1)})},
                optional={"project": st.just(project)},
            ),
        ),
        st.tuples(
            st.just("DELETE"), st.integers(0, 3).map(lambda n: f"/api/rules/{n}"), st.just({})
        ),
        st.tuples(
            st.just("POST"),
            st.just("/api/tokens"),
            some(
                {"person": st.sampled_from([VIEWER, APPROVER, NOBODY])},
                optional={"expires_in": st.integers(60, 3600)},
            ),
        ),
        st.tuples(
            st.just("DELETE"), st.integers(0, 4).map(lambda n: f"/api/tokens/{n}"), st.just({})
        ),
        st.tuples(
            st.just("POST"),
            st.just(f"/sleds/{quote(project, safe='')}/mcp"),
            st.just(
                {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
            ),
        ),
    ]
    attempt: tuple[str, str, dict[str, Any]] = draw(st.one_of(options))
    return attempt


def _unchanged(team: Team) -> None:
    gw = team.gw
    assert _pending(gw) == {(p, PENDING) for p in PROJECTS}
    with team.operator() as op:
        assert op.get("/api/rules").json()["rules"] == team.rules
        assert op.get("/api/tokens").json()["tokens"] == team.token_rows
    decided = [row for row in gw.audit() if row.get("req_id") == PENDING]
    assert decided == [], decided
    for ws in team.sleds:
        try:
            sent = ws.recv(timeout=0)
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            raise AssertionError(f"a sled's socket was closed: {exc}") from None
        raise AssertionError(f"a sled was sent {sent!r}")


WHO = {
    # person: the projects a request of theirs may name (the ones they may not act on)
    VIEWER: PROJECTS,
    NOBODY: PROJECTS,
    APPROVER: ("api-1",),  # she approves web-*; api-1 and every admin route are not hers
}


@settings(max_examples=40, **FUZZ_SETTINGS)
@given(data=st.data())
@pytest.mark.parametrize("person", sorted(WHO))
def test_a_colleague_with_the_wrong_role_changes_nothing(
    team: Team, person: str, data: st.DataObject
) -> None:
    method, path, body = data.draw(attempts(WHO[person], team.shown), label="request")
    headers = {"Authorization": f"Bearer {team.tokens[person]}"}
    started = time.monotonic()
    with httpx.Client(base_url=team.gw.http_url, timeout=T) as client:
        answer = client.request(
            method,
            path,
            content=json.dumps(body).encode() if method == "POST" else None,
            headers={**headers, "Content-Type": "application/json"}
            if method == "POST"
            else headers,
        )
    shown = f"{person}: {method} {path} {body} -> {answer.status_code} {answer.text[:300]}"
    if path == "/api/permissions/decide" and answer.status_code == 200:
        # Someone who approves some sleds gets each item's own answer.
        assert answer.json()["decided"] == 0, shown
        assert {r["status"] for r in answer.json()["results"]} <= {400, 403, 404, 409}, shown
    else:
        assert 400 <= answer.status_code < 500, shown
    assert answer.headers["content-type"].startswith("application/json"), shown
    assert time.monotonic() - started < T, shown
    _unchanged(team)


#: What each person may see of each sled: none of api-1; eve nothing of web-1 either.
MAY_NOT_SEE = {VIEWER: ("api-1",), APPROVER: ("api-1",), NOBODY: PROJECTS}
READS = (
    "/api/state",
    "/api/audit",
    "/api/rules",
    "/api/rules/impact",
    "/api/tokens",
    "/api/permissions/{}/{}",
    "/api/me",
    "/api/rules/check",
)


@pytest.mark.parametrize("path", READS)
@settings(max_examples=8, **FUZZ_SETTINGS)
@given(data=st.data())
@pytest.mark.parametrize("person", sorted(MAY_NOT_SEE))
def test_a_colleague_reads_nothing_of_a_sled_they_may_not_view(
    team: Team, person: str, path: str, data: st.DataObject
) -> None:
    """Every read (the state, the audit with its filters, the rules, a rule's impact, the
    tokens, one request, who they are, a rule check) answers without a trace of a sled
    they have no role on: its requests' inputs, decided or pending, and its rules."""
    project = data.draw(st.sampled_from([*PROJECTS, ""]), label="project")
    query = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "project": st.just(project),
                "limit": st.sampled_from(["1", "500"]),
                "since": st.just("0"),
                "include_revoked": st.just("1"),
                "decision": st.sampled_from(["deny", "approve"]),
                "person": st.sampled_from([VIEWER, "operator"]),
                "rule": st.sampled_from(["Bash(make:*)", "Bash"]),
                "action": st.sampled_from(["allow", "deny"]),
            },
        ),
        label="query",
    )
    headers = {"Authorization": f"Bearer {team.tokens[person]}"}
    with httpx.Client(base_url=team.gw.http_url, timeout=T, headers=headers) as client:
        if path == "/api/rules/check":
            answer = client.post(
                "/api/rules/check",
                json={
                    "tool_name": "Bash",
                    "tool_input": {"command": "make x"},
                    **({"project": project} if project else {}),
                },
            )
        else:
            req_id = data.draw(st.sampled_from([PENDING, DECIDED]), label="req_id")
            answer = client.get(path.format(project or "web-1", req_id), params=query)
    shown = f"{person}: {answer.request.url} -> {answer.status_code} {answer.text[:300]}"
    assert answer.status_code < 500, shown
    for hidden in MAY_NOT_SEE[person]:
        assert f"{hidden}-secret" not in answer.text, shown
