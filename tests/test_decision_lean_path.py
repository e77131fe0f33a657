"""The decision POST on its lean path (``sled_gateway/http/lean.py``): every check still holds.

``POST /api/permissions/{project}/{req_id}`` no longer goes through Starlette's
router and middlewares. Each test here attacks one check on that route, through
a real gateway and real sockets, and asserts the attack is refused, the request
is still pending, and Starlette never saw the decision POST (so it was the lean
path that served it, or the guard in front of it that refused it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from sled_gateway import Gateway
from sled_gateway.access import load_access
from sled_gateway.http.lean import LeanRoute
from tests.test_gateway import TOKEN, T, recv, run
from tests.test_people import (
    ACCESS,
    APPROVER,
    JSON_TYPE,
    VIEWER,
    as_person,
    operator,
    pending_on,
    person_token,
)
from tests.test_store import frame_payload

pytestmark = pytest.mark.timeout(120)

PROJECT, REQ_ID = "web-1", "r1"
PATH = f"/api/permissions/{PROJECT}/{REQ_ID}"
APPROVE = b'{"decision": "approve"}'


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    path = tmp_path / "access.toml"
    path.write_text(ACCESS)
    return make_reference_gateway(token=TOKEN, access=load_access(path))


def starlette_requests(gw: Gateway) -> list[str]:
    """The HTTP requests that reach Starlette from now on (``METHOD path`` each)."""
    lean = gw._app.routes.asgi
    assert isinstance(lean, LeanRoute)
    seen: list[str] = []
    fallback = lean.fallback

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(f"{scope['method']} {scope['path']}")
        await fallback(scope, receive, send)

    lean.fallback = counted
    return seen


@contextlib.contextmanager
def console(gw: Gateway) -> Iterator[httpx.Client]:
    """A client holding the console's session cookie, as a logged-in browser does."""
    with httpx.Client(base_url=gw.http_url, timeout=T) as client:
        login = client.get(f"/?token={quote(gw.operator_token, safe='')}", follow_redirects=False)
        assert login.status_code == 303 and client.cookies, login.text
        yield client


def refused_and_pending(
    gw: Gateway, send: Callable[[], httpx.Response], status: int, project: str = PROJECT
) -> dict[str, Any]:
    """Send one attack at a pending request: ``status`` with a JSON error, the request still
    pending afterwards, and Starlette never reached by it."""
    seen = starlette_requests(gw)

    async def scenario() -> dict[str, Any]:
        cm, _ws = await pending_on(gw, project, REQ_ID)
        try:
            response = await asyncio.to_thread(send)
            assert response.status_code == status, response.text
            assert response.headers["content-type"].startswith("application/json")
            body = response.json()
            assert isinstance(body["error"], str) and body["error"]
            assert gw.is_pending(project, REQ_ID)
            assert response.headers["x-frame-options"] == "DENY"  # the guard's headers too
            return body
        finally:
            await cm.__aexit__(None, None, None)

    body = run(scenario())
    assert not [r for r in seen if r.startswith("POST /api/permissions/")], seen
    return body


def test_the_decision_post_takes_the_lean_path_and_everything_else_starlette(
    gw: Gateway,
) -> None:
    seen = starlette_requests(gw)

    async def scenario() -> None:
        cm, ws = await pending_on(gw, PROJECT, REQ_ID)
        try:
            with operator(gw) as client:
                done = await asyncio.to_thread(client.post, PATH, content=APPROVE)
                assert done.status_code == 200, done.text
                assert done.json()["decided"]["decision"] == "approve"
                assert await recv(ws) == frame_payload(REQ_ID, "approve")
                shown = await asyncio.to_thread(client.get, PATH)
                assert shown.status_code == 200 and shown.json()["state"] == "approve"
        finally:
            await cm.__aexit__(None, None, None)

    run(scenario())
    # The GET (and the tests' own state polls) went through Starlette; the POST did not.
    assert f"GET {PATH}" in seen
    assert not [r for r in seen if r.startswith("POST ")], seen
    assert [r["req_id"] for r in gw.audit() if r["decision"] == "approve"] == [REQ_ID]


def test_a_cookie_with_a_hostile_origin_is_refused(gw: Gateway) -> None:
    with console(gw) as browser:
        body = refused_and_pending(
            gw,
            lambda: browser.post(
                PATH, content=APPROVE, headers={**JSON_TYPE, "Origin": "http://evil.example"}
            ),
            403,
        )
    assert "Origin" in body["error"]


