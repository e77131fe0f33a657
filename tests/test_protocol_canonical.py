"""protocol.canonical_json / input_sha256: one canonical form and hash of a tool input."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from protocol import canonical_json, input_sha256


def test_sorted_compact_and_unescaped() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": None, "c": "é"}]}) == (
        '{"a":[1,{"c":"é","d":null}],"b":1}'
    )
    assert canonical_json("\u202e") == '"\u202e"'


def test_the_hash_is_sha256_of_the_utf8_canonical_text() -> None:
    value = {"command": "ls", "description": "list"}
    expected = hashlib.sha256(b'{"command":"ls","description":"list"}').hexdigest()
    assert input_sha256(value) == expected
    assert input_sha256({"description": "list", "command": "ls"}) == expected
    assert input_sha256({"command": "ls "}) != expected


def test_a_lone_surrogate_still_hashes() -> None:
    value = json.loads('{"x": "\\ud800"}')
    digest = input_sha256(value)
    assert len(digest) == 64 and digest != input_sha256({"x": "\ufffd"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_key_order_never_changes_the_hash(value: object) -> None:
    again = json.loads(json.dumps(value))
    if isinstance(again, dict):
        again = dict(reversed(list(again.items())))
    assert input_sha256(again) == input_sha256(value)  # type: ignore[arg-type]
    assert all(c in "0123456789abcdef" for c in input_sha256(value))  # type: ignore[arg-type]
