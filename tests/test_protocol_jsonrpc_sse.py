"""JSON-RPC ids and error objects, the SSE parser, and token redaction."""

from __future__ import annotations

import codecs
import itertools
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import dumps, loads, mcp_response, redact, serialize
from protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    error_for,
    error_object,
    expected_ids,
    is_initialize,
    response_ids,
)
from protocol.sse import Event, SseParser

# ── jsonrpc ───────────────────────────────────────────────────────────────


def err(id_: Any, code: int = INTERNAL_ERROR, message: str = "boom") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def test_error_codes() -> None:
    assert (INVALID_REQUEST, INTERNAL_ERROR) == (-32600, -32603)


@pytest.mark.parametrize("id_", [7, 0, -1, "abc", "", 1.5])
def test_error_for_an_object_carries_its_id(id_: Any) -> None:
    body = {"jsonrpc": "2.0", "id": id_, "method": "tools/list"}
    result = error_for(body, INTERNAL_ERROR, "boom")
    assert result == err(id_)
    assert type(result["id"]) is type(id_)


@pytest.mark.parametrize(
    "body",
    [
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": None, "method": "x"},
        {"jsonrpc": "2.0", "id": True, "method": "x"},
        {"jsonrpc": "2.0", "id": [1], "method": "x"},
        {"jsonrpc": "2.0", "id": {"n": 1}, "method": "x"},
    ],
    ids=["notification", "null-id", "bool-id", "list-id", "object-id"],
)
def test_error_for_an_object_without_a_usable_id_has_null_id(body: Any) -> None:
    assert error_for(body, INVALID_REQUEST, "bad") == err(None, INVALID_REQUEST, "bad")


def test_error_for_a_batch_has_one_error_per_request_id() -> None:
    body = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/progress"},
        {"jsonrpc": "2.0", "id": "b", "method": "tools/call"},
        "not a request",
        {"jsonrpc": "2.0", "id": 0, "method": "ping"},
    ]
    assert error_for(body, INTERNAL_ERROR, "boom") == [err(1), err("b"), err(0)]


@pytest.mark.parametrize("body", [[], [{"jsonrpc": "2.0", "method": "notifications/initialized"}]])
def test_error_for_a_batch_without_request_ids_is_one_null_id_error(body: Any) -> None:
    assert error_for(body, INTERNAL_ERROR, "boom") == err(None)


@pytest.mark.parametrize("text", ["not json", "{", "", "NaN", '{"id": 1,}'])
def test_error_for_a_non_json_body_has_null_id(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - loads documents ValueError
        loads(text)
    # The caller has nothing parsed to take an id from.
    assert error_for(None, INVALID_REQUEST, "not JSON") == err(None, INVALID_REQUEST, "not JSON")
    # Nor does it get one from the raw text, should that be passed instead.
    assert error_for(text, INVALID_REQUEST, "not JSON") == err(None, INVALID_REQUEST, "not JSON")


@pytest.mark.parametrize("body", [42, "text", True, 1.5])
def test_error_for_a_json_scalar_body_has_null_id(body: Any) -> None:
    assert error_for(body, INVALID_REQUEST, "bad") == err(None, INVALID_REQUEST, "bad")


def test_error_object_goes_on_the_wire_as_an_mcp_response() -> None:
    payload = error_for(
        loads('{"jsonrpc":"2.0","id":"q-1","method":"tools/list"}'), INTERNAL_ERROR, "x"
    )
    assert serialize(mcp_response("m9", payload)) == (
        '{"type":"mcp_response","req_id":"m9","payload":'
        '{"jsonrpc":"2.0","id":"q-1","error":{"code":-32603,"message":"x"}}}'
    )
    assert error_object(3, INVALID_REQUEST, "m") == err(3, INVALID_REQUEST, "m")


def test_loads_is_strict_and_accepts_bytes() -> None:
    assert loads(b'{"id":1,"s":"\xc3\xa9"}') == {"id": 1, "s": "é"}
    for bad in ("NaN", "[Infinity]", "[-Infinity]"):
        with pytest.raises(ValueError):  # noqa: PT011
            loads(bad)
    with pytest.raises(ValueError):  # noqa: PT011 - invalid UTF-8 is a ValueError too
        loads(b'{"s":"\xff"}')
    assert dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "a"}, [1]),
        ({"jsonrpc": "2.0", "id": 0, "method": "a"}, [0]),
        ({"jsonrpc": "2.0", "id": "", "method": "a"}, [""]),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, []),
        ({"jsonrpc": "2.0", "id": False, "method": "a"}, []),
        (
            [{"id": "a", "method": "x"}, {"method": "n"}, {"id": 2, "method": "y"}, 5, None],
            ["a", 2],
        ),
        ([], []),
        (None, []),
        ("text", []),
    ],
)
def test_expected_ids(body: Any, ids: list[Any]) -> None:
    assert expected_ids(body) == ids


