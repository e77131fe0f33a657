"""What gateway replicas on one database share besides the audit: console sessions,
OpenID Connect logins in flight, settings made once, and noticing rule changes.

These are the store's operations behind :class:`SharedState`, a part of
:class:`~sled_gateway.store.sql.SqlStore` kept apart because nothing here is
about decisions. Each runs on the store's writer thread like every other
operation; the tables are declared here and copied into the store's schema.

Why each lives in the database:

- **Console sessions**: behind a load balancer a browser's requests land on
  any replica, and a replica may restart at any time; a session that lived in
  one process's memory was unknown to the others and ended with a restart.
  Only the SHA-256 of a session id is stored: a copy of the table opens no
  console.
- **Logins in flight**: a sign-in started on one replica may come back to
  another (``/auth/callback``).
- **Settings**: values made once per gateway, such as the key that signs the
  sign-in flow's state cookie; the first replica to start makes it, the others
  read it.
- **Rule changes**: another replica commits rules to the same tables; a cheap
  signature (the highest rule id and the number of revoked rules, both only
  ever growing, since rules are never deleted) says whether the active rules
  must be read again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    REAL,
    Column,
    Connection,
    Double,
    Index,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeEngine

from sled_gateway.policy import Policy
from sled_gateway.store.models import ClientLoginsFull, LoginsFull, Rule

T = TypeVar("T")

_TIME: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")
SHARED_METADATA = MetaData()
CONSOLE_SESSIONS = Table(
    "console_sessions",
    SHARED_METADATA,
    Column("id_sha256", String(64), primary_key=True),
    Column("person_id", Text),  # NULL: opened with the operator token
    Column("person", Text),  # the Person as JSON; NULL for the operator
    Column("created_at", _TIME, nullable=False),  # wall clock: replicas share no other
    Column("expires_at", _TIME, nullable=False),
    Index("console_sessions_person", "person_id", "created_at"),
    Index("console_sessions_created_at", "created_at"),
    Index("console_sessions_expires_at", "expires_at"),
)
OIDC_LOGINS = Table(
    "oidc_logins",
    SHARED_METADATA,
    Column("key", String(200), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", _TIME, nullable=False),
    Column("expires_at", _TIME, nullable=False),
    # Who started it (login_limits.client_key), for the share each client may hold.
    Column("client", String(64)),
    Index("oidc_logins_created_at", "created_at"),
    Index("oidc_logins_client", "client", "expires_at"),
)
SETTINGS = Table(
    "settings",
    SHARED_METADATA,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)
TABLES = (CONSOLE_SESSIONS, OIDC_LOGINS, SETTINGS)

#: What says whether the active rules changed: (highest rule id, revoked rules).
RulesSignature = tuple[int, int]


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A console session's row: the person as JSON (None: the operator) and its expiry."""

    person: str | None
    expires_at: float


def rules_signature(conn: Connection) -> RulesSignature:
    from sled_gateway.store.sql import RULES  # the rules table is the store's own

    top, revoked = conn.execute(select(func.max(RULES.c.id), func.count(RULES.c.revoked_at))).one()
    return (int(top or 0), int(revoked or 0))


def _trim_oldest(conn: Connection, table: Table, keep: int, *where: Any) -> None:
    """Delete the oldest rows of ``table`` (matching ``where``) beyond the newest ``keep``."""
    edge = conn.execute(
        select(table.c.created_at)
        .where(*where)
        .order_by(table.c.created_at.desc())
        .offset(max(0, keep - 1))
        .limit(1)
    ).scalar()
    if edge is not None:
        conn.execute(delete(table).where(*where, table.c.created_at < edge))


