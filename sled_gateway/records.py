"""What a permission request is as it passes through the gateway: pending, then
decided or withdrawn, and the two ways asking about one can fail.

Plain values, shared by the approvals service, the events that carry them,
the read model that shows them and the transports that show them to people;
this module imports nothing else of the gateway's, so any of those may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from protocol import JSON

#: Pseudo-decision recorded when a sled disconnects with requests pending.
WITHDRAWN = "withdrawn"


class UnknownRequest(LookupError):
    """No permission request with this project and id was ever seen (HTTP 404)."""


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

    def to_json(self) -> dict[str, JSON]:
        return {
            "project": self.project,
            "req_id": self.req_id,
            "tool_name": self.tool_name,
            "tool_input": self.tool_input,
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