@pytest.mark.parametrize(
    ("message", "ids"),
    [
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, [1]),
        ({"jsonrpc": "2.0", "id": "a", "result": None}, ["a"]),
        ({"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "m"}}, [2]),
        ({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}}, [None]),
        # A server→client request shares the id space but answers nothing.
        ({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}}, []),
        ({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}, []),
        ({"jsonrpc": "2.0", "id": 1}, []),
        (
            [
                {"jsonrpc": "2.0", "method": "notifications/message"},
                {"jsonrpc": "2.0", "id": 1, "result": {}},
                {"jsonrpc": "2.0", "id": 9, "method": "roots/list"},
                {"jsonrpc": "2.0", "id": "b", "error": {"code": 1, "message": "m"}},
                "junk",
            ],
            [1, "b"],
        ),
        (None, []),
        ([], []),
    ],
)
def test_response_ids(message: Any, ids: list[Any]) -> None:
    assert response_ids(message) == ids


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}, True),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, False),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, False),
        ({"jsonrpc": "2.0", "id": 1, "result": {"method": "initialize"}}, False),
        ([{"jsonrpc": "2.0", "id": 0, "method": "initialize"}], False),
        ("initialize", False),
        (None, False),
    ],
)
def test_is_initialize(body: Any, expected: bool) -> None:
    assert is_initialize(body) is expected


# ── sse ───────────────────────────────────────────────────────────────────

JSON_LINE = '{"jsonrpc":"2.0","id":1,"result":{"text":"héllo 世界 😀"}}'
SAMPLE = (
    "\ufeff"  # one leading BOM is ignored
    "event: endpoint\r"
    ": a comment\r\n"
    "retry: 1000\n"
    "data: first\n"
    "\n"
    "id: 7\r\n"
    "data: line one\r\n"
    "data:line two\r"
    "data:  indented\n"
    "data\n"
    "\r\n"
    "event: no-data-so-no-event\n"
    "\n"
    f"data: {JSON_LINE}\r"
    "\r"
    "id: bad\x00id\n"
    "unknown: field\n"
    ":comment without a space\n"
    "data:\n"
    "\n"
    "id\n"
    "event: last\r\n"
    "data: done\r\n"
    "\r\n"
    "data: never finished"
)
SAMPLE_EVENTS = [
    Event("first", "endpoint", None),
    Event("line one\nline two\n indented\n", "message", "7"),
    Event(JSON_LINE, "message", "7"),
    Event("", "message", "7"),
    Event("done", "last", ""),
]
SAMPLE_BYTES = SAMPLE.encode("utf-8")


def feed_text(chunks: list[str]) -> list[Event]:
    parser = SseParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def feed_bytes(chunks: list[bytes]) -> list[Event]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    return feed_text([decoder.decode(chunk) for chunk in chunks])


def split_at(data: Any, cuts: list[int]) -> list[Any]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_sample_stream_in_one_piece() -> None:
    assert feed_text([SAMPLE]) == SAMPLE_EVENTS


def test_sample_stream_split_at_every_byte_position() -> None:
    for cut in range(len(SAMPLE_BYTES) + 1):
        assert feed_bytes(split_at(SAMPLE_BYTES, [cut])) == SAMPLE_EVENTS, cut


