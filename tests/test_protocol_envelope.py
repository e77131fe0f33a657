"""The frame envelope: parse, serialize, and their errors.

Ports ``uplink_envelope_roundtrips_json`` and the frame-level halves of
``on_gateway_text_ignores_unknown_type`` / ``on_gateway_text_ignores_invalid_json``
from ``reference/sled_uplink.rs.txt``, and checks that serialization is
byte-for-byte serde_json's compact form.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol import (
    HEARTBEAT,
    Envelope,
    Kind,
    LocalProtocolError,
    PermRequest,
    ProtocolError,
    RemoteProtocolError,
    UplinkError,
    identity,
    mcp_response,
    parse,
    serialize,
)

REASONS = {"binary", "not_json", "not_object", "bad_type", "bad_req_id"}
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: Any, b: Any) -> bool:
    """Deep equality that, unlike ``==``, tells True from 1 and 1 from 1.0 and -0.0 from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def same_envelope(a: Envelope, b: Envelope) -> bool:
    return same(a.type, b.type) and same(a.req_id, b.req_id) and same(a.payload, b.payload)


def remote_error(data: str | bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        parse(data)
    return info.value


# ── The reference's unit test ─────────────────────────────────────────────


def test_uplink_envelope_roundtrips_json() -> None:
    env = Envelope("perm_request", "req-1", {"tool_name": "Bash", "tool_input": {}})
    back = parse(serialize(env))
    assert back.type == "perm_request"
    assert back.req_id == "req-1"
    assert back.payload["tool_name"] == "Bash"
    assert same_envelope(back, env)


def test_unknown_type_is_a_legal_envelope() -> None:
    # on_gateway_text_ignores_unknown_type: later protocol phases arrive as new kinds.
    env = parse('{"type":"future_type","req_id":"x","payload":{}}')
    assert env == Envelope("future_type", "x", {})


def test_invalid_json_is_a_remote_protocol_error() -> None:
    # on_gateway_text_ignores_invalid_json
    assert remote_error("not-json").reason == "not_json"


# ── Exact wire form (serde_json compact, field order type, req_id, payload) ──


def test_identity_frame_is_exactly_serde_form() -> None:
    assert (
        serialize(identity("p"))
        == '{"type":"identity","req_id":"identity","payload":{"project":"p"}}'
    )


def test_identity_extra_keys_follow_project() -> None:
    text = serialize(identity("p", version="1.2"))
    assert text == (
        '{"type":"identity","req_id":"identity","payload":{"project":"p","version":"1.2"}}'
    )


def test_heartbeat_frame_is_exactly_serde_form() -> None:
    assert serialize(HEARTBEAT) == '{"type":"heartbeat","req_id":"","payload":null}'


def test_perm_request_frame_is_exactly_serde_form() -> None:
    env = PermRequest("Bash", {"command": "ls -l"}).envelope("req-1")
    assert serialize(env) == (
        '{"type":"perm_request","req_id":"req-1",'
        '"payload":{"tool_name":"Bash","tool_input":{"command":"ls -l"}}}'
    )


def test_mcp_response_null_payload_keeps_the_key() -> None:
    assert (
        serialize(mcp_response("m1", None))
        == '{"type":"mcp_response","req_id":"m1","payload":null}'
    )


def test_key_order_is_type_req_id_payload_even_when_built_by_keyword() -> None:
    env = Envelope(payload=[1, 2], req_id="r", type="t")
    assert serialize(env) == '{"type":"t","req_id":"r","payload":[1,2]}'


def test_non_ascii_is_written_as_utf8_not_escaped() -> None:
    env = Envelope("perm_request", "réq-✓", {"tool_input": "echo héllo 世界 😀"})
    text = serialize(env)
    assert (
        text
        == '{"type":"perm_request","req_id":"réq-✓","payload":{"tool_input":"echo héllo 世界 😀"}}'
    )
    assert "\\u" not in text
    assert parse(text) == env


def test_control_characters_are_escaped_like_serde() -> None:
    env = Envelope("t", "r", 'a"b\\c/\n\r\t\b\f\x01\x1f\x7f')
    # serde_json: short escapes where JSON has them, \u00XX (lowercase) for the
    # other C0 controls, '/' and DEL left alone.
    assert serialize(env) == (
        '{"type":"t","req_id":"r","payload":"a\\"b\\\\c/\\n\\r\\t\\b\\f\\u0001\\u001f\x7f"}'
    )
    assert parse(serialize(env)) == env


def test_every_kind_constant_is_its_wire_name() -> None:
    assert [Kind.IDENTITY, Kind.HEARTBEAT, Kind.PERM_REQUEST, Kind.PERM_RESPONSE] == [
        "identity",
        "heartbeat",
        "perm_request",
        "perm_response",
    ]
    assert [Kind.MCP_REQUEST, Kind.MCP_RESPONSE] == ["mcp_request", "mcp_response"]


# ── Parsing what the gateway sends ────────────────────────────────────────


def test_missing_payload_reads_as_none() -> None:
    assert parse('{"type":"perm_response","req_id":"r1"}') == Envelope("perm_response", "r1", None)


def test_explicit_null_payload_reads_as_none() -> None:
    assert parse('{"type":"heartbeat","req_id":"","payload":null}').payload is None


def test_extra_top_level_keys_are_ignored() -> None:
    env = parse(
        '{"version":2,"type":"perm_response","extra":{"a":[1]},"req_id":"r","payload":true}'
    )
    assert env == Envelope("perm_response", "r", True)


def test_whitespace_around_and_inside_is_accepted() -> None:
    env = parse(' \n\t{ "type" : "t" ,\r\n "req_id" : "r" , "payload" : [ 1 , 2 ] } \n')
    assert same_envelope(env, Envelope("t", "r", [1, 2]))


def test_payload_types_are_kept_exactly() -> None:
    env = parse('{"type":"t","req_id":"r","payload":[true,1,1.0,-0.0,"1",null,{}]}')
    assert same(env.payload, [True, 1, 1.0, -0.0, "1", None, {}])


def test_escaped_non_ascii_and_surrogate_pairs_decode() -> None:
    env = parse('{"type":"t","req_id":"\\u00e9","payload":"\\ud83d\\ude00"}')
    assert env == Envelope("t", "é", "😀")
    assert serialize(env) == '{"type":"t","req_id":"é","payload":"😀"}'


@pytest.mark.parametrize("data", [b'{"type":"t","req_id":"r"}', b"", bytearray(b"{}")])
def test_binary_messages_are_rejected(data: bytes) -> None:
    err = remote_error(data)
    assert err.reason == "binary"
    assert isinstance(err, ProtocolError)
    assert isinstance(err, UplinkError)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "not-json",
        "{",
        '{"type":"t","req_id":"r"',
        '{"type":"t","req_id":"r"} {}',
        "{'type':'t','req_id':'r'}",
        '{"type":"t","req_id":"r",}',
        '{"type":"t","req_id":"r","payload":01}',
        '{"type":"t","req_id":"r","payload":"raw\ncontrol"}',
        "\ufeff{}",
        "NaN",
        "Infinity",
        "-Infinity",
        '{"type":"t","req_id":"r","payload":NaN}',
        '{"type":"t","req_id":"r","payload":[Infinity]}',
        '{"type":"t","req_id":"r","payload":{"x":-Infinity}}',
        # Out of float range: Python would read inf; serde_json refuses it.
        '{"type":"t","req_id":"r","payload":1e400}',
        '{"type":"t","req_id":"r","payload":-1E+999}',
        # A lone surrogate: serde_json refuses it, and it could never be sent
        # back in a UTF-8 text frame.
        '{"type":"t","req_id":"\\ud800","payload":null}',
        '{"type":"t","req_id":"r","payload":{"k\\udfff":1}}',
        '{"type":"t","req_id":"r","payload":["\\ude00\\ud83d"]}',
        '{"type":"t","req_id":"\ud800","payload":null}',
    ],
)
def test_non_json_text_is_rejected(text: str) -> None:
    assert remote_error(text).reason == "not_json"


