"""Typed payloads and constructors for each frame kind of the protocol (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.envelope import JSON, Envelope, Kind
from protocol.exceptions import LocalProtocolError, RemoteProtocolError


def identity(project: str, **extra: JSON) -> Envelope:
    """The first frame of every session. The token rides in the URL, never here."""
    if not isinstance(project, str) or not project:
        raise LocalProtocolError("identity needs a non-empty project name")
    return Envelope(Kind.IDENTITY, "identity", {"project": project, **extra})


HEARTBEAT = Envelope(Kind.HEARTBEAT, "", None)


@dataclass(frozen=True, slots=True)
class PermRequest:
    """``perm_request`` payload: may the agent run ``tool_name`` with ``tool_input``?"""

    tool_name: str
    tool_input: JSON

    def envelope(self, request_id: str) -> Envelope:
        if not isinstance(self.tool_name, str) or not self.tool_name:
            raise LocalProtocolError("tool_name must be a non-empty string")
        return Envelope(
            Kind.PERM_REQUEST,
            request_id,
            {"tool_name": self.tool_name, "tool_input": self.tool_input},
        )


@dataclass(frozen=True, slots=True)
class McpRequest:
    """``mcp_request`` payload: the raw JSON-RPC text to replay locally."""

    body: str

    @classmethod
    def from_payload(cls, payload: JSON) -> McpRequest:
        """Extract the body; :class:`RemoteProtocolError` if absent or not a string."""
        body = payload.get("body") if isinstance(payload, dict) else None
        if not isinstance(body, str):
            raise RemoteProtocolError("bad_body", "mcp_request payload has no string 'body'")
        return cls(body)


def mcp_response(req_id: str, payload: JSON) -> Envelope:
    """The answer to an ``mcp_request``: a JSON-RPC response, an array, or null."""
    return Envelope(Kind.MCP_RESPONSE, req_id, payload)