def test_sample_stream_one_byte_and_one_character_at_a_time() -> None:
    assert feed_bytes([SAMPLE_BYTES[i : i + 1] for i in range(len(SAMPLE_BYTES))]) == SAMPLE_EVENTS
    assert feed_text(list(SAMPLE)) == SAMPLE_EVENTS


def test_line_ending_stream_split_at_every_pair_of_positions() -> None:
    stream = "data: a\r\ndata: b\r\r\ndata: c\n\r\nid: 1\rdata: d\r\r\n\n"
    expected = [Event("a\nb"), Event("c"), Event("d", id="1")]
    assert feed_text([stream]) == expected
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert feed_text(split_at(stream, [i, j])) == expected, (i, j)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(SAMPLE_BYTES)), max_size=12), st.booleans())
def test_sample_stream_in_any_chunking(cuts: list[int], add_empty_chunks: bool) -> None:
    chunks = split_at(SAMPLE_BYTES, cuts)
    if add_empty_chunks:
        chunks = [piece for chunk in chunks for piece in (b"", chunk)]
    assert feed_bytes(chunks) == SAMPLE_EVENTS


sse_lines = st.lists(
    st.sampled_from(
        ["data", "data: x", "data:y", "data: é😀", "event: e", "event:", "id: 3", "id", ": c", ""]
    ),
    max_size=15,
)


@settings(max_examples=200, deadline=None)
@given(
    sse_lines, st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=15, max_size=15), st.data()
)
def test_any_stream_parses_the_same_in_any_chunking(
    lines: list[str], endings: list[str], data: st.DataObject
) -> None:
    stream = "".join(line + ending for line, ending in zip(lines, endings, strict=False))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert feed_text(split_at(stream, cuts)) == feed_text([stream])


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
def test_each_line_ending_alone(eol: str) -> None:
    stream = eol.join(["event: e", "data: a", "data: b", "", "data: c", "", ""])
    assert feed_text([stream]) == [Event("a\nb", "e"), Event("c")]


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
def test_an_event_is_returned_by_the_feed_that_completes_it(eol: str) -> None:
    parser = SseParser()
    assert parser.feed("data: x" + eol) == []
    # Nothing more may ever come (the server closes the stream): the blank line
    # that ends the event must be enough, whatever the line ending.
    assert parser.feed(eol) == [Event("x")]


def test_cr_then_lf_in_the_next_chunk_is_one_line_ending() -> None:
    parser = SseParser()
    assert parser.feed("data: a\r") == []
    assert parser.feed("\ndata: b\r") == []
    assert parser.feed("\n") == []
    assert parser.feed("\r\n") == [Event("a\nb")]


def test_comments_are_ignored() -> None:
    stream = ": keep-alive\n:\n: data: not data\ndata: real\n: between\n\n"
    assert feed_text([stream]) == [Event("real")]


def test_a_comment_only_stream_has_no_events() -> None:
    assert feed_text([": ping\n\n: ping\r\n\r\n"]) == []


def test_multi_line_data_joined_with_newline() -> None:
    assert feed_text(["data: {\n", 'data: "a": 1\n', "data: }\n\n"]) == [Event('{\n"a": 1\n}')]


def test_only_one_space_after_the_colon_is_removed() -> None:
    assert feed_text(["data:   three\ndata:none\n\n"]) == [Event("  three\nnone")]


def test_event_name_applies_to_one_event_only() -> None:
    stream = "event: message\ndata: 1\n\nevent: custom\ndata: 2\n\ndata: 3\n\nevent:\ndata: 4\n\n"
    assert [(e.event, e.data) for e in feed_text([stream])] == [
        ("message", "1"),
        ("custom", "2"),
        ("message", "3"),
        ("message", "4"),
    ]


def test_id_persists_until_changed_and_nul_ids_are_ignored() -> None:
    stream = "data: a\n\nid: 1\ndata: b\n\ndata: c\n\nid: x\x00\ndata: d\n\nid:\ndata: e\n\n"
    assert [(e.data, e.id) for e in feed_text([stream])] == [
        ("a", None),
        ("b", "1"),
        ("c", "1"),
        ("d", "1"),
        ("e", ""),
    ]


