"""Sans-I/O protocol of the sled uplink: frames, payloads, decisions, JSON-RPC, SSE.

Nothing here does I/O or imports pykka, websockets, httpx or asyncio; every
function is text or values in, values out (in the manner of h11).
"""

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from protocol.rules import (
        Action,
        Part,
        PermissionRule,
        RuleSet,
        RuleSyntaxError,
        Verdict,
        exact_rule,
        parse_rule,
        prefix_rule,
    )
    from protocol.shell import ParsedCommand, SimpleCommand, parse_command

# The rule grammar loads tree-sitter and pathspec (~30 ms): only on first use,
# so the hook command, which imports this package, still starts fast.
_LAZY = {
    **dict.fromkeys(
        (
            "Action",
            "Part",
            "PermissionRule",
            "RuleSet",
            "RuleSyntaxError",
            "Verdict",
            "exact_rule",
            "parse_rule",
            "prefix_rule",
        ),
        "protocol.rules",
    ),
    **dict.fromkeys(("ParsedCommand", "SimpleCommand", "parse_command"), "protocol.shell"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CANCEL_REASONS",
    "DECISION_WORDS",
    "DENY_MESSAGES",
    "HEARTBEAT",
    "JSON",
    "PERM_RESPONSE_PAYLOADS",
    "Action",
    "ConfigError",
    "Decision",
    "Envelope",
    "Identity",
    "Kind",
    "LocalProtocolError",
    "Mapped",
    "McpRequest",
    "Outcome",
    "ParsedCommand",
    "Part",
    "PermCancel",
    "PermRequest",
    "PermissionRule",
    "ProtocolError",
    "Reason",
    "RemoteProtocolError",
    "RuleSet",
    "RuleSyntaxError",
    "SimpleCommand",
    "UplinkError",
    "Verdict",
    "canonical_json",
    "decide",
    "decision_word",
    "dumps",
    "exact_rule",
    "identity",
    "input_sha256",
    "loads",
    "mcp_response",
    "parse",
    "parse_command",
    "parse_rule",
    "perm_cancel",
    "perm_response",
    "prefix_rule",
    "printable",
    "redact",
    "serialize",
    "show_invisible",
]
