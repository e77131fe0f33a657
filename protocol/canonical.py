"""The one canonical JSON form of a value, and the hash that binds a decision to an input.

A person approves what they were shown; the decision carries
:func:`input_sha256` of that ``tool_input`` and the gateway compares it with
the request it is about to decide, so an id reused for another input cannot
borrow the approval. Every part that hashes an input (the gateway, the
console's checks, the Matrix bot, the size bounds) uses these two functions,
so one input has one hash everywhere.
"""

from __future__ import annotations

import hashlib
import json

from protocol.envelope import JSON


def canonical_json(value: JSON) -> str:
    """``value`` as JSON with sorted keys, no whitespace and characters unescaped.

    ``ensure_ascii=False`` keeps the text the same length as what a person
    reads; the hash is over its UTF-8 bytes (see :func:`input_sha256`).
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def input_sha256(tool_input: JSON) -> str:
    """SHA-256 hex (64 lowercase digits) of :func:`canonical_json` of ``tool_input`` in UTF-8.

    ``surrogatepass``: a lone surrogate (``"\\ud800"`` in the sled's JSON)
    is valid JSON text but not UTF-8; it still hashes, to its own value.
    """
    data = canonical_json(tool_input).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()
