"""Whatever a credentialed client sends to any of the gateway's HTTP routes, the answer is
a 4xx or a 2xx, never a 5xx, and every refusal is JSON: property-based requests against a
real gateway on a loopback port (hypothesis draws the route, the path's parts, the query
and the body; the operator's token and the gateway's own origin get them past the guard,
so that the handlers behind it are what is tried). The console's page (``GET /``)
answers a browser with a page, refusals included. And a handler's own bug answers
JSON as well, telling nothing of itself.

Each run draws 15 requests for each gateway route and 20 for each ingress route (about
18 s); runs of 8,000 found no 5xx either. A 500 planted in a query check is found.
The requests mix the parameters and body fields the handlers read with values of every
JSON type and text with separators, escapes, NULs and unpaired surrogates, as a buggy or
hostile client would send them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sled_gateway import Gateway
from tests.test_gateway import TOKEN, T

if TYPE_CHECKING:
    from actors import Uplink
    from tests.support.gateway import Gateway as TestGateway

pytestmark = [pytest.mark.security, pytest.mark.timeout(300)]

#: (method, path with ``{}`` for each part drawn)
ROUTES = (
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/api/state"),
    ("GET", "/api/audit"),
    ("GET", "/api/rules"),
    ("POST", "/api/rules"),
    ("POST", "/api/rules/check"),
    ("POST", "/api/rules/import"),
    ("GET", "/api/rules/impact"),
    ("DELETE", "/api/rules/{}"),
    ("GET", "/api/tokens"),
    ("POST", "/api/tokens"),
    ("DELETE", "/api/tokens/{}"),
    ("POST", "/api/permissions/decide"),
    ("GET", "/api/permissions/{}/{}"),
    ("POST", "/api/permissions/{}/{}"),
    ("POST", "/sleds/{}/mcp"),
    ("GET", "/api/me"),
    ("POST", "/logout"),
    ("GET", "/login"),
    ("GET", "/auth/callback"),
    ("GET", "/api/sled-uplink"),
    ("PUT", "/api/rules"),
    ("PATCH", "/api/permissions/{}/{}"),
)

#: Names the handlers read, in the query and in JSON bodies.
NAMES = (
    "limit",
    "before",
    "since",
    "project",
    "person",
    "decision",
    "rule",
    "rules",
    "action",
    "reason",
    "tool_name",
    "tool_input",
    "key",
    "req_id",
    "items",
    "include_revoked",
    "expires_in",
    "name",
    "roles",
    "state",
    "error",
    "token",
    "jsonrpc",
    "method",
    "id",
    "params",
    "requested_at",
)

TRICKY = st.sampled_from(
    [
        "",
        "0",
        "-1",
        "1e309",
        "NaN",
        "99999999999999999999999",
        "../..",
        "a/b",
        "%00",
        "\x00",
        "\ud800",
        "é",
        " ",
        "Bash(rm:*)",
        "Bash(",
        "allow",
        "deny",
        "ask",
        "approve",
        "always_allow",
        "true",
        "2026-12-07T00:00:00+14:00",
        "0001-01-01",
        "x" * 5000,
    ]
)
TEXT = st.one_of(TRICKY, st.text(max_size=40))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
)
RULE_TEXT = st.one_of(
    st.sampled_from(["Bash", "Bash(git push:*)", "Read(./src/**)", "WebFetch(domain:x.test)"]),
    st.builds(lambda tool, inner: f"{tool}({inner})", st.sampled_from(["Bash", "Edit"]), TEXT),
    TEXT,
)


def _maybe(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(plausible, plausible, VALUES)


ACTIONS = _maybe(st.sampled_from(["allow", "deny", "ask"]))
DECISIONS = _maybe(st.sampled_from(["approve", "deny", "always_allow"]))
ITEM = st.fixed_dictionaries(
    {"project": _maybe(st.just("p")), "req_id": _maybe(TEXT)},
    optional={"input_sha256": _maybe(st.text("0123456789abcdef", min_size=64, max_size=64))},
)
#: The fields each route reads, with plausible values as often as any.
SHAPES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    # A rule in Claude Code's grammar; an exact rule (tool_name and key) is "/api/rules#exact".
    "/api/rules": {
        "rule": _maybe(RULE_TEXT),
        "action": ACTIONS,
        "project": _maybe(st.just("p")),
        "reason": _maybe(TEXT),
    },
    "/api/rules#exact": {
        "tool_name": _maybe(st.just("Bash")),
        "key": _maybe(TEXT),
        "action": ACTIONS,
        "project": _maybe(st.just("p")),
    },
    "/api/rules/check": {
        "tool_name": _maybe(st.sampled_from(["Bash", "Read", "Edit"])),
        "tool_input": _maybe(st.fixed_dictionaries({"command": TEXT, "file_path": TEXT})),
        "project": _maybe(st.just("p")),
    },
    "/api/rules/import": {
        "permissions": _maybe(
            st.dictionaries(
                st.sampled_from(["allow", "deny", "ask"]), st.lists(RULE_TEXT, max_size=3)
            )
        ),
        "project": _maybe(st.just("p")),
        "reason": _maybe(TEXT),
    },
    "/api/tokens": {
        "person": _maybe(st.sampled_from(["alice@example.test", "https://idp.test|sub"])),
        "expires_in": _maybe(st.integers(-5, 10**12)),
    },
    "/api/permissions/decide": {
        "items": _maybe(st.lists(ITEM, max_size=3)),
        "decision": DECISIONS,
        "reason": _maybe(TEXT),
    },
    "/api/permissions/{}/{}": {
        "decision": DECISIONS,
        "reason": _maybe(TEXT),
        "input_sha256": _maybe(TEXT),
        "rule": _maybe(RULE_TEXT),
    },
    "/sleds/{}/mcp": {
        "jsonrpc": _maybe(st.just("2.0")),
        "method": _maybe(st.sampled_from(["initialize", "tools/list", "tools/call"])),
        "id": _maybe(st.integers()),
        "params": VALUES,
    },
}
# The bounds the handlers check, each side of them, and any number.
NUMBER_TEXT = _maybe(
    st.one_of(
        st.sampled_from(["-1", "0", "1", "500", "501", "100000", "100001", str(2**62 + 1)]),
        st.integers(-3, 10**7).map(str),
    )
)
#: The query each route reads, with plausible values as often as any.
QUERIES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/api/state": {"limit": NUMBER_TEXT},
    "/api/audit": {
        "limit": NUMBER_TEXT,
        "before": NUMBER_TEXT,
        "since": _maybe(st.sampled_from(["0", "1765000000.5", "2026-12-07T10:00:00Z"])),
        "project": _maybe(st.just("p")),
        "person": _maybe(st.just("alice@example.test")),
        "decision": DECISIONS,
    },
    "/api/rules": {"include_revoked": _maybe(st.sampled_from(["1", "true", "no"]))},
    "/api/tokens": {"include_revoked": _maybe(st.sampled_from(["1", "true", "no"]))},
    "/api/rules/impact": {
        "rule": _maybe(RULE_TEXT),
        "action": ACTIONS,
        "project": _maybe(st.just("p")),
    },
    "/auth/callback": {"state": TEXT, "code": TEXT, "error": TEXT},
}
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8", "text/plain", None]
)


def _part(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="") or "x"


def _query_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


FUZZ_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def draw_body(data: st.DataObject, shapes: list[dict[str, st.SearchStrategy[Any]]]) -> bytes | None:
    """A body in one of ``shapes`` (all of its fields, or some) two times in three, else
    anything."""
    shaped = (
        st.one_of(
            *(st.fixed_dictionaries(shape) for shape in shapes),
            *(st.fixed_dictionaries({}, optional=shape) for shape in shapes),
        ).map(lambda d: json.dumps(d).encode())
        if shapes
        else BODIES
    )
    body: bytes | None = data.draw(st.one_of(shaped, shaped, BODIES), label="body")
    return body


def send_and_check(
    base: str,
    method: str,
    path: str,
    *,
    query: dict[str, Any],
    body: bytes | None,
    headers: dict[str, str],
    content_type: str | None,
    json_refusals: bool = True,
) -> None:
    """Send it; the answer is below 500, and (``json_refusals``) a refusal is JSON."""
    if content_type is not None:
        headers = {**headers, "Content-Type": content_type}
    params = {name: _query_value(value) for name, value in query.items()}
    with httpx.Client(base_url=base, timeout=T) as client:
        answer = client.request(method, path, params=params, content=body, headers=headers)
    shown = (
        f"{method} {answer.request.url} {body!r:.300} -> {answer.status_code} {answer.text:.300}"
    )
    assert answer.status_code < 500, shown
    if answer.status_code >= 400 and json_refusals:
        assert answer.headers.get("content-type", "").startswith("application/json"), shown
        assert isinstance(answer.json().get("error"), str), shown


@pytest.fixture(scope="module")
def reference() -> Iterator[Gateway]:
    """One gateway for every route's examples (module-wide: the function-scoped
    ``make_reference_gateway`` would start one a route)."""
    from tests.conftest import ReferenceGateway

    gw = ReferenceGateway(token=TOKEN).start()
    with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client:
        made = client.post("/api/rules", json={"rule": "Bash(ls:*)", "action": "allow"})
        assert made.status_code == 201, made.text
    yield gw
    gw.stop()


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@settings(max_examples=15, **FUZZ_SETTINGS)
@given(
    parts=st.lists(st.one_of(st.sampled_from(["p", "1", "2"]), TEXT), min_size=2, max_size=2),
    query=st.dictionaries(st.sampled_from(NAMES), TEXT, max_size=4),
    data=st.data(),
    content_type=CONTENT_TYPES,
)
def test_no_request_gets_a_5xx_or_a_refusal_that_is_not_json(
    reference: Gateway,
    route: tuple[str, str],
    parts: list[str],
    query: dict[str, str],
    data: st.DataObject,
    content_type: str | None,
) -> None:
    method, template = route
    shapes = [v for k, v in SHAPES.items() if k.split("#")[0] == template and method == "POST"]
    read = data.draw(st.fixed_dictionaries({}, optional=QUERIES.get(template, {})), label="query")
    send_and_check(
        reference.http_url,
        method,
        template.format(*(_part(p) for p in parts[: template.count("{}")])),
        query={**query, **read},
        body=draw_body(data, shapes),
        headers={**reference.api_headers(), "Origin": reference.http_url},
        content_type=content_type,
        json_refusals=template != "/",  # the console's page answers a page
    )


# ── the uplink's ingress ─────────────────────────────────────────────────────

INGRESS_TOKEN = "fuzz-ingress-token"
INGRESS_ROUTES = (
    ("POST", "/permission"),
    ("POST", "/hooks/claude-code"),
    ("GET", "/status"),
    ("GET", "/healthz"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("PUT", "/permission"),
    ("GET", "/permission"),
    ("POST", "/nowhere"),
)
TOOL_INPUT = _maybe(
    st.fixed_dictionaries({}, optional={"command": TEXT, "file_path": TEXT, "url": TEXT})
)
INGRESS_SHAPES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/permission": {
        "tool_name": _maybe(st.sampled_from(["Bash", "Read", "mcp__x__y"])),
        "tool_input": TOOL_INPUT,
        "input": TOOL_INPUT,
        "request_id": _maybe(st.uuids().map(str)),
        "tool_use_id": _maybe(st.uuids().map(str)),
    },
    "/hooks/claude-code": {
        "hook_event_name": _maybe(st.sampled_from(["PreToolUse", "PermissionRequest", "Stop"])),
        "tool_name": _maybe(st.sampled_from(["Bash", "Read", "mcp__x__y"])),
        "tool_input": TOOL_INPUT,
        "tool_use_id": _maybe(st.uuids().map(str)),
        "permission_suggestions": VALUES,
        "session_id": _maybe(TEXT),
    },
}


@pytest.fixture
def uplink(gateway: TestGateway, make_uplink: Callable[..., Uplink]) -> Uplink:
    """An uplink whose ingress has its token set and whose gateway denies every request
    at once; one for each route (the suite stops every actor after each test), shared by
    its examples."""
    gateway.auto = "deny"
    started = make_uplink(
        gateway.url,
        project="fuzz",
        listen="127.0.0.1:0",
        ingress_token=INGRESS_TOKEN,
        permission_timeout=5.0,
    )
    assert started.wait_connected(T)
    return started


@pytest.fixture
def ingress(uplink: Uplink) -> str:
    return f"http://127.0.0.1:{uplink._ingress.port}"


@pytest.mark.parametrize("route", INGRESS_ROUTES, ids=[f"{m} {p}" for m, p in INGRESS_ROUTES])
@settings(max_examples=20, **FUZZ_SETTINGS)
@given(
    query=st.dictionaries(st.sampled_from(NAMES), TEXT, max_size=3),
    data=st.data(),
    content_type=CONTENT_TYPES,
)
def test_no_request_to_the_ingress_gets_a_5xx_or_a_refusal_that_is_not_json(
    ingress: str,
    route: tuple[str, str],
    query: dict[str, str],
    data: st.DataObject,
    content_type: str | None,
) -> None:
    method, path = route
    shape = INGRESS_SHAPES.get(path) if method == "POST" else None
    send_and_check(
        ingress,
        method,
        path,
        query=query,
        body=draw_body(data, [shape] if shape else []),
        headers={"Authorization": f"Bearer {INGRESS_TOKEN}"},
        content_type=content_type,
    )


def test_a_handler_that_fails_answers_json_and_tells_nothing_of_the_failure(
    monkeypatch: pytest.MonkeyPatch, make_reference_gateway: Callable[..., Gateway]
) -> None:
    """A bug behind a route still answers in the house's shape (an API client parses every
    answer as JSON), and the exception's text stays in the gateway's log."""
    from sled_gateway.hub import Hub

    def broken(_hub: Hub) -> int:
        raise RuntimeError("a detail for the log only")

    gw = make_reference_gateway(token=TOKEN)
    with monkeypatch.context() as planted:
        planted.setattr(Hub, "sled_count", property(broken))
        answer = httpx.get(gw.http_url + "/healthz", timeout=T)
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {"error": "internal error"}
    assert httpx.get(gw.http_url + "/healthz", timeout=T).status_code == 200


def test_a_bug_in_the_ingress_mcp_endpoint_answers_json_and_tells_nothing(uplink: Uplink) -> None:
    """The mounted MCP endpoint (Claude Code's permission prompt) answers a bug of its
    own in the ingress's JSON shape, as every other ingress route does."""

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a detail for the log only")

    ingress = uplink._ingress
    assert ingress is not None and "/mcp" in ingress._mounts
    ingress._mounts["/mcp"] = broken
    answer = httpx.post(
        f"http://127.0.0.1:{ingress.port}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": f"Bearer {INGRESS_TOKEN}", "Accept": "application/json"},
        timeout=T,
    )
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {"error": "internal error"}
