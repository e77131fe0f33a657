"""Untrusted text made safe for a terminal or a text log line.

A tool name or a request id comes from a sled process or the gateway; written
raw, an ANSI escape would recolour or clear the operator's terminal and a CR/LF
would forge a log line. Pure: strings in, strings out.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with every control or format character (C0, DEL, C1, ESC,
    bidi overrides, line separators, ...) written as a visible escape.

    A backslash stays as it is, so text already escaped (a ``repr``) reads
    the same; what matters is that nothing in the result is a control.
    """
    if text.isprintable():  # the common case, decided in C: nothing to escape
        return text
    out = []
    for char in text:
        if char in _NAMED:
            out.append(_NAMED[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)
