"""The gateway's durable store: the audit log, the always-allow / deny rules, person tokens
and votes.

:class:`Store` is the interface the gateway uses; no database type appears in
it. :func:`make_store` builds the implementation for a location:

- ``models`` — what is stored (:class:`Rule`, :class:`AuditEntry`, :class:`PersonToken`,
  :class:`Vote`) and the errors;
- ``sql`` — the implementation on SQLAlchemy Core, any SQLAlchemy URL;
- ``sqlite`` — what only the embedded default, SQLite, needs (WAL, the lock file);
- ``migrations`` — the schema's history as Alembic revisions, applied at open.

Every store keeps these promises: :meth:`Store.record` returns only once the
row is committed (a sled is never answered before its decision is recorded);
one writer applies the changes, a burst of them in one transaction; and the
active rules live in :attr:`Store.policy`, changed only after a commit.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

from sled_gateway.store.models import (
    ALLOW,
    ASK,
    DENY,
    MAX_PAGE,
    AlreadyRecorded,
    AuditEntry,
    ClientLoginsFull,
    LoginsFull,
    PersonToken,
    Recorded,
    Rule,
    RuleRevoked,
    SessionEnded,
    StoreError,
    TokenRevoked,
    UnknownRule,
    UnknownToken,
    Vote,
)

if TYPE_CHECKING:  # the policy module imports this package's models
    from collections.abc import Callable

    from sled_gateway.policy import Policy
    from sled_gateway.store.shared import StoredSession

__all__ = [
    "ALLOW",
    "ASK",
    "DENY",
    "MAX_PAGE",
    "MEMORY",
    "AlreadyRecorded",
    "AuditEntry",
    "ClientLoginsFull",
    "LoginsFull",
    "PersonToken",
    "Recorded",
    "Rule",
    "RuleRevoked",
    "SessionEnded",
    "Store",
    "StoreError",
    "TokenRevoked",
    "UnknownRule",
    "UnknownToken",
    "Vote",
    "default_db_path",
    "make_store",
]

#: The location of a store that keeps nothing (SQLite in memory).
MEMORY = ":memory:"


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/sled-gateway/gateway.db`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sled-gateway" / "gateway.db"


class Store(Protocol):
    """The audit log and the rules, whatever database holds them."""

    @property
    def policy(self) -> Policy:
        """The active rules, for matching requests without I/O (owned by the caller's loop)."""
        ...

    def open(self) -> Self:
        """Open (creating and migrating as needed) and load the rules; :class:`StoreError`."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued work, then close. Idempotent; later calls fail with StoreError."""
        ...

    async def check(self, timeout: float) -> None:
        """Whether a write could commit now: a transaction through the writer, within
        ``timeout``; :class:`StoreError` naming the problem (``/readyz`` asks)."""
        ...

    async def record(
        self, entry: AuditEntry, new_rule: Rule | None = None, *, once: bool = False
    ) -> Recorded:
        """Commit an audit row, and with it ``new_rule`` (an always_allow's), in one
        transaction; returns once committed. ``new_rule``'s id is ignored; an
        identical active rule is reused. :class:`StoreError` if it was not committed.

        ``once``: a compare-and-set on the request (``project``, ``req_id``,
        ``requested_at``), in the same transaction: :class:`AlreadyRecorded` when it
        has a row already or another store is committing one at this moment, so of
        two deciders (two gateways on one database) exactly one records."""
        ...

    def record_later(self, entry: AuditEntry) -> concurrent.futures.Future[int]:
        """Queue an audit row without waiting; the future is its id once committed."""
        ...

    async def audit(
        self,
        *,
        project: str | None = None,
        since: float | None = None,
        before: int | None = None,
        decision: str | None = None,
        limit: int = 100,
        person: str | None = None,
    ) -> list[AuditEntry]:
        """Rows newest first, at most ``min(limit, MAX_PAGE)``; ``before`` is a row id
        (the page after the one ending there), ``since`` a Unix time; ``person`` the
        rows whose ``who`` it is."""
        ...

    async def rules(self, *, include_revoked: bool = False) -> list[Rule]:
        """Rules newest first."""
        ...

    async def add_rule(self, rule: Rule) -> Rule:
        """Commit ``rule`` (its id is ignored); an identical active rule is returned instead."""
        ...

    async def add_rules(self, rules: Sequence[Rule]) -> list[Rule]:
        """Commit every rule in one transaction, or none (identical active rules reused)."""
        ...

    async def revoke_rule(self, rule_id: int, by: str) -> Rule:
        """Revoke a rule (it is kept, with who and when); :class:`UnknownRule`,
        :class:`RuleRevoked`."""
        ...

    async def add_token(self, token: PersonToken, entry: AuditEntry) -> PersonToken:
        """Commit a person token (its id is ignored) and its audit row (``req_id``
        becomes ``token:<id>``) in one transaction."""
        ...

    async def token_by_hash(self, secret_sha256: str) -> PersonToken | None:
        """The token whose secret has this SHA-256 (hex), revoked and expired ones too."""
        ...

    async def tokens(self, *, include_revoked: bool = False) -> list[PersonToken]:
        """Person tokens newest first."""
        ...

    async def revoke_token(self, token_id: int, by: str, entry: AuditEntry) -> PersonToken:
        """Revoke a token and write its audit row together; :class:`UnknownToken`,
        :class:`TokenRevoked`."""
        ...

    async def add_vote(self, vote: Vote) -> None:
        """Commit one person's vote on a request."""
        ...

    async def votes(self, project: str, req_id: str) -> list[Vote]:
        """The votes on requests under this id, oldest first."""
        ...

    # What replicas share besides decisions (sled_gateway/store/shared.py has the detail).

    async def reload_rules(self, *, force: bool = False) -> bool:
        """Read the active rules again if another replica changed them; whether it did."""
        ...

    async def add_console_session(
        self,
        id_sha256: str,
        person_id: str | None,
        person: str | None,
        expires_at: float,
        *,
        per_person: int,
        limit: int,
    ) -> None:
        """Commit a console session (hashed id) within the per-person and global bounds."""
        ...

    async def console_session(self, id_sha256: str) -> StoredSession | None:
        """The console session with this hashed id, expired ones too."""
        ...

    async def end_console_session(self, id_sha256: str) -> bool:
        """Delete a console session; whether it was there."""
        ...

    async def console_sessions_of(self, person_id: str) -> list[str]:
        """The hashed ids of a person's console sessions, oldest first."""
        ...

    async def login_state(self, key: str) -> str | None:
        """A sign-in's state in flight, None when unknown or expired."""
        ...

    async def set_login_state(
        self,
        key: str,
        value: str,
        ttl: float,
        *,
        limit: int,
        client: str | None = None,
        per_client: int | None = None,
    ) -> None:
        """Keep a sign-in's state for ``ttl`` seconds, started by ``client``;
        :class:`LoginsFull` when ``limit`` unexpired ones are kept already (none is
        forgotten to make room), :class:`ClientLoginsFull` when ``per_client`` of them
        are that client's."""
        ...

    async def delete_login_state(self, key: str) -> None:
        """Forget a sign-in's state (it is used once)."""
        ...

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """A value made once per database (``make()`` by whichever store asks first)."""
        ...


def make_store(
    location: str | os.PathLike[str] = MEMORY,
    *,
    retention_days: float | None = None,
    max_bytes: int | None = None,
) -> Store:
    """The store at ``location`` (a SQLite file's path, :data:`MEMORY`, or a SQLAlchemy
    URL), not opened yet; audit rows older than ``retention_days`` are purged, and the
    oldest ones while a SQLite database holds more than ``max_bytes``."""
    from sled_gateway.store.sql import SqlStore  # SQLAlchemy loads with the first store

    return SqlStore(location, retention_days=retention_days, max_bytes=max_bytes)
