"""Sans-I/O protocol of the sled uplink: frames, payloads, decisions, JSON-RPC, SSE.

Nothing here does I/O or imports pykka, websockets, httpx or asyncio; every
function is text or values in, values out (in the manner of h11).
"""

from protocol.canonical import canonical_json, input_sha256
from protocol.decisions import (
    DECISION_WORDS,
    DENY_MESSAGES,
    Decision,
    Mapped,
    Outcome,
    Reason,
    decide,
    decision_word,
)
from protocol.envelope import JSON, Envelope, Kind, dumps, loads, parse, serialize
from protocol.exceptions import (
    ConfigError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UplinkError,
)
from protocol.frames import (
    CANCEL_REASONS,
    HEARTBEAT,
    PERM_RESPONSE_PAYLOADS,
    Identity,
    McpRequest,
    PermCancel,
    PermRequest,
    identity,
    mcp_response,
    perm_cancel,
    perm_response,
)
from protocol.text import printable, show_invisible
from protocol.urls import redact

__all__ = [
    "CANCEL_REASONS",
    "DECISION_WORDS",
    "DENY_MESSAGES",
    "HEARTBEAT",
    "JSON",
    "PERM_RESPONSE_PAYLOADS",
    "ConfigError",
    "Decision",
    "Envelope",
    "Identity",
    "Kind",
    "LocalProtocolError",
    "Mapped",
    "McpRequest",
    "Outcome",
    "PermCancel",
    "PermRequest",
    "ProtocolError",
    "Reason",
    "RemoteProtocolError",
    "UplinkError",
    "canonical_json",
    "decide",
    "decision_word",
    "dumps",
    "identity",
    "input_sha256",
    "loads",
    "mcp_response",
    "parse",
    "perm_cancel",
    "perm_response",
    "printable",
    "redact",
    "serialize",
    "show_invisible",
]