def test_a_cookie_without_origin_is_refused(gw: Gateway) -> None:
    with console(gw) as browser:
        refused_and_pending(gw, lambda: browser.post(PATH, content=APPROVE, headers=JSON_TYPE), 403)


def test_a_cookie_from_another_site_is_refused(gw: Gateway) -> None:
    with console(gw) as browser:
        own = {"Origin": gw.http_url.rstrip("/"), "Sec-Fetch-Site": "same-site", **JSON_TYPE}
        body = refused_and_pending(
            gw, lambda: browser.post(PATH, content=APPROVE, headers=own), 403
        )
    assert "cross-site" in body["error"]


def test_a_viewer_cannot_decide(gw: Gateway) -> None:
    _, token = person_token(gw, VIEWER)
    with as_person(gw, token) as vera:
        body = refused_and_pending(gw, lambda: vera.post(PATH, content=APPROVE), 403)
    assert body["needs"] == "approver"


def test_an_approver_of_other_projects_cannot_decide(gw: Gateway) -> None:
    _, token = person_token(gw, APPROVER)  # approver of web-*, nothing of api-*
    with as_person(gw, token) as alice:
        body = refused_and_pending(
            gw,
            lambda: alice.post(f"/api/permissions/api-1/{REQ_ID}", content=APPROVE),
            403,
            project="api-1",
        )
    assert body["needs"] == "approver"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": "Bearer sgp_not-a-person-token"},
    ],
    ids=["none", "wrong", "unknown-person-token"],
)
def test_no_valid_token_is_refused(gw: Gateway, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=T) as client:
        refused_and_pending(
            gw, lambda: client.post(PATH, content=APPROVE, headers={**JSON_TYPE, **headers}), 401
        )


def test_a_host_not_served_here_is_refused(gw: Gateway) -> None:
    with operator(gw) as client:
        refused_and_pending(
            gw, lambda: client.post(PATH, content=APPROVE, headers={"Host": "evil.example"}), 421
        )


def test_a_body_that_is_not_declared_json_is_refused(gw: Gateway) -> None:
    with operator(gw) as client:
        refused_and_pending(
            gw,
            lambda: client.post(PATH, content=APPROVE, headers={"Content-Type": "text/plain"}),
            415,
        )


def test_a_body_over_the_cap_is_refused(gw: Gateway) -> None:
    big = json.dumps({"decision": "approve", "reason": "x" * (64 * 1024)}).encode()
    with operator(gw) as client:
        body = refused_and_pending(gw, lambda: client.post(PATH, content=big), 413)
    assert body["error"] == "body too large"


@pytest.mark.parametrize(
    "sent",
    [b"{not json", b'"approve"', b'{"decision": "maybe"}', b'{"decision": "approve", "reason": 7}'],
    ids=["not-json", "not-an-object", "unknown-decision", "reason-not-text"],
)
def test_a_bad_body_is_a_400_in_json(gw: Gateway, sent: bytes) -> None:
    with operator(gw) as client:
        refused_and_pending(gw, lambda: client.post(PATH, content=sent), 400)


def test_a_second_decision_is_refused_and_the_first_stands(gw: Gateway) -> None:
    seen = starlette_requests(gw)

    async def scenario() -> None:
        cm, ws = await pending_on(gw, PROJECT, REQ_ID)
        try:
            with operator(gw) as client:
                first = await asyncio.to_thread(client.post, PATH, content=APPROVE)
                second = await asyncio.to_thread(client.post, PATH, content=b'{"decision": "deny"}')
            assert first.status_code == 200, first.text
            assert second.status_code == 409, second.text
            assert second.json()["decided"]["decision"] == "approve"
            assert await recv(ws) == frame_payload(REQ_ID, "approve")
            with pytest.raises(TimeoutError):  # one answer, never a second
                await asyncio.wait_for(ws.recv(), 0.5)
        finally:
            await cm.__aexit__(None, None, None)

    run(scenario())
    assert not [r for r in seen if r.startswith("POST ")], seen
    rows = [r for r in gw.audit() if r["req_id"] == REQ_ID]
    assert [r["decision"] for r in rows] == ["approve"]


def test_a_handler_that_fails_answers_500_in_json_and_decides_nothing(gw: Gateway) -> None:
    # The store is the real one; what fails is the route's own code, before any commit.
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    gw._app.approvals.decide = broken  # type: ignore[method-assign]
    with operator(gw) as client:
        refused_and_pending(gw, lambda: client.post(PATH, content=APPROVE), 500)
