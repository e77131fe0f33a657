"""What a permission request is as it passes through the gateway: pending, then
decided or withdrawn, and the two ways asking about one can fail.

Plain values, shared by the approvals service, the events that carry them,
the read model that shows them and the transports that show them to people;
this module imports nothing else of the gateway's, so any of those may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from protocol import JSON, input_sha256

#: Pseudo-decision recorded when a sled disconnects with requests pending.
WITHDRAWN = "withdrawn"


class UnknownRequest(LookupError):
    """No permission request with this project and id was ever seen (HTTP 404)."""


class InputMismatch(Exception):
    """A decision names an input other than the pending request's (HTTP 409): the person
    saw another request under the same id. Nothing is decided."""

    def __init__(self, item: PendingPermission, sent: str) -> None:
        super().__init__(
            f"{item.project}/{item.req_id} now has another input (input_sha256 "
            f"{item.input_sha256[:12]}…, not {sent[:12]}…); nothing decided, reload it"
        )
        self.item = item
        self.sent = sent


class AlreadyDecided(Exception):
    """The request already has its one decision (HTTP 409)."""

    def __init__(self, record: DecisionRecord) -> None:
        super().__init__(
            f"{record.project}/{record.req_id} already {record.decision} by {record.by}"
        )
        self.record = record


def iso(t: float | None) -> str | None:
    """Wall-clock seconds → ISO 8601 UTC with milliseconds (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class PendingPermission:
    """A ``perm_request`` waiting for its answer."""

    project: str
    req_id: str
    tool_name: str
    tool_input: JSON
    received_at: float  # wall clock
    session: int
    #: :func:`protocol.input_sha256` of ``tool_input``, computed once here: a
    #: decision must carry it, and ``/api/state`` lists every pending item on
    #: each poll, so it is never recomputed per read.
    input_sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.input_sha256:
            object.__setattr__(self, "input_sha256", input_sha256(self.tool_input))

    def to_json(self) -> dict[str, JSON]:
        return {
            "project": self.project,
            "req_id": self.req_id,
            "tool_name": self.tool_name,
            "tool_input": self.tool_input,
            "input_sha256": self.input_sha256,
            "received_at": iso(self.received_at),
        }


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One answered (or withdrawn) permission request, for the console's log."""

    project: str
    req_id: str
    tool_name: str
    decision: str  # a Decision value, or WITHDRAWN
    by: str  # auto | terminal | console | library | invalid | sled_disconnected
    decided_at: float  # wall clock
    waited_s: float

    def to_json(self) -> dict[str, JSON]:
        return {
            "project": self.project,
            "req_id": self.req_id,
            "tool_name": self.tool_name,
            "decision": self.decision,
            "by": self.by,
            "decided_at": iso(self.decided_at),
            "waited_s": round(self.waited_s, 3),
        }