@pytest.mark.parametrize(
    "text", ["[]", '[{"type":"t","req_id":"r"}]', "1", "-2.5", '"s"', "null", "true"]
)
def test_non_object_json_is_rejected(text: str) -> None:
    assert remote_error(text).reason == "not_object"


@pytest.mark.parametrize(
    "text",
    [
        '{"req_id":"r","payload":{}}',
        '{"type":null,"req_id":"r"}',
        '{"type":1,"req_id":"r"}',
        '{"type":["perm_response"],"req_id":"r"}',
        '{"type":{"name":"x"},"req_id":"r"}',
        '{"TYPE":"perm_response","req_id":"r"}',
        "{}",
    ],
)
def test_missing_or_non_string_type_is_rejected(text: str) -> None:
    assert remote_error(text).reason == "bad_type"


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"perm_response","payload":{}}',
        '{"type":"perm_response","req_id":null}',
        '{"type":"perm_response","req_id":7}',
        '{"type":"perm_response","req_id":true}',
        '{"type":"perm_response","req_id":["r"]}',
    ],
)
def test_missing_or_non_string_req_id_is_rejected(text: str) -> None:
    assert remote_error(text).reason == "bad_req_id"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
        '{"type":"t","req_id":"r","payload":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["open-arrays", "closed-arrays", "open-objects", "deep-payload"],
)
def test_deep_nesting_is_a_remote_error_not_recursion_error(text: str) -> None:
    assert remote_error(text).reason == "not_json"


def test_huge_integer_is_a_remote_error() -> None:
    assert (
        remote_error('{"type":"t","req_id":"r","payload":' + "1" * 5000 + "}").reason == "not_json"
    )


