"""The sans-I/O side of the uplink's secrets and untrusted text: strings in, values out.

:func:`protocol.redact` hides every credential a URL or a message can carry
and keeps the text around it; :func:`protocol.urls.with_token` puts any token
into a URL so that it arrives unchanged; :func:`protocol.text.printable`
leaves no control character in what a terminal or a log line shows; the
ingress's :class:`RequestGuard` decides on a request from its scope alone.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.ingress import HttpError, RequestGuard, host_name
from protocol import redact
from protocol.text import printable
from protocol.urls import has_token, is_loopback_host, plain_text_token_host, with_token

pytestmark = pytest.mark.security

# ── redact ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The text after a token survives (it used to lose the ")").
        ("(gateway ws://h/api?token=abc)", "(gateway ws://h/api?token=***)"),
        ("[ws://h/?token=abc]", "[ws://h/?token=***]"),
        ("<ws://h/?token=abc>", "<ws://h/?token=***>"),
        ("ws://h/?token=abc, then", "ws://h/?token=***, then"),
        ("{'url': 'ws://h/?token=abc'}", "{'url': 'ws://h/?token=***'}"),
        ("`ws://h/?token=abc`", "`ws://h/?token=***`"),
        ("(token=abc)", "(token=***)"),
        # user:password@ and a bare user-info token.
        ("ws://alice:hunter2@gw:8080/api", "ws://alice:***@gw:8080/api"),
        ("wss://ghp_abcdef@gw/api", "wss://***@gw/api"),
        ("connect (ws://a:b@h/x) failed", "connect (ws://a:***@h/x) failed"),
        ("ws://a:b@h/x?token=t&v=1", "ws://a:***@h/x?token=***&v=1"),
        # An HTTP credential quoted in a message.
        ("Authorization: Bearer s3cr3t.tok", "Authorization: Bearer ***"),
        ("header 'Bearer abc'", "header 'Bearer ***'"),
        ("password=hunter2&user=a", "password=***&user=a"),
        # Nothing to hide.
        ("ws://gw/a@b", "ws://gw/a@b"),
        ("mailto:someone@example.com", "mailto:someone@example.com"),
        ("tokens=3 tokenize=yes", "tokens=3 tokenize=yes"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


TOKEN_CHARS = string.ascii_letters + string.digits + "-._~%+/=:!$*"
AFTER = [")", "]", ">", ",", "'", '"', " rest", "&v=1", "#frag", ";", "}", "\n"]


@settings(max_examples=300, deadline=None)
@given(
    st.text(TOKEN_CHARS, min_size=1, max_size=40),
    st.sampled_from(["(", "[", "<", " ", "'", '"', "{", ","]),
    st.sampled_from(AFTER),
)
def test_redact_hides_the_token_and_keeps_what_follows(token: str, before: str, after: str) -> None:
    text = f"x{before}ws://gw.example:8080/api?token={token}{after}y"
    redacted = redact(text)
    assert redacted == f"x{before}ws://gw.example:8080/api?token=***{after}y"
    assert redact(redacted) == redacted


@settings(max_examples=200, deadline=None)
@given(
    st.text(string.ascii_letters + string.digits + "-._~", min_size=1, max_size=20),
    st.text(string.ascii_letters + string.digits + "-._~%!$&'*+=", min_size=1, max_size=30),
)
def test_redact_hides_any_url_password(user: str, password: str) -> None:
    redacted = redact(f"ws://{user}:{password}@gw.example/api")
    assert redacted == f"ws://{user}:***@gw.example/api"


# ── with_token ───────────────────────────────────────────────────────────


@settings(max_examples=300, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(
        [
            "ws://gw:8080/api/sled-uplink",
            "wss://gw/api/sled-uplink?project=p",
            "ws://gw/api?token=old&v=1",
            "ws://gw/api?token=old&token=older#frag",
        ]
    ),
)
def test_any_token_round_trips_through_the_url(token: str, url: str) -> None:
    built = with_token(url, token)
    parts, original = urlsplit(built), urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    assert query["token"] == [token], "exactly one token, the given one, decoded unchanged"
    assert (parts.scheme, parts.netloc, parts.path) == (
        original.scheme,
        original.netloc,
        original.path,
    )
    assert parts.fragment == original.fragment
    others = {k: v for k, v in parse_qs(original.query).items() if k != "token"}
    assert {k: v for k, v in query.items() if k != "token"} == others
    assert has_token(built)
    # Percent-encoded, the whole value is hidden, whatever its characters.
    assert parse_qs(urlsplit(redact(built)).query)["token"] == ["***"]


def test_plain_ws_with_a_token_off_loopback_is_flagged() -> None:
    assert plain_text_token_host("ws://gw.example/api?token=t") == "gw.example"
    assert plain_text_token_host("ws://gw.example/api", "t") == "gw.example"
    assert plain_text_token_host("ws://10.0.0.2:8080/api?token=t") == "10.0.0.2"
    assert plain_text_token_host("wss://gw.example/api?token=t") is None
    assert plain_text_token_host("ws://gw.example/api") is None
    assert plain_text_token_host("ws://gw.example/api?token=") is None
    for loopback in ("127.0.0.1", "127.8.9.1", "[::1]", "localhost", "LocalHost", "a.localhost"):
        assert plain_text_token_host(f"ws://{loopback}:8080/api?token=t") is None, loopback
    assert is_loopback_host("::1")
    assert not is_loopback_host("localhost.evil.example")


# ── printable ────────────────────────────────────────────────────────────

CONTROL = ("Cc", "Cf", "Zl", "Zp", "Cs")


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_printable_leaves_no_control_character(text: str) -> None:
    shown = printable(text)
    assert not [c for c in shown if unicodedata.category(c) in CONTROL]
    if not [c for c in text if unicodedata.category(c) in CONTROL]:
        assert shown == text, "printable text is left alone"


def test_printable_spells_out_escapes() -> None:
    assert printable("a\x1b[31mb\r\nc\td\x07\x7f\x9b\u202e\u2028") == (
        "a\\x1b[31mb\\r\\nc\\td\\x07\\x7f\\x9b\\u202e\\u2028"
    )


# ── the ingress's request checks ─────────────────────────────────────────


def scope(method: str = "GET", path: str = "/status", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def status_of(guard: RequestGuard, request: dict[str, Any]) -> int:
    try:
        guard.check(request)
    except HttpError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        ("127.0.0.1:3002", "127.0.0.1"),
        ("LOCALHOST", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:3002", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("fd00::7", "fd00::7"),
    ],
)
def test_host_name(authority: str, name: str) -> None:
    assert host_name(authority) == name


def test_the_guard_decides_from_the_scope_alone() -> None:
    guard = RequestGuard(("localhost", "127.0.0.1", "::1"), 3002, "t0k")
    ok = {"host": "127.0.0.1:3002", "authorization": "Bearer t0k"}
    assert status_of(guard, scope(**ok)) == 200
    assert status_of(guard, scope(host="evil.example:3002", authorization="Bearer t0k")) == 421
    assert status_of(guard, scope(authorization="Bearer t0k")) == 421  # no Host at all
    assert status_of(guard, scope(**ok, origin="http://127.0.0.1:3003")) == 403
    assert status_of(guard, scope(**ok, origin="http://[::1]:3002")) == 200
    assert status_of(guard, scope(**ok, origin="http://user@127.0.0.1:3002")) == 403
    assert status_of(guard, scope(host="localhost")) == 401
    assert status_of(guard, scope(path="/healthz", host="localhost")) == 200
    assert status_of(guard, scope("POST", "/permission", **ok)) == 415
    json_post = scope("POST", "/permission", **ok, content_type="application/json")
    assert status_of(guard, json_post) == 200
    twice = scope(**ok)
    twice["headers"].append((b"host", b"evil.example"))
    assert status_of(guard, twice) == 400, "a second Host header is refused, not guessed at"
    for name in (b"origin", b"authorization"):
        repeated = scope(**ok, origin="http://127.0.0.1:3002")
        repeated["headers"].append((name, b"x"))
        assert status_of(guard, repeated) == 400, f"a second {name!r} header is refused"
    json_charset = scope(
        "POST", "/permission", **ok, content_type="application/json; charset=latin-1"
    )
    assert status_of(guard, json_charset) == 415