class SharedState:
    """The store's operations on what replicas share (a part of ``SqlStore``)."""

    policy: Policy
    _run: Callable[[Callable[[Connection], Any]], Awaitable[Any]]
    #: The signature of the rules :attr:`policy` was last read with.
    _rules_signature: RulesSignature | None = None
    #: Rule changes this store applied to :attr:`policy` itself (a reload that read the
    #: database before one of them must not replace the policy that has it).
    _policy_changes = 0

    # -- the active rules, changed by this store or by another replica ----------------

    def _policy_add(self, rule: Rule) -> None:
        self._policy_changes += 1
        self.policy.add(rule)

    def _policy_remove(self, rule: Rule) -> None:
        self._policy_changes += 1
        self.policy.remove(rule)

    async def reload_rules(self, *, force: bool = False) -> bool:
        """Read the active rules again when another store (a replica on this database)
        changed them, or always (``force``); whether :attr:`policy` was replaced.

        Cheap when nothing changed: one query of two aggregates. StoreError when the
        database cannot be read (the policy stays as it was).
        """
        from sled_gateway.store.sql import _RULE_COLUMNS, RULES, _rule

        for _attempt in range(3):
            known = None if force else self._rules_signature
            changes = self._policy_changes

            def read(
                conn: Connection, known: RulesSignature | None = known
            ) -> tuple[RulesSignature, list[Rule] | None]:
                signature = rules_signature(conn)
                if signature == known:
                    return signature, None
                rows = conn.execute(
                    select(*_RULE_COLUMNS).where(RULES.c.revoked_at.is_(None)).order_by(RULES.c.id)
                ).all()
                return signature, [_rule(r) for r in rows]

            signature, rules = await self._run(read)
            if rules is None:
                return False
            if changes == self._policy_changes:
                self.policy = Policy(rules)
                self._rules_signature = signature
                return True
            # This store changed a rule while the rows were read (their order against
            # that commit is unknown): read again rather than drop its change.
        self._rules_signature = None  # the next reload reads whatever happens
        return False

    # -- console sessions --------------------------------------------------------------

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
        """Commit a session; the person's oldest end beyond ``per_person``, everyone's
        oldest beyond ``limit``, and expired ones go, in the same transaction."""
        now = time.time()

        def write(conn: Connection) -> None:
            conn.execute(delete(CONSOLE_SESSIONS).where(CONSOLE_SESSIONS.c.expires_at < now))
            if person_id is not None:
                _trim_oldest(
                    conn,
                    CONSOLE_SESSIONS,
                    per_person - 1,
                    CONSOLE_SESSIONS.c.person_id == person_id,
                )
            _trim_oldest(conn, CONSOLE_SESSIONS, limit - 1)
            conn.execute(
                insert(CONSOLE_SESSIONS).values(
                    id_sha256=id_sha256,
                    person_id=person_id,
                    person=person,
                    created_at=now,
                    expires_at=expires_at,
                )
            )

        await self._run(write)

    async def console_session(self, id_sha256: str) -> StoredSession | None:
        """The session with this hashed id, expired ones too (the caller checks)."""
        query = select(CONSOLE_SESSIONS.c.person, CONSOLE_SESSIONS.c.expires_at).where(
            CONSOLE_SESSIONS.c.id_sha256 == id_sha256
        )
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else StoredSession(row[0], float(row[1]))

    async def end_console_session(self, id_sha256: str) -> bool:
        """Delete a session; whether it was there."""
        statement = delete(CONSOLE_SESSIONS).where(CONSOLE_SESSIONS.c.id_sha256 == id_sha256)
        return bool(await self._run(lambda conn: conn.execute(statement).rowcount))

    async def console_sessions_of(self, person_id: str) -> list[str]:
        """The hashed ids of a person's sessions, oldest first."""
        query = (
            select(CONSOLE_SESSIONS.c.id_sha256)
            .where(CONSOLE_SESSIONS.c.person_id == person_id)
            .order_by(CONSOLE_SESSIONS.c.created_at)
        )
        return list(await self._run(lambda conn: conn.execute(query).scalars().all()))

    # -- logins in flight ----------------------------------------------------------------

    async def login_state(self, key: str) -> str | None:
        """A login's state, None when unknown or expired."""
        query = select(OIDC_LOGINS.c.value).where(
            OIDC_LOGINS.c.key == key, OIDC_LOGINS.c.expires_at >= time.time()
        )
        found = await self._run(lambda conn: conn.execute(query).scalar())
        return None if found is None else str(found)

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
        """Keep a login's state for ``ttl`` seconds; :class:`LoginsFull` (nothing kept)
        when ``limit`` unexpired logins are kept already. Evicting the oldest instead
        would let anyone who can start logins fail the one a person is finishing.
        :class:`ClientLoginsFull` (nothing kept) when ``per_client`` of them were started
        by ``client``: counted here, on the database every replica writes, a client
        spreading its starts over replicas behind a balancer gets no bigger share.
        (Replicas writing at once may pass either limit by a few: they bound a flood.)"""
        now = time.time()

        def write(conn: Connection) -> float | bool:
            conn.execute(delete(OIDC_LOGINS).where(OIDC_LOGINS.c.key == key))
            conn.execute(delete(OIDC_LOGINS).where(OIDC_LOGINS.c.expires_at < now))
            if client is not None and per_client is not None:
                held, oldest = conn.execute(
                    select(func.count(), func.min(OIDC_LOGINS.c.expires_at)).where(
                        OIDC_LOGINS.c.client == client
                    )
                ).one()
                if held >= per_client:
                    return float(oldest) - now
            kept = conn.execute(select(func.count()).select_from(OIDC_LOGINS)).scalar_one()
            if kept >= limit:
                return False
            conn.execute(
                insert(OIDC_LOGINS).values(
                    key=key, value=value, created_at=now, expires_at=now + ttl, client=client
                )
            )
            return True

        outcome = await self._run(write)
        if outcome is False:
            raise LoginsFull(f"{limit} logins are in flight")
        if outcome is not True:
            raise ClientLoginsFull(
                f"{per_client} sign-ins in flight from this client", retry_after=outcome
            )

    async def delete_login_state(self, key: str) -> None:
        statement = delete(OIDC_LOGINS).where(OIDC_LOGINS.c.key == key)
        await self._run(lambda conn: conn.execute(statement))

    # -- settings ------------------------------------------------------------------------

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """The setting ``name``; made with ``make()`` and committed if there is none yet.
        Of replicas making it at once, one wins and every one gets its value."""

        def read_or_make(conn: Connection) -> str:
            query = select(SETTINGS.c.value).where(SETTINGS.c.name == name)
            found = conn.execute(query).scalar()
            if found is not None:
                return str(found)
            savepoint = conn.begin_nested()
            try:
                conn.execute(insert(SETTINGS).values(name=name, value=make()))
            except IntegrityError:  # another replica made it between the read and here
                savepoint.rollback()
            else:
                savepoint.commit()
            return str(conn.execute(query).scalar_one())

        return str(await self._run(read_or_make))


def copy_tables(metadata: MetaData) -> Sequence[Table]:
    """The shared tables, declared in ``metadata`` too (the store's whole schema)."""
    return [table.to_metadata(metadata) for table in TABLES]
