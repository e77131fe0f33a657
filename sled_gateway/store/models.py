"""What the store keeps: audit rows and rules, as plain values with their JSON shape.

No storage engine appears here: the HTTP API, the console and the approvals
path use these types whatever database is behind the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

from protocol import JSON
from sled_gateway.records import iso

ALLOW, ASK, DENY = "allow", "ask", "deny"
#: How a rule key names one exact input (what "always allow" makes): this prefix and the
#: canonical JSON of the input without its cosmetic fields (``sled_gateway.policy``) ...
INPUT_KEY = "input:"
#: ... or, for an input too long to keep as text, this prefix and the SHA-256 hex of it.
INPUT_HASH_KEY = "input-sha256:"
#: A key with neither prefix is the older kind: a Bash command or a file tool's path,
#: whatever the input's other fields say (rules made before keys named whole inputs).
#: Most rows one ``GET /api/audit`` page returns.
MAX_PAGE = 500


class StoreError(Exception):
    """The database cannot be used (unreadable, locked by another gateway, too new, closed)."""


class LoginsFull(StoreError):
    """The logins in flight are at their limit, none expired: a new one is refused
    rather than forgetting one that someone else started (sled_gateway.auth.oidc)."""


class ClientLoginsFull(StoreError):
    """One client has its share of the logins in flight, counted over every replica on
    the database: a new one is refused until ``retry_after`` seconds from now, when its
    oldest expires (sled_gateway.auth.login_limits)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionEnded(StoreError):
    """The session a replica was recording as a sled's holder ended before the row
    committed: the row is not written (sled_gateway.replicas)."""


class UnknownRule(LookupError):
    pass


class RuleRevoked(Exception):
    def __init__(self, rule: Rule) -> None:
        super().__init__(f"rule {rule.id} was already revoked by {rule.revoked_by}")
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    project: str | None  # None: every sled
    tool_name: str
    key: str | None  # None: any use of the tool (for an exact rule; always None with ``rule``)
    action: str  # ALLOW | ASK | DENY (an exact rule: ALLOW | DENY)
    created_at: float
    created_by: str
    origin: str | None = None
    reason: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    #: The rule in Claude Code's grammar (``Bash(npm test:*)``), matched by
    #: ``protocol.rules``; None for an exact rule, which ``tool_name`` and ``key`` make.
    rule: str | None = None

    @property
    def who(self) -> str:
        """The ``by`` of decisions this rule makes."""
        return f"rule:{self.id}"

    @property
    def describes(self) -> str:
        """What the rule covers, in words a person checks before trusting it."""
        tool, key = self.tool_name, self.key
        if self.rule is not None:
            return f"{self.rule} (Claude Code's rule grammar, the command parsed as shell)"
        if key is None:
            return f"any use of {tool}"
        if key.startswith(INPUT_KEY):
            return f"{tool} with exactly the input {key[len(INPUT_KEY) :]}"
        if key.startswith(INPUT_HASH_KEY):
            digest = key[len(INPUT_HASH_KEY) :]
            return f"{tool} with exactly one input (SHA-256 {digest} of its canonical JSON)"
        what = "the command" if tool == "Bash" else "the path"
        return f"{tool} with {what} {key} (whatever its other input fields)"

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "project": self.project,
            "tool_name": self.tool_name,
            "key": self.key,
            "describes": self.describes,
            "action": self.action,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "origin": self.origin,
            "reason": self.reason,
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
            "rule": self.rule,
            "kind": "exact" if self.rule is None else "grammar",
            "active": self.revoked_at is None,
        }


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log (``id`` is set once written)."""

    project: str
    session: int | None
    req_id: str
    tool_name: str
    tool_input: JSON
    decision: str  # a Decision value, or "withdrawn"
    by: str
    reason: str | None
    requested_at: float | None
    decided_at: float
    id: int | None = None
    #: Who acted: a person's id, ``operator``, ``rule:<id>``, ``terminal``, a Matrix
    #: user id...; None on rows written before people were recorded.
    who: str | None = None
    #: Through what (:class:`~sled_gateway.principal.Channel`'s value).
    channel: str | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "project": self.project,
            "session": self.session,
            "req_id": self.req_id,
            "tool_name": self.tool_name,
            "tool_input": self.tool_input,
            "decision": self.decision,
            "by": self.by,
            "reason": self.reason,
            "requested_at": iso(self.requested_at),
            "decided_at": iso(self.decided_at),
            "who": self.who,
            "channel": self.channel,
        }


class UnknownToken(LookupError):
    pass


class AlreadyRecorded(Exception):
    """A request already has its row (another decider's, or its withdrawal), or another
    decision for it is being committed right now: ``entry`` is the row, None in that case."""

    def __init__(self, entry: AuditEntry | None) -> None:
        super().__init__(
            "another decision for this request is being recorded"
            if entry is None
            else f"request {entry.req_id!r} was already recorded: {entry.decision} by {entry.by}"
        )
        self.entry = entry


class TokenRevoked(Exception):
    def __init__(self, token: PersonToken) -> None:
        super().__init__(f"token {token.id} was already revoked by {token.revoked_by}")
        self.token = token


@dataclass(frozen=True, slots=True)
class PersonToken:
    """A person API token: only the SHA-256 of its secret is kept."""

    id: int
    person: str
    secret_sha256: str
    created_at: float
    created_by: str
    expires_at: float
    revoked_at: float | None = None
    revoked_by: str | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and now < self.expires_at

    def to_json(self, now: float | None = None) -> dict[str, JSON]:
        """Everything but the hash (it would let a holder of the list test guesses offline)."""
        return {
            "id": self.id,
            "person": self.person,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
            "active": self.active(now if now is not None else time.time()),
        }


@dataclass(frozen=True, slots=True)
class Vote:
    """One person's vote on one pending request (toward a quorum)."""

    project: str
    req_id: str
    person: str
    decision: str  # a Decision value
    channel: str
    at: float
    reason: str | None = None
    #: When the request voted on arrived: a later request under the same id is another.
    requested_at: float | None = None
    #: The approvals the request needed in all.
    needs: int = 1

    def to_json(self) -> dict[str, JSON]:
        return {
            "person": self.person,
            "decision": self.decision,
            "channel": self.channel,
            "at": iso(self.at),
            "reason": self.reason,
        }


class Recorded(NamedTuple):
    """What :meth:`Store.record` committed: the audit row's id, and the rule if one was asked."""

    id: int
    rule: Rule | None
