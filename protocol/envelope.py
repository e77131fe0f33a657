"""The frame envelope: ``{"type": ..., "req_id": ..., "payload": ...}``.

Sans-I/O: text in, :class:`Envelope` out, and back. Serialization matches the
Rust original (serde_json): keys in the order type, req_id, payload, compact
separators, non-ASCII written as UTF-8, and no NaN/Infinity.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from protocol.exceptions import LocalProtocolError, RemoteProtocolError

JSON = Any  # JSON value: None, bool, int, float, str, list, dict


class Kind:
    """The frame kinds of the protocol. Unknown kinds are legal envelopes."""

    IDENTITY: Final = "identity"
    HEARTBEAT: Final = "heartbeat"
    PERM_REQUEST: Final = "perm_request"
    PERM_RESPONSE: Final = "perm_response"
    MCP_REQUEST: Final = "mcp_request"
    MCP_RESPONSE: Final = "mcp_response"
    PERM_CANCEL: Final = "perm_cancel"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One frame. ``payload`` is any JSON value (``None`` when absent)."""

    type: str
    req_id: str
    payload: JSON = None


def _reject_constant(name: str) -> float:
    # serde_json refuses NaN/Infinity; so do we, to stay wire-compatible.
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    # Python reads 1e400 as inf; serde_json refuses it ("number out of range"),
    # and an inf could never be serialized again.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:50]}")
    return value


# A \uD800-\uDFFF escape: may decode to a lone surrogate, which serde_json
# refuses and which cannot be sent in a (UTF-8) text frame.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: JSON) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)
_body_decoder = json.JSONDecoder(parse_constant=_reject_constant)  # loads(): unchanged
# check_circular=False: a cycle still fails, as RecursionError, which serialize
# turns into LocalProtocolError; skipping the bookkeeping is measurably faster.
_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


def parse(data: str | bytes) -> Envelope:
    """Parse one WebSocket message into an :class:`Envelope`.

    Raises :class:`RemoteProtocolError` (and nothing else) for binary
    messages, non-JSON text, non-object JSON, and a ``type`` or ``req_id``
    that is missing or not a string. Extra top-level keys are ignored, as
    serde does.
    """
    if not isinstance(data, str):
        raise RemoteProtocolError("binary", f"binary message of {len(data)} bytes")
    try:
        value = _decoder.decode(data)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError("not_json", str(exc)[:200]) from None
    if (not data.isascii() or _SURROGATE_ESCAPE.search(data)) and _has_lone_surrogate(value):
        raise RemoteProtocolError("not_json", "lone surrogate in a string")
    if not isinstance(value, dict):
        raise RemoteProtocolError("not_object", f"JSON {type(value).__name__}, not an object")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError("bad_type", "'type' missing or not a string")
    req_id = value.get("req_id")
    if not isinstance(req_id, str):
        raise RemoteProtocolError("bad_req_id", "'req_id' missing or not a string")
    return Envelope(kind, req_id, value.get("payload"))


def serialize(envelope: Envelope) -> str:
    """Render an envelope as frame text; :class:`LocalProtocolError` if it is not legal."""
    if not isinstance(envelope.type, str) or not isinstance(envelope.req_id, str):
        raise LocalProtocolError("type and req_id must be strings")
    try:
        text = _encoder.encode(
            {"type": envelope.type, "req_id": envelope.req_id, "payload": envelope.payload}
        )
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate cannot go in a text frame
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"payload is not JSON: {exc}") from None
    return text


def dumps(value: JSON) -> str:
    """Compact JSON text of ``value`` in the same style as frames."""
    return _encoder.encode(value)


def loads(text: str | bytes) -> JSON:
    """Strict JSON parse (no NaN/Infinity); raises ``ValueError``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return _body_decoder.decode(text)
