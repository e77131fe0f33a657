"""Permission decisions and the ``perm_response`` → decision mapping.

The rule: ``always_allow: true`` wins unless ``approved`` is explicitly
``false`` (contradictory → deny, with a warning); else ``approved: true``
approves; anything else denies. Only real JSON booleans count: ``1`` or
``"true"`` are not ``true``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.envelope import JSON


class Decision(enum.StrEnum):
    APPROVE = "approve"
    ALWAYS_ALLOW = "always_allow"
    DENY = "deny"

    @property
    def allows(self) -> bool:
        return self is not Decision.DENY


class Reason(enum.StrEnum):
    """Why a request got its decision. Every decision has exactly one."""

    GATEWAY = "gateway"  # the gateway (a human or policy) answered
    CONTRADICTORY = "contradictory"  # always_allow true but approved false
    SESSION_ENDED = "session_ended"  # sent on a session that ended unanswered
    TIMEOUT = "timeout"  # not answered within the permission timeout
    SHUTDOWN = "shutdown"  # the uplink stopped
    OVER_LIMIT = "over_limit"  # too many undecided requests
    OVER_BYTES = "over_bytes"  # the undecided requests already hold too much data
    DUPLICATE_ID = "duplicate_id"  # an undecided request already has this id
    REUSED_ID = "reused_id"  # a request with this id was seen within the last hour
    CALLER_GONE = "caller_gone"  # the caller went away before the answer came
    DISABLED = "disabled"  # no gateway configured
    CRASH = "crash"  # the registry itself failed; fail closed


# What a caller (or Claude Code's permission prompt) is told on a deny.
DENY_MESSAGES: dict[Reason, str] = {
    Reason.GATEWAY: "Denied by the gateway.",
    Reason.CONTRADICTORY: "Denied: the gateway sent a contradictory answer "
    "(always_allow without approval).",
    Reason.SESSION_ENDED: "Denied: the connection to the gateway was lost before an answer came.",
    Reason.TIMEOUT: "Denied: no answer from the gateway before the permission timeout.",
    Reason.SHUTDOWN: "Denied: the uplink is shutting down.",
    Reason.OVER_LIMIT: "Denied: too many permission requests are waiting.",
    Reason.OVER_BYTES: "Denied: the permission requests waiting already hold too much data.",
    Reason.DUPLICATE_ID: "Denied: a request with this id is already waiting.",
    Reason.REUSED_ID: "Denied: this request id was reused (it was seen within the last hour); "
    "a new request needs a new id.",
    Reason.CALLER_GONE: "Denied: the caller went away before the answer came.",
    Reason.DISABLED: "Denied: no upstream gateway is configured.",
    Reason.CRASH: "Denied: the uplink's permission registry failed.",
}


#: The words a person may answer a permission request with, on every channel.
DECISION_WORDS: dict[str, Decision] = {
    "approve": Decision.APPROVE,
    "approved": Decision.APPROVE,
    "yes": Decision.APPROVE,
    "deny": Decision.DENY,
    "denied": Decision.DENY,
    "no": Decision.DENY,
    "always": Decision.ALWAYS_ALLOW,
    "always_allow": Decision.ALWAYS_ALLOW,
    "always allow": Decision.ALWAYS_ALLOW,
}
#: One-key answers, for a prompt that asks one question at a time (the
#: terminal). A chat reply of one letter is too easily an accident to count.
DECISION_LETTERS: dict[str, Decision] = {
    "y": Decision.APPROVE,
    "n": Decision.DENY,
    "a": Decision.ALWAYS_ALLOW,
}


def decision_word(text: str, *, letters: bool = False) -> Decision | None:
    """The decision a person's answer names, or None when it names none.

    Any case, runs of whitespace and a trailing ``.`` or ``!`` are fine; the
    whole answer must be the word ("approve, but not that" is no answer).
    With ``letters``, ``y``, ``n`` and ``a`` count too.
    """
    word = " ".join(text.lower().split()).rstrip(".!")
    decision = DECISION_WORDS.get(word)
    if decision is None and letters:
        decision = DECISION_LETTERS.get(word)
    return decision


@dataclass(frozen=True, slots=True)
class Outcome:
    """The one decision a permission request gets, and why."""

    request_id: str
    decision: Decision
    reason: Reason

    @property
    def message(self) -> str:
        """Human-readable words for a deny (always non-empty); empty for an allow."""
        return DENY_MESSAGES[self.reason] if self.decision is Decision.DENY else ""


@dataclass(frozen=True, slots=True)
class Mapped:
    decision: Decision
    reason: Reason
    warning: str | None = None


def decide(payload: JSON) -> Mapped:
    """Map a ``perm_response`` payload to a decision, failing closed on anything unclear."""
    if not isinstance(payload, dict):
        return Mapped(Decision.DENY, Reason.GATEWAY)
    approved = payload.get("approved")
    if payload.get("always_allow") is True:
        if approved is False:
            return Mapped(
                Decision.DENY,
                Reason.CONTRADICTORY,
                "contradictory perm_response: always_allow=true with approved=false; denying",
            )
        return Mapped(Decision.ALWAYS_ALLOW, Reason.GATEWAY)
    if approved is True:
        return Mapped(Decision.APPROVE, Reason.GATEWAY)
    return Mapped(Decision.DENY, Reason.GATEWAY)
