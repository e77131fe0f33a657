"""The request checks both HTTP servers share (``protocol.web``): the ``Host``
grammar, the loopback names, JSON content types and the error body.

The ingress and the gateway both call these, so a Host or Content-Type the
one refuses, the other refuses too (the ingress alone also takes an IPv6
address without brackets, which some of its clients send).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from actors.ingress import HttpError, RequestGuard
from protocol.web import (
    LOOPBACK_HOSTS,
    error_body,
    host_name,
    is_json_content_type,
    listen_host_entry,
    split_host,
)
from sled_gateway.auth.console import ConsoleSessionBackend
from sled_gateway.auth.operator import BearerTokenBackend
from sled_gateway.http.errors import error as json_error
from sled_gateway.http.guard import AllowedHosts
from sled_gateway.http.guard import RequestGuard as GatewayGuard


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:8080", ("localhost", 8080)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
        ("[::1]", ("::1", None)),
        ("[::1]:65535", ("::1", 65535)),
        ("sled.example:3002", ("sled.example", 3002)),
    ],
)
def test_split_host_reads_host_and_port(text: str, parsed: tuple[str, int | None]) -> None:
    assert split_host(text) == parsed
    assert split_host(text, bare_ipv6=True) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ":80",
        ".",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:http",
        "localhost:-1",
        "localhost:\u00b2",  # a digit to str.isdigit, not to int()
        "localhost:8\u0660",  # an Arabic-Indic zero
        "[::1",
        "[::1]x",
        "[evil.example]",
        "[]",
        "::1",
        "fd00::7:80",
    ],
)
def test_split_host_refuses_what_is_no_host(text: str) -> None:
    assert split_host(text) is None
    assert host_name(text) in ("", "::1", "fd00::7:80")


def test_a_bare_ipv6_address_only_where_allowed() -> None:
    assert split_host("fd00::7") is None
    assert split_host("fd00::7", bare_ipv6=True) == ("fd00::7", None)
    assert split_host("no:such::v6", bare_ipv6=True) is None
    assert host_name("::1") == "::1"
    assert host_name("[::1]:3002") == "::1"
    assert host_name("localhost:nope") == ""


def test_loopback_and_listen_entries() -> None:
    assert {host_name(h) for h in LOOPBACK_HOSTS} == {"localhost", "127.0.0.1", "::1"}
    for wildcard in ("", "0.0.0.0", "::"):
        assert listen_host_entry(wildcard) is None
    assert listen_host_entry("::1") == "[::1]"
    assert listen_host_entry("[::1]") == "[::1]"
    assert listen_host_entry("10.0.0.2") == "10.0.0.2"


@pytest.mark.parametrize(
    "value",
    [
        b"application/json",
        "application/json",
        b"Application/JSON",
        b"application/json; charset=utf-8",
        b'application/json;charset="UTF8"',
        "application/json ; foo=bar",
    ],
)
def test_json_content_types(value: bytes | str) -> None:
    assert is_json_content_type(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"text/plain",
        b"text/plain;charset=UTF-8",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"application/json; charset=latin-1",
        "application/json; charset=utf-16",
        b"application/jsonp",
        b"application/json-seq",
    ],
)
def test_not_json_content_types(value: bytes | str | None) -> None:
    assert not is_json_content_type(value)


def test_error_body() -> None:
    assert error_body("no") == {"error": "no"}
    assert error_body("taken", decided={"by": "api"}) == {
        "error": "taken",
        "decided": {"by": "api"},
    }


def test_both_servers_serve_the_same_hosts() -> None:
    """The ingress and the gateway read one Host the same way (ports aside)."""
    guard = RequestGuard.for_config(_Config(), 3002)
    gateway = AllowedHosts.default("::1")
    for host in ("localhost", "127.0.0.1:3002", "[::1]:3002", "LOCALHOST.", "sled.example"):
        parsed = split_host(host)
        assert parsed is not None
        assert (parsed[0] in guard.allowed) == gateway.allows(*parsed), host


class _Config:
    ingress_allowed_hosts: tuple[str, ...] = ()
    listen_address = ("::1", 3002)
    ingress_token = None


def _guard_status(guard: RequestGuard, **headers: str) -> int:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/status",
        "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()],
    }
    try:
        guard.check(scope)
    except HttpError as exc:
        return exc.status
    return 200


def test_the_guard_reads_every_spelling_alike() -> None:
    """The usual spelling of a Host or Origin and any other one get the same verdict."""
    guard = RequestGuard((*LOOPBACK_HOSTS, "sled.example", "bücher.example", "a/b"), 3002)
    for host in (
        "localhost",
        "localhost:3002",
        "LocalHost:3002",
        "localhost.:3002",
        " localhost:3002",
        "[::1]:3002",
        "sled.example:1",
        "bücher.example",
    ):
        assert _guard_status(guard, host=host) == 200, host
    for host in ("evil.example", "localhost:0", "localhost:²", "[::2]:3002", "bücher.example:x"):
        assert _guard_status(guard, host=host) == 421, host
    for origin in ("http://localhost:3002", "http://LOCALHOST:3002", "http://[::1]:3002"):
        assert _guard_status(guard, host="localhost", origin=origin) == 200, origin
    for origin in (
        "http://localhost:3003",
        "http://localhost",
        "https://localhost:3002",
        "http://localhost:3002/",
        "http://a@localhost:3002",
        "http://a/b:3002",
        "http://localhost:²",
        "null",
    ):
        assert _guard_status(guard, host="localhost", origin=origin) == 403, origin


def test_json_error_is_the_gateways_one_error_answer() -> None:
    response = json_error(409, "already decided", decided={"by": "api"})
    assert response.status_code == 409
    assert json.loads(response.body) == {"error": "already decided", "decided": {"by": "api"}}
    challenge = json_error(401, "who?", headers={"WWW-Authenticate": "Bearer"})
    assert challenge.headers["www-authenticate"] == "Bearer"
    assert json.loads(challenge.body) == {"error": "who?"}


def _gateway_answer(*headers: tuple[bytes, bytes], method: str = "POST") -> tuple[int, Any]:
    """One request through the gateway's front door, straight to its ASGI callable."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await json_error(200, "reached the app")(scope, receive, send)

    door = GatewayGuard(
        app,
        operator=BearerTokenBackend("op"),
        console=ConsoleSessionBackend(),
        allowed_hosts=AllowedHosts.default(""),
    )
    scope = {
        "type": "http",
        "method": method,
        "path": "/api/x",
        "headers": [(b"authorization", b"Bearer op"), *headers],
        "query_string": b"",
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(door(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_the_gateway_uses_the_shared_host_and_json_rules() -> None:
    json_type = (b"content-type", b"application/json")
    assert _gateway_answer((b"host", b"localhost:8"), json_type)[0] == 200
    for host in (b"localhost:\xb2", b"localhost:0", b"::1", b"[evil]:1"):
        status, body = _gateway_answer((b"host", host), json_type)
        assert (status, body) == (421, {"error": ANY_HOST_ERROR}), host
    for ctype in (b"text/plain", b"application/json; charset=latin-1"):
        status, body = _gateway_answer((b"host", b"localhost"), (b"content-type", ctype))
        assert status == 415, ctype
        assert body == {"error": "Content-Type must be application/json"}


ANY_HOST_ERROR = "this Host is not served here (see --allowed-host)"
