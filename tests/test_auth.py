"""The authentication backends on their own: each credential yields its Principal, or not.

Requests are real ASGI scopes read through Starlette's ``HTTPConnection``; the
whole guard is tested over sockets in tests/test_security_gateway.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.authentication import AuthenticationError
from starlette.requests import HTTPConnection

from sled_gateway.auth import Authenticated, PrincipalUser, principal_of
from sled_gateway.auth.console import ConsoleSessionBackend, Sessions, cookie_name
from sled_gateway.auth.operator import BearerTokenBackend
from sled_gateway.auth.sled import SledTokenBackend
from sled_gateway.people import Person
from sled_gateway.principal import Channel, Principal, Role


def connection(headers: dict[str, str] | None = None, query: str = "") -> HTTPConnection:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": query.encode("latin-1"),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("127.0.0.1", 8000),
    }
    return HTTPConnection(scope)


def principal(found: Authenticated | None) -> Principal | None:
    return found[1].principal if found is not None else None


def run(backend: Any, conn: HTTPConnection) -> Principal | None:
    return principal(asyncio.run(backend.authenticate(conn)))


def test_bearer_token() -> None:
    backend = BearerTokenBackend("op-secret")
    assert run(backend, connection()) is None
    assert run(backend, connection({"Authorization": "Basic abc"})) is None
    found = run(backend, connection({"Authorization": "Bearer op-secret"}))
    assert found == Principal.operator(Channel.API)
    assert found.by == "api" and found.has(Role.ADMIN)
    with pytest.raises(AuthenticationError):
        run(backend, connection({"Authorization": "Bearer wrong"}))
    with pytest.raises(ValueError, match="non-empty"):
        BearerTokenBackend("")


def test_console_session_cookie() -> None:
    backend = ConsoleSessionBackend()
    assert run(backend, connection()) is None
    login = asyncio.run(backend.login({"server": ("127.0.0.1", 8000), "scheme": "http"}))
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    name_value = cookie.split(";", 1)[0]
    assert name_value.startswith(cookie_name({"server": ("127.0.0.1", 8000)}) + "=")
    found = run(backend, connection({"Cookie": name_value}))
    assert found is not None and found.by == "console"
    other_port = f"sled_gateway_9999={name_value.split('=', 1)[1]}"
    assert run(backend, connection({"Cookie": other_port})) is None
    assert run(backend, connection({"Cookie": f"{name_value.split('=')[0]}=forged"})) is None


def test_one_person_signing_in_again_and_again_cannot_push_others_out() -> None:
    async def scenario() -> None:
        # cache_seconds=0: every answer comes from the store, as another replica's would.
        sessions = Sessions(limit=20, per_person=3, cache_seconds=0)
        operator = await sessions.create()
        bob = await sessions.create(Person("https://idp.test", "bob"))
        mallory = Person("https://idp.test", "mallory")
        hers = [await sessions.create(mallory) for _ in range(50)]
        assert await sessions.valid(operator) and await sessions.valid(bob)
        assert [await sessions.valid(s) for s in hers[-4:]] == [False, True, True, True]
        session = await sessions.get(hers[-1])
        assert session is not None and session.person == mallory
        assert await sessions.end(hers[-1]) and not await sessions.valid(hers[-1])
        assert not await sessions.end(hers[-1])

    asyncio.run(scenario())


def test_sled_tokens() -> None:
    backend = SledTokenBackend("shared", {"alpha": "alpha-token"})
    assert run(backend, connection()) is None
    assert run(backend, connection(query="token=alpha-token")) == Principal.sled("alpha")
    assert run(backend, connection(query="token=shared")) == Principal.sled(None)
    with pytest.raises(AuthenticationError):
        run(backend, connection(query="token=%C3%A9"))  # non-ASCII compares, and fails
    assert backend.projects == {"alpha"}
    open_gateway = SledTokenBackend(None, {})
    assert open_gateway.open
    assert run(open_gateway, connection()) == Principal.sled(None)


def test_principal_of_a_request() -> None:
    conn = connection()
    with pytest.raises(LookupError):
        principal_of(conn)
    conn.scope["user"] = PrincipalUser(Principal.terminal())
    assert principal_of(conn) == Principal.terminal()
