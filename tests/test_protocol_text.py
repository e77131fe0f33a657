"""protocol.printable: untrusted text made safe for a terminal or a log line (strings in, out)."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from protocol import printable


def test_controls_and_escapes_are_shown_not_kept() -> None:
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("line\r\nforged") == "line\\r\\nforged"
    assert printable("tab\there") == "tab\\there"
    assert printable("\x07\x7f\x9b\x00") == "\\x07\\x7f\\x9b\\x00"
    assert printable("rm\u202eevil\u2066") == "rm\\u202eevil\\u2066"
    assert printable("zero\u200bwidth\u2028sep") == "zero\\u200bwidth\\u2028sep"


def test_ordinary_text_is_untouched() -> None:
    for text in ("Bash", "ls -la /tmp", "é ü 中文 🚀", "C:\\Users\\me", '{"a": 1}'):
        assert printable(text) == text


def test_limit_and_non_strings() -> None:
    assert printable("x" * 10, limit=4) == "xxxx…"
    assert printable(42) == "42"
    assert printable({"k": "\n"}) == "{'k': '\\n'}"  # repr() inside str() escaped it already


@given(st.text())
def test_never_a_control_character_and_idempotent(text: str) -> None:
    shown = printable(text)
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in shown)
    assert printable(shown) == shown
    if text.isprintable():
        assert shown == text or any(ord(c) in range(0x200B, 0x2070) or c == "\ufeff" for c in text)