def test_an_unterminated_event_is_not_returned() -> None:
    assert feed_text(["data: a\n", "data: b"]) == []
    assert feed_text(["data: a\n\n", "data: b\n"]) == [Event("a")]


def test_only_a_leading_bom_is_removed() -> None:
    assert feed_text(["", "\ufeffdata: a\n\n"]) == [Event("a")]
    # A BOM anywhere else is part of the line (here making an unknown field).
    assert feed_text(["data: a\n\n\ufeffdata: b\n\n"]) == [Event("a")]
    assert feed_text(["\ufeff\ufeffdata: a\n\n"]) == []


def test_a_long_line_in_small_chunks() -> None:
    payload = "x" * (1 << 20)
    stream = f"data: {payload}\n\n"
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert feed_text(chunks) == [Event(payload)]


def test_an_mcp_streamable_http_answer() -> None:
    # As the MCP SDK (sse-starlette) writes it: CRLF line endings.
    stream = (
        "event: message\r\n"
        'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}\r\n'
        "\r\n"
        "event: message\r\n"
        'data: {"jsonrpc":"2.0","id":4,"result":{"tools":[]}}\r\n'
        "\r\n"
    )
    messages = [loads(e.data) for e in feed_text(split_at(stream, [17, 90, 91, 150]))]
    assert [response_ids(m) for m in messages] == [[], [4]]


# ── urls.redact ───────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ws://gw.example:8080/uplink?token=s3cr3t", "ws://gw.example:8080/uplink?token=***"),
        (
            "wss://gw.example/uplink?project=p&token=abc.DEF-123&v=2",
            "wss://gw.example/uplink?project=p&token=***&v=2",
        ),
        ("wss://gw/x?token=abc#frag", "wss://gw/x?token=***#frag"),
        ("wss://gw/x?TOKEN=abc&Token=def", "wss://gw/x?TOKEN=***&Token=***"),
        ("wss://gw/x?token=base64+/==&tokenize=yes", "wss://gw/x?token=***&tokenize=yes"),
        (
            "wss://gw/x?access_token=a&api_key=b&key=c",
            "wss://gw/x?access_token=***&api_key=***&key=***",
        ),
        ("wss://gw/x?project=p&mode=token", "wss://gw/x?project=p&mode=token"),
        ("ws://127.0.0.1:9/", "ws://127.0.0.1:9/"),
    ],
)
def test_redact_urls(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "connect to wss://gw/x?token=hunter2 failed: [Errno 111] refused",
            "connect to wss://gw/x?token=*** failed: [Errno 111] refused",
        ),
        ("token=hunter2", "token=***"),
        ("config: token=hunter2 project=p", "config: token=*** project=p"),
        ("url='wss://gw/x?token=hunter2'", "url='wss://gw/x?token=***'"),
        (
            '{"url": "wss://gw/x?token=hunter2", "ok": true}',
            '{"url": "wss://gw/x?token=***", "ok": true}',
        ),
        ("first\ntoken=hunter2\nlast", "first\ntoken=***\nlast"),
    ],
)
def test_redact_free_text(text: str, expected: str) -> None:
    assert redact(text) == expected


TOKEN_CHARS = string.ascii_letters + string.digits + "-._~%+/=:"


@settings(max_examples=200, deadline=None)
@given(
    st.text(TOKEN_CHARS, min_size=1, max_size=40),
    st.sampled_from(["ws", "wss"]),
    st.booleans(),
    st.sampled_from(["", "#f", "&project=p"]),
)
def test_redact_hides_any_url_safe_token(token: str, scheme: str, first: bool, tail: str) -> None:
    query = f"token={token}&v=1" if first else f"v=1&token={token}"
    url = f"{scheme}://gw.example:8443/uplink?{query}{tail}"
    redacted = redact(url)
    expected_query = "token=***&v=1" if first else "v=1&token=***"
    assert redacted == f"{scheme}://gw.example:8443/uplink?{expected_query}{tail}"
    assert redact(f"error talking to {url} (boom)") == f"error talking to {redacted} (boom)"
    assert redact(redacted) == redacted
