"""Rendering URLs for humans without leaking the token (PROTOCOL.md §1)."""

from __future__ import annotations

import re

_SECRET = re.compile(r"(?i)((?:^|[?&;\s\"'])(?:token|access_token|api_key|key)=)[^&#\s\"']*")


def redact(text: str) -> str:
    """Replace every ``token=...`` value in ``text`` with ``***``."""
    return _SECRET.sub(r"\1***", text)
