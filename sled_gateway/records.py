"""What a permission request is as it passes through the gateway: pending, then
decided or withdrawn, and the two ways asking about one can fail.

Plain values, shared by the approvals service, the events that carry them,
the read model that shows them and the transports that show them to people;
this module imports nothing else of the gateway's, so any of those may use it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from protocol import JSON, canonical_json

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


#: An input bigger than this (canonical JSON bytes) is kept as a summary in the
#: audit rows of requests the gateway refused or withdrew: nobody decided on it,
#: so its bulk is worth less than the disk it would fill.
AUDIT_INPUT_LIMIT = 4 * 1024
#: An input bigger than this is shown as its summary in ``/api/state``.
SHOWN_INPUT_LIMIT = 16 * 1024
#: How much of the canonical text a summary keeps.
SUMMARY_HEAD_BYTES = 2 * 1024


def canonical_bytes(value: JSON) -> bytes:
    """``value`` as canonical JSON (sorted keys, no spaces, UTF-8): what a size counts."""
    return canonical_json(value).encode("utf-8", "surrogatepass")


def input_size(value: JSON) -> int:
    """The size of a tool input: its canonical JSON's bytes."""
    return len(canonical_bytes(value))


def summarize(raw: bytes) -> dict[str, JSON]:
    """The stand-in for a big input's canonical bytes ``raw`` (docs/gateway-store.md)."""
    return {
        "truncated": True,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        # A cut through a character drops that character, never the summary.
        "head": raw[:SUMMARY_HEAD_BYTES].decode("utf-8", "ignore"),
    }


def bounded_input(value: JSON, limit: int = AUDIT_INPUT_LIMIT) -> JSON:
    """``value`` itself when its canonical JSON fits in ``limit`` bytes, else its summary."""
    raw = canonical_bytes(value)
    return value if len(raw) <= limit else summarize(raw)


def iso(t: float | None) -> str | None:
    """Wall-clock seconds → ISO 8601 UTC with milliseconds (None stays None), exactly as
    ``datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`` writes it.

    A console's poll writes hundreds of these: the date and time of each whole second
    are formatted once, and the microseconds are rounded as ``fromtimestamp`` rounds
    them (half to even), then cut to milliseconds as ``isoformat`` cuts them."""
    if t is None:
        return None
    fraction, whole = math.modf(t)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole += 1
        micro -= 1_000_000
    elif micro < 0:
        whole -= 1
        micro += 1_000_000
    return f"{_iso_second(int(whole))}.{micro // 1000:03d}+00:00"


@functools.lru_cache(maxsize=1024)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").removesuffix("+00:00")


@dataclass(frozen=True, slots=True)
class PendingPermission:
    """A ``perm_request`` waiting for its answer.

    Its input is measured once, when it is made: ``input_bytes`` (canonical
    JSON) and, for a big one, ``summary``, which the audit rows of a withdrawn
    request and ``/api/state`` show instead, so neither serialises it again.
    """

    project: str
    req_id: str
    tool_name: str
    tool_input: JSON
    received_at: float  # wall clock
    session: int
    #: :func:`protocol.input_sha256` of ``tool_input``: a decision must carry
    #: it, and ``/api/state`` lists every pending item on each poll, so it is
    #: computed once, here, from the same canonical bytes the size counts.
    input_sha256: str = field(default="", compare=False)
    input_bytes: int = field(default=-1, compare=False)
    summary: JSON = field(default=None, repr=False, compare=False)
    #: The rules the sled's agent suggested for "always allow", as it sent them
    #: (checked against this very use in :attr:`suggested_rules`).
    agent_suggestions: tuple[str, ...] = field(default=(), compare=False)
    #: The allow rule that matched but may not answer (the call leaves the sandbox).
    would_match: JSON = field(default=None, compare=False)
    #: Approvals from different people it needs (a quorum of the --access file).
    needs: int = field(default=1, compare=False)
    #: Who approved it so far, toward that quorum.
    votes: tuple[str, ...] = field(default=(), compare=False)
    #: The gateway replica holding its sled's session; None: this process.
    replica: str | None = field(default=None, compare=False)
    # The card's rules once computed: a shell parse that only a card, a listing or an
    # "always allow" needs, so a request is registered (and can be decided) without it.
    _suggested: tuple[tuple[str, str], ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        measured = self.input_sha256 and self.input_bytes >= 0
        if measured and (self.input_bytes <= AUDIT_INPUT_LIMIT or self.summary is not None):
            return
        raw = canonical_bytes(self.tool_input)
        object.__setattr__(self, "input_sha256", hashlib.sha256(raw).hexdigest())
        object.__setattr__(self, "input_bytes", len(raw))
        if len(raw) > AUDIT_INPUT_LIMIT:
            object.__setattr__(self, "summary", summarize(raw))

    @property
    def suggested_rules(self) -> tuple[tuple[str, str], ...]:
        """The rules "always allow" may make instead of the exact one, as ``(rule, kind)``
        (``exact``, ``prefix``, ``claude``): computed on first use, then kept."""
        if self._suggested is None:
            from sled_gateway.policy import suggested_rules

            found = suggested_rules(self.tool_name, self.tool_input, self.agent_suggestions)
            object.__setattr__(self, "_suggested", found)
            return found
        return self._suggested

    @property
    def audit_input(self) -> JSON:
        """The input as the audit row of a request nobody decided keeps it."""
        return self.tool_input if self.input_bytes <= AUDIT_INPUT_LIMIT else self.summary

    def to_json(self) -> dict[str, JSON]:
        cut = self.input_bytes > SHOWN_INPUT_LIMIT
        return {
            "project": self.project,
            "req_id": self.req_id,
            "tool_name": self.tool_name,
            "tool_input": self.summary if cut else self.tool_input,
            "input_sha256": self.input_sha256,
            "input_truncated": cut,
            "input_bytes": self.input_bytes,
            "received_at": iso(self.received_at),
            "suggested_rules": [{"rule": r, "kind": k} for r, k in self.suggested_rules],
            "would_match": self.would_match,
            "needs": self.needs,
            "votes": list(self.votes),
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
