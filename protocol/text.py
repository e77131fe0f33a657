"""Untrusted text made safe for a terminal or a one-line log record.

Tool names, request ids, project names and identity fields come from sleds,
and through them from whatever an agent was told to do. Printed raw, an
``ESC [`` sequence can recolour, move the cursor or rewrite the screen of the
operator's terminal, a CR or LF can forge a whole extra log line, and a
bidirectional override can make ``rm -rf /`` read as something else. So every
such character is shown as an escape (``\\x1b``, ``\\n``, ``\\u202e``) and
nothing is executed.

Backslashes are left alone, which makes :func:`printable` idempotent: text
escaped at a call site and again at a log sink is escaped once.

:func:`show_invisible` is the same for a block a person reads (a chat message,
a card): it keeps line feeds and tabs, which lay the block out and can hide
nothing there, and escapes the rest.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# Cc: C0 controls (ESC, CR, LF, BEL…), DEL and the C1 controls (0x9b is an
# 8-bit CSI on some terminals). Cf: format characters that reorder or hide text
# (bidi overrides and isolates, zero-width marks). Zl/Zp: the Unicode line and
# paragraph separators. Cs: lone surrogates, which cannot be encoded.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _show(s: str, keep: str) -> str:
    # isprintable() is decided in C and is False for every unsafe category, so
    # the common case (nothing to escape) costs one call.
    if not s.isprintable() and any(_unsafe(ch) for ch in s):
        s = "".join(_escape(ch) if _unsafe(ch) and ch not in keep else ch for ch in s)
    return s


def printable(text: object, limit: int | None = None) -> str:
    """``text`` (``str()`` of it if not a string) with control characters shown escaped.

    ``limit`` cuts the result to about that many characters, marked with ``…``.
    """
    s = _show(text if isinstance(text, str) else str(text), "")
    if limit is not None and len(s) > limit:
        s = s[:limit] + "…"
    return s


def show_invisible(text: str) -> str:
    """``text`` with every control, bidi and zero-width character shown as an escape
    (``\\u202e``, ``\\x1b``, ``\\r``), line feeds and tabs kept.

    For multi-line text shown to a person who decides on it: a bidi override
    or a zero-width space there can make one command read as another.
    """
    return _show(text, "\n\t")
