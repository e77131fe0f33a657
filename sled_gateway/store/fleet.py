"""What gateway replicas on one database share: who is alive, who holds which sled, and
every pending permission request with its life (the tables of schema 5).

- ``replicas``: each replica's lease, renewed by its sweep; one whose lease ran out
  is dead, and a survivor releases what it held (:meth:`FleetStore.release_replica`).
- ``sleds``: the replica and session holding each project's sled.
- ``pending``: one row per request (project, req_id), its ``state`` one of
  ``pending`` → ``decided`` → ``delivered``, or ``withdrawn``, or ``undelivered``
  (decided, but its sled's session ended before the answer reached it).

Every change of a request's state is a compare-and-set on its row (an ``UPDATE ...
WHERE state = <expected>`` whose row count says who won) in the same transaction
as the audit row that records it, so of two replicas deciding one request, or a
decider and a disconnect, exactly one commits; the other learns what won.

These tables are used when replicas share a server database; the embedded default
(one process) keeps its pending requests in memory only, as before.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    REAL,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    delete,
    select,
    tuple_,
    update,
)
from sqlalchemy.types import TypeEngine

from sled_gateway.store import postgresql
from sled_gateway.store.models import AuditEntry, Recorded, Rule, SessionEnded, StoreError

T = TypeVar("T")

#: The request states a row goes through.
PENDING = "pending"
DECIDED = "decided"
DELIVERED = "delivered"
WITHDRAWN = "withdrawn"
UNDELIVERED = "undelivered"
#: States a request never leaves: a new request may reuse its id.
FINAL = (DELIVERED, WITHDRAWN, UNDELIVERED)

# Declared apart from the audit's tables so this module needs nothing of ``sql``'s
# at import; ``SqlStore`` creates both sets in a new database.
METADATA = MetaData()
_TIME: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")
REPLICAS = Table(
    "replicas",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("started_at", _TIME, nullable=False),
    Column("lease_until", _TIME, nullable=False),
)
#: The ``replica`` of a sled no replica holds now; its ``last_seen`` is when it left.
GONE = ""
SLEDS = Table(
    "sleds",
    METADATA,
    Column("project", Text, primary_key=True),
    Column("replica", Text, nullable=False),
    Column("session", Integer, nullable=False),
    Column("connected_at", _TIME, nullable=False),
    Column("remote", Text),
    Column("info", Text),  # JSON: the identity's extra keys
    Column("last_seen", _TIME),
    Index("sleds_replica", "replica"),
)
PENDING_REQUESTS = Table(
    "pending",
    METADATA,
    Column("project", Text, nullable=False),
    Column("req_id", Text, nullable=False),
    Column("requested_at", _TIME, nullable=False),
    Column("replica", Text, nullable=False),
    Column("session", Integer, nullable=False),
    Column("tool_name", Text, nullable=False),
    Column("tool_input", Text, nullable=False),  # JSON text
    Column("needs", Integer, nullable=False),
    Column("offer", Text),  # JSON: the card's suggested_rules and would_match
    Column("state", Text, nullable=False),
    Column("decision", Text),
    Column("decided_by", Text),
    Column("decided_at", _TIME),
    PrimaryKeyConstraint("project", "req_id", name="pending_pk"),
    Index("pending_state", "state", "replica"),
)


@dataclass(frozen=True, slots=True)
class SledRow:
    project: str
    replica: str
    session: int
    connected_at: float
    remote: str | None
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PendingRow:
    """One request as the ``pending`` table holds it."""

    project: str
    req_id: str
    requested_at: float
    replica: str
    session: int
    tool_name: str
    tool_input: Any
    needs: int
    offer: dict[str, Any]
    state: str
    decision: str | None
    decided_by: str | None
    decided_at: float | None


_PENDING_COLUMNS = (
    PENDING_REQUESTS.c.project,
    PENDING_REQUESTS.c.req_id,
    PENDING_REQUESTS.c.requested_at,
    PENDING_REQUESTS.c.replica,
    PENDING_REQUESTS.c.session,
    PENDING_REQUESTS.c.tool_name,
    PENDING_REQUESTS.c.tool_input,
    PENDING_REQUESTS.c.needs,
    PENDING_REQUESTS.c.offer,
    PENDING_REQUESTS.c.state,
    PENDING_REQUESTS.c.decision,
    PENDING_REQUESTS.c.decided_by,
    PENDING_REQUESTS.c.decided_at,
)
_SLED_COLUMNS = (
    SLEDS.c.project,
    SLEDS.c.replica,
    SLEDS.c.session,
    SLEDS.c.connected_at,
    SLEDS.c.remote,
    SLEDS.c.info,
)


def _pending_row(row: Sequence[Any]) -> PendingRow:
    values = list(row)
    values[6] = json.loads(values[6])
    values[8] = json.loads(values[8]) if values[8] else {}
    return PendingRow(*values)


def _sled_row(row: Sequence[Any]) -> SledRow:
    values = list(row)
    # A replica keeps a record for every sled of the fleet: the few replica ids are
    # shared rather than held once per sled.
    values[1] = sys.intern(values[1])
    values[5] = json.loads(values[5]) if values[5] else {}
    return SledRow(*values)


class RowBusy(Exception):
    """Another transaction (another replica) is changing the request right now."""


class StateChanged(StoreError):
    """A compare-and-set found the request elsewhere than expected: ``row`` is what it
    is now (None: no such request, or another request under its id)."""

    def __init__(self, row: PendingRow | None) -> None:
        super().__init__(f"the request is {row.state if row is not None else 'unknown'}")
        self.row = row


def _audit(conn: Connection, entry: AuditEntry) -> int:
    from sled_gateway.store.sql import _AuditRow  # the one way an audit row is written

    return _AuditRow(entry)(conn)


def _request(project: str, req_id: str, requested_at: float) -> Any:
    return (
        (PENDING_REQUESTS.c.project == project)
        & (PENDING_REQUESTS.c.req_id == req_id)
        & (PENDING_REQUESTS.c.requested_at == requested_at)
    )


def _current(conn: Connection, project: str, req_id: str) -> PendingRow | None:
    row = conn.execute(
        select(*_PENDING_COLUMNS).where(
            PENDING_REQUESTS.c.project == project, PENDING_REQUESTS.c.req_id == req_id
        )
    ).first()
    return _pending_row(row) if row is not None else None


def _move(
    conn: Connection,
    project: str,
    req_id: str,
    requested_at: float,
    *,
    expected: str,
    new: str,
    **values: Any,
) -> None:
    """The compare-and-set: ``expected`` → ``new``, or :class:`StateChanged`.

    On PostgreSQL the request's advisory lock is tried first: a transaction that
    waited on another's row lock could wait in a cycle (two batches of decisions
    taking rows in different orders); instead the loser raises :class:`RowBusy`
    at once and its caller tries again once the other has committed."""
    if conn.dialect.name == "postgresql" and not postgresql.try_lock_request(conn, project, req_id):
        raise RowBusy(project, req_id)
    done = conn.execute(
        update(PENDING_REQUESTS)
        .where(_request(project, req_id, requested_at), PENDING_REQUESTS.c.state == expected)
        .values(state=new, **values)
    ).rowcount
    if done != 1:
        raise StateChanged(_current(conn, project, req_id))


class FleetStore:
    """The replica-sharing half of :class:`~sled_gateway.store.sql.SqlStore` (a mixin:
    every method runs on the store's writer thread through ``_run``)."""

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[[Connection], T]) -> T: ...

        policy: Any

    async def _run_cas(self, fn: Callable[[Connection], T], patience: float = 10.0) -> T:
        """``fn`` through the writer, again while its request is :class:`RowBusy`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        pause = 0.002
        while True:
            try:
                return await self._run(fn)
            except RowBusy:
                if loop.time() > deadline:
                    raise StoreError("the request stayed locked by another replica") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)

    # -- replicas -------------------------------------------------------------------------

    async def renew_lease(self, replica: str, started_at: float, lease_until: float) -> None:
        """Make or renew ``replica``'s lease (its row is made again if a survivor had
        released it: a replica that lives on is alive)."""

        def renew(conn: Connection) -> None:
            if not conn.execute(
                update(REPLICAS).where(REPLICAS.c.id == replica).values(lease_until=lease_until)
            ).rowcount:
                conn.execute(
                    REPLICAS.insert(),
                    {"id": replica, "started_at": started_at, "lease_until": lease_until},
                )

        await self._run(renew)

    async def expired_replicas(self, now: float) -> list[str]:
        query = select(REPLICAS.c.id).where(REPLICAS.c.lease_until < now)
        return list(await self._run(lambda conn: conn.execute(query).scalars().all()))

    async def release_replica(
        self,
        replica: str,
        now: float,
        withdrawn_by: str,
        who: str,
        channel: str,
        *,
        what_happened: str = "stopped answering (lease expired)",
    ) -> tuple[int, int]:
        """End what a dead (or cleanly stopped) replica held, in one transaction: its
        pending requests are
        withdrawn and its decided-but-undelivered ones marked undelivered (each audited),
        its sleds let go as expected back (they reconnect elsewhere, as
        :meth:`let_go_sled` with ``returning``) and its lease removed. Returns
        (withdrawn, undelivered)."""

        def release(conn: Connection) -> tuple[int, int]:
            rows = [
                _pending_row(r)
                for r in conn.execute(
                    select(*_PENDING_COLUMNS).where(
                        PENDING_REQUESTS.c.replica == replica,
                        PENDING_REQUESTS.c.state.in_((PENDING, DECIDED)),
                    )
                ).all()
            ]
            counts = [0, 0]
            for row in rows:
                pending = row.state == PENDING
                new = WITHDRAWN if pending else UNDELIVERED
                try:
                    _move(
                        conn,
                        row.project,
                        row.req_id,
                        row.requested_at,
                        expected=row.state,
                        new=new,
                    )
                except StateChanged:
                    continue
                counts[0 if pending else 1] += 1
                _audit(
                    conn,
                    AuditEntry(
                        row.project,
                        row.session,
                        row.req_id,
                        row.tool_name,
                        row.tool_input,
                        new,
                        withdrawn_by,
                        f"its gateway replica {what_happened}"
                        if pending
                        else f"decided {row.decision}, but its gateway replica "
                        f"{what_happened} before the sled got it",
                        row.requested_at,
                        now,
                        who=who,
                        channel=channel,
                    ),
                )
            conn.execute(
                update(SLEDS).where(SLEDS.c.replica == replica).values(replica=GONE, last_seen=now)
            )
            conn.execute(delete(REPLICAS).where(REPLICAS.c.id == replica))
            return counts[0], counts[1]

        return await self._run_cas(release)

    # -- sleds ----------------------------------------------------------------------------

    async def hold_sled(
        self,
        project: str,
        replica: str,
        session: int,
        remote: str,
        info: dict[str, Any],
        *,
        still_held: Callable[[], bool] = lambda: True,
    ) -> None:
        """``replica`` holds ``project``'s sled now (the newest session wins).

        ``still_held`` is asked last, in the writer's thread, just before the commit.
        If the session has ended by then and the row this hold replaced was another
        replica's, nothing is written and :class:`SessionEnded` is raised. A hold that
        waited (a slow database, a stalled link to it) would otherwise commit after the
        row of the sled's newer session on another replica, and name as holder a session
        that is gone: that replica would then let go of the live one, or the old
        session's let-go would erase its row. An ended session over no other replica's
        row is written as before, for its let-go (queued behind it) to mark it left."""
        now = time.time()

        def hold(conn: Connection) -> None:
            replaced = conn.execute(  # the one row of the project (its primary key), if any
                delete(SLEDS).where(SLEDS.c.project == project).returning(SLEDS.c.replica)
            ).scalar()
            conn.execute(
                SLEDS.insert(),
                {
                    "project": project,
                    "replica": replica,
                    "session": session,
                    "connected_at": now,
                    "remote": remote,
                    "info": json.dumps(info, ensure_ascii=False),
                    "last_seen": now,
                },
            )
            if replaced not in (None, replica, GONE) and not still_held():
                # Raising rolls the transaction back: the other replica's row stays.
                raise SessionEnded(
                    f"the session {session} of sled {project!r} ended before its row "
                    f"could replace replica {replaced}'s"
                )

        await self._run(hold)

    async def let_go_sled(
        self, project: str, replica: str, session: int, *, returning: bool = False
    ) -> None:
        """That session ended (a newer one elsewhere is not touched). A sled expected
        back (``returning``: it did not say goodbye) stays, held by nobody, with the time
        it left, so one on its way to another replica is told from one never seen
        (:meth:`sled_left_at`)."""
        which = (
            SLEDS.c.project == project,
            SLEDS.c.replica == replica,
            SLEDS.c.session == session,
        )
        statement = (
            update(SLEDS).where(*which).values(replica=GONE, last_seen=time.time())
            if returning
            else delete(SLEDS).where(*which)
        )
        await self._run(lambda conn: conn.execute(statement))

    async def sled_left_at(self, project: str) -> float | None:
        """When ``project``'s sled last left its replica, if no replica holds it now."""
        query = select(SLEDS.c.last_seen).where(SLEDS.c.project == project, SLEDS.c.replica == GONE)
        found = await self._run(lambda conn: conn.execute(query).scalar())
        return float(found) if found is not None else None

    async def fleet(self) -> tuple[list[SledRow], list[PendingRow]]:
        """Every sled held, and every request still pending, in one read."""

        def read(conn: Connection) -> tuple[list[SledRow], list[PendingRow]]:
            # Row by row, not ``.all()``: the whole fleet's driver rows never live at once
            # beside the records made of them (this read runs every sweep).
            sleds = [
                _sled_row(r)
                for r in conn.execute(select(*_SLED_COLUMNS).where(SLEDS.c.replica != GONE))
            ]
            pending = conn.execute(
                select(*_PENDING_COLUMNS)
                .where(PENDING_REQUESTS.c.state == PENDING)
                .order_by(PENDING_REQUESTS.c.requested_at)
            ).all()
            return sleds, [_pending_row(r) for r in pending]

        return await self._run(read)

    # -- requests -------------------------------------------------------------------------

    async def add_pending(
        self,
        project: str,
        req_id: str,
        requested_at: float,
        *,
        replica: str,
        session: int,
        tool_name: str,
        tool_input: Any,
        needs: int,
        offer: dict[str, Any],
    ) -> None:
        """A request is pending, held by ``replica``. A finished request under the same id
        gives way; one still pending or decided does not (:class:`StoreError`)."""

        def add(conn: Connection) -> None:
            conn.execute(
                delete(PENDING_REQUESTS).where(
                    PENDING_REQUESTS.c.project == project,
                    PENDING_REQUESTS.c.req_id == req_id,
                    PENDING_REQUESTS.c.state.in_(FINAL),
                )
            )
            conn.execute(
                PENDING_REQUESTS.insert(),
                {
                    "project": project,
                    "req_id": req_id,
                    "requested_at": requested_at,
                    "replica": replica,
                    "session": session,
                    "tool_name": tool_name,
                    "tool_input": json.dumps(tool_input, ensure_ascii=False),
                    "needs": needs,
                    "offer": json.dumps(offer, ensure_ascii=False),
                    "state": PENDING,
                },
            )

        await self._run(add)

    async def fleet_part(
        self, projects: Collection[str], requests: Collection[tuple[str, str]]
    ) -> tuple[list[SledRow], list[PendingRow]]:
        """The held sleds among ``projects`` and the rows of ``requests`` (project,
        req_id) in any state, in one read: what a replica re-reads when told what
        changed, instead of the whole fleet."""

        def read(conn: Connection) -> tuple[list[SledRow], list[PendingRow]]:
            sleds = (
                conn.execute(
                    select(*_SLED_COLUMNS).where(
                        SLEDS.c.project.in_(list(projects)), SLEDS.c.replica != GONE
                    )
                ).all()
                if projects
                else []
            )
            rows = (
                conn.execute(
                    select(*_PENDING_COLUMNS).where(
                        tuple_(PENDING_REQUESTS.c.project, PENDING_REQUESTS.c.req_id).in_(
                            list(requests)
                        )
                    )
                ).all()
                if requests
                else []
            )
            return [_sled_row(r) for r in sleds], [_pending_row(r) for r in rows]

        return await self._run(read)

    async def pending_row(self, project: str, req_id: str) -> PendingRow | None:
        return await self._run(lambda conn: _current(conn, project, req_id))

    async def decide_pending(self, entry: AuditEntry, new_rule: Rule | None = None) -> Recorded:
        """The decision of a pending request: the compare-and-set ``pending`` → ``decided``
        and its audit row (and an always_allow's rule) in one transaction, or
        :class:`StateChanged` and nothing written. ``entry.requested_at`` names the
        request."""
        assert entry.requested_at is not None

        def decide(conn: Connection) -> Recorded:
            _move(
                conn,
                entry.project,
                entry.req_id,
                entry.requested_at,  # type: ignore[arg-type]
                expected=PENDING,
                new=DECIDED,
                decision=entry.decision,
                decided_by=entry.by,
                decided_at=entry.decided_at,
            )
            rule = self._insert_rule(conn, new_rule) if new_rule is not None else None  # type: ignore[attr-defined]
            return Recorded(_audit(conn, entry), rule)

        recorded = await self._run_cas(decide)
        if recorded.rule is not None:
            self.policy.add(recorded.rule)
        return recorded

    async def end_pending(self, entry: AuditEntry, expected: str, new: str) -> None:
        """A compare-and-set ``expected`` → ``new`` (withdrawn, undelivered) with its audit
        row in one transaction, or :class:`StateChanged` and nothing written."""
        assert entry.requested_at is not None

        ended: dict[str, Any] = {"decided_by": entry.by, "decided_at": entry.decided_at}
        if new == WITHDRAWN:
            ended["decision"] = WITHDRAWN

        def end(conn: Connection) -> None:
            _move(
                conn,
                entry.project,
                entry.req_id,
                entry.requested_at,  # type: ignore[arg-type]
                expected=expected,
                new=new,
                **ended,
            )
            _audit(conn, entry)

        await self._run_cas(end)

    async def delivered(self, project: str, req_id: str, requested_at: float) -> bool:
        """``decided`` → ``delivered`` (no audit row: the decision's is the record)."""

        def mark(conn: Connection) -> bool:
            try:
                _move(conn, project, req_id, requested_at, expected=DECIDED, new=DELIVERED)
            except StateChanged:
                return False
            return True

        return await self._run_cas(mark)

    async def decided_for(self, replica: str) -> list[PendingRow]:
        """The decided requests ``replica`` holds and has not delivered yet."""
        query = select(*_PENDING_COLUMNS).where(
            PENDING_REQUESTS.c.state == DECIDED, PENDING_REQUESTS.c.replica == replica
        )
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [_pending_row(r) for r in rows]
