"""JSON-RPC 2.0 helpers for the MCP replay: request ids and error objects.

The uplink does not judge JSON-RPC validity (the local server does); it only
needs the ids of what it forwards, to match streamed answers and to address
its own error objects.
"""

from __future__ import annotations

from typing import Final

from protocol.envelope import JSON

INVALID_REQUEST: Final = -32600
INTERNAL_ERROR: Final = -32603

_ID_TYPES = (str, int, float)


def request_id(message: JSON) -> JSON:
    """The ``id`` of one JSON-RPC message, or None if it has no usable one."""
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, _ID_TYPES) and not isinstance(value, bool):
            return value
    return None


def expected_ids(body: JSON) -> list[JSON]:
    """Ids the local server must answer: one per request (notifications have none)."""
    messages = body if isinstance(body, list) else [body]
    return [i for i in (request_id(m) for m in messages) if i is not None]


def is_initialize(body: JSON) -> bool:
    return isinstance(body, dict) and body.get("method") == "initialize"


def error_object(id_: JSON, code: int, message: str) -> dict[str, JSON]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def error_for(body: JSON, code: int, message: str) -> JSON:
    """The error answer for a failed replay of ``body``, carrying the request's own id.

    An object request gets one error object with its id (or null); a batch
    gets an array with one error object per request id in it (or a single
    null-id error if it held none).
    """
    if isinstance(body, list):
        ids = expected_ids(body)
        if ids:
            return [error_object(i, code, message) for i in ids]
        return error_object(None, code, message)
    return error_object(request_id(body), code, message)


def response_ids(message: JSON) -> list[JSON]:
    """Ids answered by a server message (a response or a batch of them).

    A server→client *request* or notification (it has ``method``) answers
    nothing, so it yields no id.
    """
    messages = message if isinstance(message, list) else [message]
    ids = []
    for m in messages:
        if isinstance(m, dict) and "method" not in m and ("result" in m or "error" in m):
            ids.append(m.get("id"))
    return ids