def test_remote_error_carries_reason_and_detail() -> None:
    err = remote_error("[1]")
    assert err.reason == "not_object"
    assert err.detail
    assert str(err).startswith("not_object: ")


# ── Serializing something illegal is *our* bug ────────────────────────────


@pytest.mark.parametrize(
    "payload",
    [
        {1, 2},
        float("nan"),
        float("inf"),
        -float("inf"),
        {"x": [float("nan")]},
        object(),
        b"bytes",
        {("tuple", "key"): 1},
        "lone \ud800 surrogate",
        {"k\udfff": 1},
    ],
    ids=[
        "set",
        "nan",
        "inf",
        "-inf",
        "nested-nan",
        "object",
        "bytes",
        "tuple-key",
        "surrogate",
        "surrogate-key",
    ],
)
def test_non_json_payload_is_a_local_protocol_error(payload: Any) -> None:
    with pytest.raises(LocalProtocolError):
        serialize(Envelope("t", "r", payload))


def test_too_deep_payload_is_a_local_protocol_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(LocalProtocolError):
        serialize(Envelope("t", "r", deep))


@pytest.mark.parametrize(
    ("kind", "req_id"), [(1, "r"), (None, "r"), (b"t", "r"), ("t", None), ("t", 5)]
)
def test_non_string_type_or_req_id_is_a_local_protocol_error(kind: Any, req_id: Any) -> None:
    with pytest.raises(LocalProtocolError):
        serialize(Envelope(kind, req_id, None))


def test_local_and_remote_errors_are_distinct_branches() -> None:
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)


# ── Properties ────────────────────────────────────────────────────────────

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=25,
)
envelopes = st.builds(Envelope, st.text(), st.text(), json_values)

# Text that looks like a frame, well- or ill-formed.
frame_like_objects = st.dictionaries(
    st.sampled_from(["type", "req_id", "payload", "extra"]) | st.text(max_size=5),
    json_values,
    max_size=5,
)
well_formed = st.builds(
    lambda obj, ascii_only, indent: json.dumps(obj, ensure_ascii=ascii_only, indent=indent),
    json_values
    | frame_like_objects
    | st.builds(lambda e: {"type": e.type, "req_id": e.req_id, "payload": e.payload}, envelopes),
    st.booleans(),
    st.none() | st.integers(0, 2),
)
TOKENS = [
    "{", "}", "[", "]", ":", ",", " ", "\n", '"type"', '"req_id"', '"payload"', '"x"', '""',
    "0", "1", "-1", "01", "1.5", "1e400", "-1e-400", "1e", "true", "false", "null", "nul",
    "NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', '"\\u00e9"',
    '"\\x"', '"\\', '"é"', '"\x00"', "\ud800", "\ufeff", "'",
]  # fmt: skip
token_soup = st.lists(st.sampled_from(TOKENS), max_size=30).map("".join)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(well_formed)
    i = draw(st.integers(0, len(text)))
    j = draw(st.integers(i, len(text)))
    return text[:i] + draw(st.sampled_from(["", *TOKENS])) + text[j:]


any_message = (
    st.text()
    | st.text(st.characters() | st.characters(categories=["Cs"]))  # lone surrogates too
    | st.binary()
    | well_formed
    | token_soup
    | mutated()
)


@PROPERTY
@given(any_message)
@example("[" * 100_000)
@example('{"type":"t","req_id":"r","payload":1e999}')
@example('{"type":"t","req_id":"\\udbff","payload":null}')
def test_any_message_gives_an_envelope_or_a_remote_protocol_error(data: str | bytes) -> None:
    reason = None
    try:
        env = parse(data)
    except RemoteProtocolError as err:
        reason = err.reason
    if reason is not None:
        assert reason in REASONS
        return
    assert isinstance(env, Envelope)
    assert isinstance(env.type, str)
    assert isinstance(env.req_id, str)
    # Whatever we accept we can send on (e.g. echo its req_id) as a UTF-8 text frame.
    text = serialize(env)
    text.encode("utf-8")
    assert same_envelope(parse(text), env)


@PROPERTY
@given(envelopes)
def test_serialize_then_parse_round_trips(env: Envelope) -> None:
    text = serialize(env)
    assert same_envelope(parse(text), env)
    # Compact, and valid UTF-8 JSON that the standard library reads the same way.
    assert json.loads(text.encode("utf-8")) == {
        "type": env.type,
        "req_id": env.req_id,
        "payload": env.payload,
    }
    assert list(json.loads(text)) == ["type", "req_id", "payload"]


@PROPERTY
@given(well_formed | mutated() | token_soup)
def test_parse_serialize_parse_is_stable(data: str) -> None:
    try:
        first = parse(data)
    except RemoteProtocolError:
        return
    text = serialize(first)
    second = parse(text)
    assert same_envelope(second, first)
    assert serialize(second) == text
