"""Typed payloads and constructors for each frame kind of the protocol (docs/protocol.md).

Both ends build and read frames here: the uplink sends ``identity``,
``perm_request`` and ``perm_cancel`` and reads ``perm_response``; the gateway
reads the first three and sends the last. A payload that breaks the contract raises
:class:`RemoteProtocolError`, whose ``reason`` is a short stable label for the
reader's log and counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from protocol.decisions import Decision
from protocol.envelope import JSON, Envelope, Kind
from protocol.exceptions import LocalProtocolError, RemoteProtocolError

#: ``RemoteProtocolError.reason`` of a payload that is not a JSON object.
NOT_AN_OBJECT: Final = "payload_not_object"
#: ... of an ``identity`` without a non-empty string ``project``.
NO_PROJECT: Final = "no_project"
#: ... of a ``perm_request`` without a non-empty string ``tool_name``.
NO_TOOL_NAME: Final = "no_tool_name"
#: ... of a ``perm_cancel`` whose ``reason`` is not one of :data:`CANCEL_REASONS`.
BAD_CANCEL_REASON: Final = "bad_cancel_reason"

#: Why a sled decides a request it sent itself: its permission timeout ran
#: out, or the caller that asked went away.
CANCEL_REASONS: Final = ("timeout", "caller_gone")


@dataclass(frozen=True, slots=True)
class Identity:
    """``identity`` payload: the sled's project name, and whatever else it says of itself."""

    project: str
    info: dict[str, JSON] = field(default_factory=dict)  # every other key (version, ...)

    @classmethod
    def from_payload(cls, payload: JSON) -> Identity:
        """Read an ``identity`` payload; :class:`RemoteProtocolError` without a project."""
        if not isinstance(payload, dict):
            raise RemoteProtocolError(NOT_AN_OBJECT, "identity payload is not a JSON object")
        project = payload.get("project")
        if not isinstance(project, str) or not project:
            raise RemoteProtocolError(NO_PROJECT, "identity needs a project name")
        return cls(project, {k: v for k, v in payload.items() if k != "project"})

    def envelope(self) -> Envelope:
        """The frame; the token rides in the URL, never here."""
        if not isinstance(self.project, str) or not self.project:
            raise LocalProtocolError("identity needs a non-empty project name")
        if "project" in self.info:
            raise LocalProtocolError("the project name is given once, as project")
        return Envelope(Kind.IDENTITY, "identity", {"project": self.project, **self.info})


def identity(project: str, **extra: JSON) -> Envelope:
    """The first frame of every session. The token rides in the URL, never here."""
    return Identity(project, extra).envelope()


HEARTBEAT = Envelope(Kind.HEARTBEAT, "", None)


#: Most rule suggestions one ``perm_request`` carries, and the longest one.
MAX_SUGGESTIONS = 8
MAX_SUGGESTION_CHARS = 1000


def read_suggestions(value: JSON) -> tuple[str, ...]:
    """A ``perm_request``'s ``suggestions``: the non-empty strings of a list, each
    at most :data:`MAX_SUGGESTION_CHARS` long, the first :data:`MAX_SUGGESTIONS` of
    them. Anything else reads as none: a hint never costs the request itself."""
    if not isinstance(value, list):
        return ()
    found: list[str] = []
    for item in value:
        if isinstance(item, str) and 0 < len(item) <= MAX_SUGGESTION_CHARS and item not in found:
            found.append(item)
            if len(found) == MAX_SUGGESTIONS:
                break
    return tuple(found)


@dataclass(frozen=True, slots=True)
class PermRequest:
    """``perm_request`` payload: may the agent run ``tool_name`` with ``tool_input``?"""

    tool_name: str
    tool_input: JSON
    #: Rules the agent itself suggests for "always allow" (Claude Code's
    #: ``permission_suggestions``, as rule texts): an optional extra key, sent
    #: only when there are some, so the frame stays the original shape.
    suggestions: tuple[str, ...] = ()

    def envelope(self, request_id: str) -> Envelope:
        if not isinstance(self.tool_name, str) or not self.tool_name:
            raise LocalProtocolError("tool_name must be a non-empty string")
        payload: dict[str, JSON] = {"tool_name": self.tool_name, "tool_input": self.tool_input}
        if self.suggestions:
            payload["suggestions"] = list(self.suggestions)
        return Envelope(Kind.PERM_REQUEST, request_id, payload)

    @classmethod
    def from_payload(cls, payload: JSON) -> PermRequest:
        """Read a ``perm_request`` payload; :class:`RemoteProtocolError` if it names no tool.

        A missing ``tool_input`` reads as ``None``: the gateway shows and
        records what the sled sent, and the sled's own rules judge the input.
        """
        if not isinstance(payload, dict):
            raise RemoteProtocolError(NOT_AN_OBJECT, "perm_request payload is not a JSON object")
        tool_name = payload.get("tool_name")
        if not isinstance(tool_name, str) or not tool_name:
            raise RemoteProtocolError(NO_TOOL_NAME, "perm_request without a tool_name")
        return cls(
            tool_name, payload.get("tool_input"), read_suggestions(payload.get("suggestions"))
        )

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> PermRequest:
        """The request a ``perm_request`` frame carries (its id is ``envelope.req_id``)."""
        if envelope.type != Kind.PERM_REQUEST:
            raise RemoteProtocolError("bad_type", f"{envelope.type[:80]!r} is not a perm_request")
        return cls.from_payload(envelope.payload)


@dataclass(frozen=True, slots=True)
class PermCancel:
    """``perm_cancel`` payload: the sled decided (denied) a request it had sent, by itself.

    The gateway withdraws the request, so no person answers a question the
    sled no longer asks (and whose id a later request may not reuse).
    """

    reason: str  # one of CANCEL_REASONS

    def envelope(self, request_id: str) -> Envelope:
        if self.reason not in CANCEL_REASONS:
            raise LocalProtocolError(f"perm_cancel reason must be one of {CANCEL_REASONS}")
        return Envelope(Kind.PERM_CANCEL, request_id, {"reason": self.reason})

    @classmethod
    def from_payload(cls, payload: JSON) -> PermCancel:
        """Read a ``perm_cancel`` payload; :class:`RemoteProtocolError` unless its
        ``reason`` is one of :data:`CANCEL_REASONS`."""
        if not isinstance(payload, dict):
            raise RemoteProtocolError(NOT_AN_OBJECT, "perm_cancel payload is not a JSON object")
        reason = payload.get("reason")
        if not isinstance(reason, str) or reason not in CANCEL_REASONS:
            raise RemoteProtocolError(
                BAD_CANCEL_REASON, f"perm_cancel reason must be one of {CANCEL_REASONS}"
            )
        return cls(reason)


def perm_cancel(req_id: str, reason: str) -> Envelope:
    """The sled's word that it decided the request ``req_id`` itself (``reason``)."""
    return PermCancel(reason).envelope(req_id)


#: The ``perm_response`` payload of each decision; :func:`protocol.decide` maps each back.
PERM_RESPONSE_PAYLOADS: dict[Decision, dict[str, bool]] = {
    Decision.APPROVE: {"approved": True, "always_allow": False},
    Decision.ALWAYS_ALLOW: {"approved": True, "always_allow": True},
    Decision.DENY: {"approved": False, "always_allow": False},
}


def perm_response(req_id: str, decision: Decision) -> Envelope:
    """The gateway's answer to the ``perm_request`` ``req_id``."""
    # A copy: a caller that edits the payload must not change the next answer.
    return Envelope(Kind.PERM_RESPONSE, req_id, dict(PERM_RESPONSE_PAYLOADS[decision]))


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
