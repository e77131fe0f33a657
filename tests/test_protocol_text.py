"""protocol.printable: untrusted text made safe for a terminal or a log line (strings in, out)."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from protocol import printable, show_invisible


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


# -- show_invisible: the same for a multi-line block a person reads (Matrix, a card) ----

INVISIBLE = (
    [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u061c", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
)


def test_show_invisible_escapes_bidi_zero_width_and_controls() -> None:
    for ch in INVISIBLE:
        shown = show_invisible(f"a{ch}b")
        assert shown == f"a\\u{ord(ch):04x}b"
    assert show_invisible("ls\x1b[2K\rrm") == "ls\\x1b[2K\\rrm"
    assert show_invisible("\x00\x7f\x9b\u2028") == "\\x00\\x7f\\x9b\\u2028"


def test_show_invisible_keeps_the_layout_of_a_block() -> None:
    block = '{\n\t"command": "make"\n}'
    assert show_invisible(block) == block
    for text in ("é ü 中文 🚀", "C:\\Users\\me", "echo \\u202e"):
        assert show_invisible(text) == text


@given(st.text())
def test_show_invisible_leaves_nothing_invisible_and_is_idempotent(text: str) -> None:
    shown = show_invisible(text)
    assert not any(ch in INVISIBLE for ch in shown)
    assert all(ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs") for ch in shown)
    assert show_invisible(shown) == shown
    assert printable(shown) == printable(text)  # the same escapes, but for the layout
