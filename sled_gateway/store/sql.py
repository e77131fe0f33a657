"""The store on SQLAlchemy Core: one writer thread, each burst of writes one transaction.

Any SQLAlchemy URL names the database; a path (or ``:memory:``) is a SQLite
file. Whatever only SQLite needs (WAL, ``BEGIN IMMEDIATE``, the lock file,
its version marker) lives in :mod:`sled_gateway.store.sqlite`; everything here
is portable Core (``select``, ``insert``, ``update``, ``delete``), so a server
database such as ``postgresql+psycopg://...`` needs its driver and no code.

One *writer thread* owns the one connection and runs every statement, so the
event loop never blocks on the database: the loop queues a small function
and awaits its future. Whatever is queued while a commit runs goes into the
next transaction together (up to :data:`_MAX_BATCH`), each operation in its
own savepoint so one failing statement fails only its caller. A burst of
decisions costs one commit, not one each (:attr:`SqlStore.commits` counts).

Durability: :meth:`SqlStore.record` returns once the transaction holding the
row has committed, and the caller sends the sled its answer only then.

The schema is migrated by Alembic at :meth:`SqlStore.open`
(:mod:`sled_gateway.store.migrations`); a file written by a newer release is
refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, Self, TypeVar

from loguru import logger
from sqlalchemy import (
    REAL,
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeEngine

from protocol.web import ascii_digits
from sled_gateway.policy import Policy
from sled_gateway.store import MEMORY, fleet, postgresql, shared, sqlite
from sled_gateway.store.models import (
    MAX_PAGE,
    AlreadyRecorded,
    AuditEntry,
    PersonToken,
    Recorded,
    Rule,
    RuleRevoked,
    StoreError,
    TokenRevoked,
    UnknownRule,
    UnknownToken,
    Vote,
)

log = logger.bind(actor="gateway-store")

T = TypeVar("T")

#: The schema this release writes: the number of its newest Alembic revision.
SCHEMA_VERSION = 7
#: Most operations in one transaction (a bound on one commit's latency).
_MAX_BATCH = 512
#: A server connection idle this long is pinged before its next batch (see
#: SqlStore._answered_lately).
PING_AFTER_IDLE_S = 1.0


def _drop(conn: Connection) -> None:
    """Invalidate ``conn`` and end its transaction, without a round trip: its next
    statement runs on a new connection."""
    with contextlib.suppress(SQLAlchemyError):
        if not conn.invalidated:
            conn.invalidate()
    with contextlib.suppress(SQLAlchemyError):
        conn.rollback()  # on an invalidated connection this only forgets the transaction


def _connection_lost(error: BaseException) -> bool:
    return isinstance(error, DBAPIError) and error.connection_invalidated


_PURGE_EVERY_S = 3600.0
#: How far gateways' clocks may differ for ``record(once=True)`` to find a request's row.
_CLOCK_MARGIN_S = 3600.0
#: The share of the size cap written between two checks of it (a bound on the overshoot).
_CAP_CHECK_SHARE = 16
#: A trim takes the audit this far under the cap, so the next rows do not trim again at once.
_CAP_TRIM_TO = 0.9

# The tables as the newest revision leaves them (the revisions themselves
# spell out each step and never import these).
METADATA = MetaData()
_ID = BigInteger().with_variant(Integer(), "sqlite")
# Unix seconds, as 8-byte floats everywhere (SQLite's REAL is one).
_TIME: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")
AUDIT = Table(
    "audit",
    METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("project", Text, nullable=False),
    Column("session", Integer),
    Column("req_id", Text, nullable=False),
    Column("tool_name", Text, nullable=False),
    Column("tool_input", Text, nullable=False),  # JSON text
    Column("decision", Text, nullable=False),
    Column("decided_by", Text, nullable=False),
    Column("requested_at", _TIME),
    Column("decided_at", _TIME, nullable=False),
    Column("reason", Text),
    Column("who", Text),  # a person's id, operator, rule:<id>...; NULL before schema 4
    Column("channel", Text),
    Index("audit_decided_at", "decided_at"),
    Index("audit_project", "project", "id"),
    Index("audit_who", "who", "id"),
    sqlite_autoincrement=True,
)
TOKENS = Table(
    "person_tokens",
    METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("person", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", _TIME, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("expires_at", _TIME, nullable=False),
    Column("revoked_at", _TIME),
    Column("revoked_by", Text),
    Index("person_tokens_secret", "secret_sha256", unique=True),
    sqlite_autoincrement=True,
)
VOTES = Table(
    "votes",
    METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("project", Text, nullable=False),
    Column("req_id", Text, nullable=False),
    Column("requested_at", _TIME),
    Column("person", Text, nullable=False),
    Column("decision", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("at", _TIME, nullable=False),
    Column("reason", Text),
    Column("needs", Integer, nullable=False),
    Index("votes_request", "project", "req_id", "id"),
    sqlite_autoincrement=True,
)
# What replicas share (schema 5) is declared in its own module, and is part of the schema.
for _table in fleet.METADATA.tables.values():
    _table.to_metadata(METADATA)
_TOKEN_COLUMNS = (
    TOKENS.c.id,
    TOKENS.c.person,
    TOKENS.c.secret_sha256,
    TOKENS.c.created_at,
    TOKENS.c.created_by,
    TOKENS.c.expires_at,
    TOKENS.c.revoked_at,
    TOKENS.c.revoked_by,
)
_VOTE_COLUMNS = (
    VOTES.c.project,
    VOTES.c.req_id,
    VOTES.c.person,
    VOTES.c.decision,
    VOTES.c.channel,
    VOTES.c.at,
    VOTES.c.reason,
    VOTES.c.requested_at,
    VOTES.c.needs,
)
RULES = Table(
    "rules",
    METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("project", Text),
    Column("tool_name", Text, nullable=False),
    Column("match_key", Text),
    Column("action", Text, nullable=False),
    Column("created_at", _TIME, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("origin", Text),
    Column("reason", Text),
    Column("revoked_at", _TIME),
    Column("revoked_by", Text),
    Column("rule", Text),  # a rule in Claude Code's grammar; NULL for an exact (tool, key) rule
    CheckConstraint("action IN ('allow', 'ask', 'deny')", name="rules_action"),
    Index("rules_revoked_at", "revoked_at"),
    sqlite_autoincrement=True,
)
_RULE_COLUMNS = (
    RULES.c.id,
    RULES.c.project,
    RULES.c.tool_name,
    RULES.c.match_key,
    RULES.c.action,
    RULES.c.created_at,
    RULES.c.created_by,
    RULES.c.origin,
    RULES.c.reason,
    RULES.c.revoked_at,
    RULES.c.revoked_by,
    RULES.c.rule,
)
_AUDIT_COLUMNS = (
    AUDIT.c.id,
    AUDIT.c.project,
    AUDIT.c.session,
    AUDIT.c.req_id,
    AUDIT.c.tool_name,
    AUDIT.c.tool_input,
    AUDIT.c.decision,
    AUDIT.c.decided_by,
    AUDIT.c.reason,
    AUDIT.c.requested_at,
    AUDIT.c.decided_at,
    AUDIT.c.who,
    AUDIT.c.channel,
)
# Alembic's own bookkeeping, as Alembic makes it: read before Alembic is
# loaded, and written for a new database, which needs no migration.
_ALEMBIC_VERSION = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)
# Console sessions, logins in flight and settings (sled_gateway/store/shared.py).
shared.copy_tables(METADATA)
_INSERT_AUDIT = AUDIT.insert()
# Many rows in one executemany call, their ids back in the order given (SQLAlchemy
# sends them in as few statements as the engine can keep that order in).
_INSERT_AUDIT_ROWS = AUDIT.insert().returning(AUDIT.c.id, sort_by_parameter_order=True)
_INSERT_RULE = RULES.insert()


class _Outcome(Protocol):
    """Where the writer thread puts an operation's result: a ``concurrent.futures.Future``
    (a caller on another thread) or a :class:`_LoopOutcome` (a coroutine on the loop)."""

    def set_running_or_notify_cancel(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException | None) -> None: ...


class _LoopOutcome:
    """An operation's result handed to a coroutine's asyncio future in one
    ``call_soon_threadsafe``, the one wake-up of the loop the operation needs.

    A ``concurrent.futures.Future`` wrapped by :func:`asyncio.wrap_future` does the
    same with a condition variable and its lock taken six times, two chained
    callbacks and a copy of the state across: per decision, on the loop and on the
    writer, work of ours that was neither the database's nor the wake-up itself.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        # The asyncio future is the loop's to read; a caller that stopped waiting is
        # skipped in _hand_over, and its operation runs all the same (see _run_batch).
        return True

    def set_result(self, result: Any) -> None:
        self._post(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._post(None, exception)

    def _post(self, result: Any, exception: BaseException | None) -> None:
        # A closed loop raises RuntimeError: nobody is left to wait for this result.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_hand_over, self.future, result, exception)


def _hand_over(future: asyncio.Future[Any], result: Any, exception: BaseException | None) -> None:
    if future.done():  # cancelled: its caller stopped waiting
        return
    if exception is None:
        future.set_result(result)
    else:
        future.set_exception(exception)


_Op = tuple[Callable[[Connection], Any], _Outcome]
_Result = tuple[Any, Exception | None]  # (value, None) or (None, what the operation raised)
_STOP = object()


class _OperationFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _reason(exc: Exception) -> str:
    """The database's own words: SQLAlchemy's message adds the statement and its
    parameters (a tool's input), which belong in no error a caller passes on. Only
    the primary message, too: PostgreSQL's detail quotes the failing row."""
    if not isinstance(exc, DBAPIError):
        return str(exc)
    primary = getattr(getattr(exc.orig, "diag", None), "message_primary", None)
    return str(primary) if primary else str(exc.orig)


def _rule(row: Sequence[Any]) -> Rule:
    return Rule(*row)


def _entry(row: Sequence[Any]) -> AuditEntry:
    (id_, project, session, req_id, tool, tool_input, decision, by, reason, req_at, dec_at) = row[
        :11
    ]
    who, channel = row[11], row[12]
    try:
        parsed = json.loads(tool_input)
    except ValueError:
        parsed = tool_input
    return AuditEntry(
        project,
        session,
        req_id,
        tool,
        parsed,
        decision,
        by,
        reason,
        req_at,
        dec_at,
        id_,
        who,
        channel,
    )


class _AuditRow:
    """The operation that inserts one audit row; a run of them is one executemany call."""

    __slots__ = ("params", "size")

    def __init__(self, e: AuditEntry) -> None:
        self.params: dict[str, Any] = {
            "project": e.project,
            "session": e.session,
            "req_id": e.req_id,
            "tool_name": e.tool_name,
            "tool_input": json.dumps(e.tool_input, ensure_ascii=False),
            "decision": e.decision,
            "decided_by": e.by,
            "reason": e.reason,
            "requested_at": e.requested_at,
            "decided_at": e.decided_at,
            "who": e.who,
            "channel": e.channel,
        }
        # About what the row takes on disk: its input, and room for the other columns.
        self.size = len(self.params["tool_input"]) + 256

    def __call__(self, conn: Connection) -> int:
        if conn.dialect.name == "sqlite":
            return sqlite.insert_row(conn, "audit", self.params)
        return _new_id(conn.execute(_INSERT_AUDIT, self.params))


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None  # an INSERT of one row
    return int(key[0])


def _url(location: str | os.PathLike[str]) -> URL:
    text = os.fspath(location)
    return postgresql.driver_url(make_url(text)) if "://" in text else sqlite.url_for_path(text)


class SqlStore(fleet.FleetStore, shared.SharedState):
    """The audit log and the rules in a SQL database, behind one writer thread.

    ``location`` is a SQLAlchemy URL, a SQLite file's path, or
    :data:`~sled_gateway.store.MEMORY`. Nothing is touched before
    :meth:`open`.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] = MEMORY,
        *,
        retention_days: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.url = _url(location)
        #: How messages name the database (a URL without its password).
        self.location = (
            os.fspath(location)
            if self.url.password is None
            else self.url.render_as_string(hide_password=True)
        )
        self.retention_days = retention_days
        #: The size cap of a SQLite database: the oldest audit rows go beyond it.
        self.max_bytes = max_bytes
        self._written = 0  # audit bytes (about) since the size cap was last checked
        #: The active rules, updated after each committed change (on the caller's thread).
        self.policy = Policy()
        #: The schema version the database had when opened (0: a new database).
        self.found_version = 0
        #: Transactions committed by the writer thread (a burst should take few).
        self.commits = 0
        self._sqlite = sqlite.is_sqlite(self.url)
        self._postgresql = postgresql.is_postgresql(self.url)
        # SimpleQueue: put and get are one C call each, with no condition variable in Python.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._gate = threading.Lock()  # orders "closed" against queueing
        self._closed = True
        self._thread: threading.Thread | None = None
        #: When the server last answered a whole batch (None: ping before the next).
        self._answered_at: float | None = None
        self._engine: Engine | None = None
        self._lock: sqlite.FileLock | None = None
        self._watchdog: postgresql.Watchdog | None = None
        #: How long a caller waits for its operation (None: until it ends; see .postgresql).
        self._operation_timeout = postgresql.OPERATION_TIMEOUT_S if self._postgresql else None
        self._purge_due = 0.0
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the SQLite file

    @property
    def shared(self) -> bool:
        """Whether several gateway replicas may use this database (a server database)."""
        return not self._sqlite

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> Self:
        """Open (creating the file and its folder), lock, migrate, load the rules.

        :class:`StoreError` when the database cannot be used.
        """
        file = sqlite.file_of(self.url) if self._sqlite else None
        try:
            if file is not None:
                sqlite.make_private(file)
                self._lock = sqlite.FileLock(file)
                self._lock.acquire()
            # hide_parameters: an error (and its log line) never carries a tool's input.
            engine = create_engine(
                self.url,
                poolclass=NullPool,
                hide_parameters=True,
                connect_args=postgresql.connect_args(self.url) if self._postgresql else {},
            )
        except OSError as exc:
            self._release()
            raise StoreError(f"cannot open {self.location}: {exc.strerror or exc}") from None
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            self._release()
            raise StoreError(f"cannot open {self.location}: {exc}") from None
        except BaseException:
            self._release()
            raise
        if self._sqlite:
            sqlite.prepare_engine(engine, in_file=file is not None)
        if self._postgresql:
            self._watchdog = postgresql.Watchdog(engine)
        self._engine = engine
        self._purge_due = 0.0  # purge once at start, then hourly
        ready: concurrent.futures.Future[list[Rule]] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._serve, args=(engine, ready), name="gateway-store", daemon=True
        )
        thread.start()
        try:
            rules = ready.result()
        except BaseException:
            thread.join()
            self._release()
            raise
        self.policy = Policy(rules)
        if file is not None:
            sqlite.warn_if_readable(file)
            self._file_id = sqlite.file_id(file)
        with self._gate:
            self._thread = thread
            self._closed = False
        log.info(
            "store {} open (schema {}, {} active rule(s){})",
            self.location,
            SCHEMA_VERSION,
            len(rules),
            f", audit kept {self.retention_days:g} days" if self.retention_days else "",
        )
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued work, close the database. Idempotent."""
        with self._gate:
            self._closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("store thread did not finish within {} s", timeout)
        self._release()

    def _release(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- the writer thread --------------------------------------------------------

    def _serve(self, engine: Engine, ready: concurrent.futures.Future[list[Rule]]) -> None:
        try:
            conn = engine.connect()
        except StoreError as exc:
            ready.set_exception(StoreError(f"{self.location}: {exc}"))
            return
        except OperationalError as exc:
            ready.set_exception(StoreError(f"cannot open {self.location}: {exc.orig}"))
            return
        except DBAPIError as exc:  # it opened, but is not a database
            ready.set_exception(
                StoreError(f"{self.location} is not a usable gateway database: {exc.orig}")
            )
            return
        except BaseException as exc:
            ready.set_exception(exc)
            return
        with conn:
            try:
                rules = self._prepare(conn)
            except DBAPIError as exc:
                ready.set_exception(
                    StoreError(f"{self.location} is not a usable gateway database: {exc.orig}")
                )
                return
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(rules)
            self._work(conn)

    def _prepare(self, conn: Connection) -> list[Rule]:
        """Migrate and read the active rules, in one transaction."""
        with conn.begin():
            if self._postgresql:
                postgresql.lock_migrations(conn)  # replicas starting together take turns
            found, current = self._schema_version(conn)
            if not current and not inspect(conn).get_table_names():
                # An empty database: made as the newest revision leaves it and
                # stamped with it, as Alembic advises, without loading Alembic
                # (11 MiB a gateway would carry for its lifetime).
                METADATA.create_all(conn)
                _ALEMBIC_VERSION.create(conn)
                conn.execute(_ALEMBIC_VERSION.insert(), {"version_num": f"{SCHEMA_VERSION:04d}"})
            elif not current:
                from sled_gateway.store import migrations  # Alembic loads only to migrate

                try:
                    migrations.upgrade(conn)
                except DBAPIError:
                    raise
                except Exception as exc:  # Alembic's own errors (an unknown revision)
                    raise StoreError(
                        f"{self.location} is not a usable gateway database: {exc}"
                    ) from None
            if self._sqlite:
                sqlite.mark_version(conn, SCHEMA_VERSION)
            rows = conn.execute(
                select(*_RULE_COLUMNS).where(RULES.c.revoked_at.is_(None)).order_by(RULES.c.id)
            ).all()
            self._rules_signature = shared.rules_signature(conn)
        self.found_version = found
        if 0 < found < SCHEMA_VERSION:
            log.info(
                "migrated {} from schema version {} to {}", self.location, found, SCHEMA_VERSION
            )
        elif found and not current:
            log.info("{}: schema version {} now kept by Alembic", self.location, found)
        return [_rule(r) for r in rows]

    def _schema_version(self, conn: Connection) -> tuple[int, bool]:
        """The version found, and whether Alembic has it at the newest revision already.

        A database from before Alembic has only the SQLite marker (0.1.0, 0.2.0).
        """
        marked = sqlite.marked_version(conn) if self._sqlite else 0
        revision: str | None = None
        if inspect(conn).has_table("alembic_version"):
            revisions = conn.execute(select(_ALEMBIC_VERSION.c.version_num)).scalars().all()
            revision = revisions[0] if len(revisions) == 1 else None
            if len(revisions) > 1 or (revision is not None and not ascii_digits(revision)):
                raise StoreError(
                    f"{self.location} is not a gateway database "
                    f"(Alembic revision {', '.join(map(repr, revisions))})"
                )
        found = int(revision) if revision is not None else marked
        newest = max(found, marked)
        if newest > SCHEMA_VERSION:
            raise StoreError(
                f"{self.location} has schema version {newest}; this gateway knows versions up "
                f"to {SCHEMA_VERSION} (a newer release wrote it)"
            )
        return found, revision is not None and found == SCHEMA_VERSION

    def _work(self, conn: Connection) -> None:
        if self._capped:
            self._cap(conn)
        while True:
            try:
                first = self._queue.get(timeout=self._purge_wait())
            except queue.Empty:
                with (
                    self._watchdog.bound(postgresql.PURGE_TIMEOUT_S)
                    if self._watchdog
                    else contextlib.nullcontext()
                ):
                    self._purge(conn)
                continue
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            with self._watchdog.bound() if self._watchdog else contextlib.nullcontext():
                unpinged = not self._sqlite and self._answered_lately()
                if self._sqlite or unpinged or self._reachable(conn, batch):
                    if self._run_batch(conn, batch, unpinged=unpinged):
                        self._answered_at = time.monotonic()
                    else:
                        self._answered_at = None
            if self._capped:
                assert self.max_bytes
                self._written += sum(fn.size for fn, _fut in batch if isinstance(fn, _AuditRow))
                if self._written >= self.max_bytes // _CAP_CHECK_SHARE:
                    self._cap(conn)
            if stop:
                return

    def _answered_lately(self) -> bool:
        """Whether the server answered the last batch, less than :data:`PING_AFTER_IDLE_S`
        ago: its connection is then used without a ping first. The ping is two of a
        read's five round trips, and a decision across replicas waits for three
        operations in a row. Should the connection have died meanwhile, the batch's
        first statement fails, before any COMMIT, and it runs again on a new one."""
        answered = self._answered_at
        return answered is not None and time.monotonic() - answered < PING_AFTER_IDLE_S

    def _ping_reconnecting(self, conn: Connection) -> SQLAlchemyError | None:
        """A ping, a dead connection replaced first: None if the server answers."""
        connected = not conn.invalidated  # else the ping itself is a new connection's
        error = self._ping(conn)
        if error is not None and connected:
            log.warning("store connection to {} lost; reconnecting", self.location)
            error = self._ping(conn)  # on a new connection
        return error

    def _reachable(self, conn: Connection, batch: list[_Op]) -> bool:
        """Whether a server database answers, a dead connection replaced first; if not,
        ``batch`` fails with :class:`StoreError` (see :mod:`.postgresql`)."""
        error = self._ping_reconnecting(conn)
        if error is None:
            return True
        log.warning("store {} unreachable: {}", self.location, _reason(error))
        failure = StoreError(f"the store cannot reach {self.location}: {_reason(error)}")
        for _fn, fut in batch:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(failure)
        return False

    @staticmethod
    def _ping(conn: Connection) -> SQLAlchemyError | None:
        """``SELECT 1`` and its ``ROLLBACK``: None if the server answered both.

        Never raises: the server can end the connection between the two (a fast
        shutdown, ``pg_terminate_backend``), and an exception here would end the
        writer thread, after which no operation is answered again. A connection that
        failed either statement is dropped, so that the next one is new.
        """
        try:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()
        except SQLAlchemyError as exc:
            _drop(conn)
            return exc
        return None

    def _run_batch(self, conn: Connection, batch: list[_Op], *, unpinged: bool = False) -> bool:
        """Run ``batch``; whether the database answered every operation without a
        driver error (a refused row is an answer; a lost connection is not).
        ``unpinged``: its connection was not pinged first (see :meth:`_answered_lately`)."""
        # A future its caller cancelled still has its operation run (an audit
        # row is written whoever stopped waiting); it just gets no result.
        wanted = [fut.set_running_or_notify_cancel() for _fn, fut in batch]
        try:
            try:
                try:
                    results = self._transact(conn, batch)
                except _OperationFailed as lost:
                    # A statement failed, so nothing was committed: when it was the
                    # connection that died unseen, the whole batch runs again on a new one.
                    if not (
                        unpinged
                        and _connection_lost(lost.error)
                        and self._ping_reconnecting(conn) is None
                    ):
                        raise
                    results = self._transact(conn, batch)
            except _OperationFailed as failed:
                # Rolled back whole; run again with each operation in a savepoint,
                # so that only the failing one fails. Savepoints cost two
                # statements per operation, so only a batch that needs them pays.
                if len(batch) == 1:
                    results = [(None, failed.error)]
                else:
                    results = self._transact_isolated(conn, batch)
        except Exception as exc:
            log.opt(exception=exc).error("store transaction of {} operation(s) failed", len(batch))
            failure = StoreError(f"the store could not commit: {_reason(exc)}")
            for (_fn, fut), want in zip(batch, wanted, strict=True):
                if want:
                    fut.set_exception(failure)
            return False
        answered = True
        for (_fn, fut), want, (value, error) in zip(batch, wanted, results, strict=True):
            if isinstance(error, OperationalError) or (
                isinstance(error, DBAPIError) and error.connection_invalidated
            ):
                answered = False
            if not want:
                continue
            if isinstance(error, DBAPIError):
                fut.set_exception(StoreError(f"the store could not write: {_reason(error)}"))
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
        return answered

    def _transact(self, conn: Connection, batch: list[_Op]) -> list[_Result]:
        """Every operation in one transaction; :class:`_OperationFailed` rolls all back."""
        values: list[Any] = []
        with conn.begin():
            i = 0
            while i < len(batch):
                rows = []  # the run of audit rows that starts here
                for fn, _fut in batch[i:]:
                    if not isinstance(fn, _AuditRow):
                        break
                    rows.append(fn.params)
                try:
                    if len(rows) > 1:
                        values += conn.execute(_INSERT_AUDIT_ROWS, rows).scalars().all()
                    else:
                        values.append(batch[i][0](conn))
                except Exception as exc:
                    raise _OperationFailed(exc) from exc
                i += max(1, len(rows))
        self.commits += 1
        return [(value, None) for value in values]

    def _transact_isolated(self, conn: Connection, batch: list[_Op]) -> list[_Result]:
        """Every operation in one transaction, each in a savepoint of its own."""
        results: list[_Result] = []
        with conn.begin():
            for fn, _fut in batch:
                savepoint = conn.begin_nested()
                try:
                    value = fn(conn)
                except Exception as exc:
                    savepoint.rollback()
                    results.append((None, exc))
                else:
                    savepoint.commit()
                    results.append((value, None))
        self.commits += 1
        return results

    def _purge_wait(self) -> float | None:
        if not self.retention_days:
            return None
        return max(0.0, self._purge_due - time.monotonic())

    def _purge(self, conn: Connection) -> None:
        self._purge_due = time.monotonic() + _PURGE_EVERY_S
        assert self.retention_days
        cutoff = time.time() - self.retention_days * 86400
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._run_batch(
            conn,
            [(lambda c: c.execute(delete(AUDIT).where(AUDIT.c.decided_at < cutoff)).rowcount, fut)],
        )
        if fut.exception() is None and fut.result():
            log.info(
                "audit retention: removed {} row(s) older than {:g} days",
                fut.result(),
                self.retention_days,
            )

    @property
    def _capped(self) -> bool:
        # Only SQLite tells its size cheaply (pages in use); a server database has its own
        # quotas.
        return bool(self.max_bytes) and self._sqlite

    def _cap(self, conn: Connection) -> None:
        """Delete the oldest audit rows while the database holds more than ``max_bytes``."""
        self._written = 0
        assert self.max_bytes
        cap = self.max_bytes

        def trim(c: Connection) -> int:
            page = int(c.exec_driver_sql("PRAGMA page_size").scalar_one())
            pages = int(c.exec_driver_sql("PRAGMA page_count").scalar_one())
            free = int(c.exec_driver_sql("PRAGMA freelist_count").scalar_one())
            used = (pages - free) * page
            if used <= cap:
                return 0
            rows = int(c.execute(select(func.count()).select_from(AUDIT)).scalar_one())
            # Rows are taken as equally big: drop the share that brings the audit under the cap.
            drop = min(rows, math.ceil(rows * (1 - _CAP_TRIM_TO * cap / used)))
            if drop <= 0:
                return 0
            edge = c.execute(
                select(AUDIT.c.id).order_by(AUDIT.c.id).offset(drop - 1).limit(1)
            ).scalar_one()
            return int(c.execute(delete(AUDIT).where(AUDIT.c.id <= edge)).rowcount)

        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._run_batch(conn, [(trim, fut)])
        if fut.exception() is None and fut.result():
            log.warning(
                "audit over its size cap ({} bytes, --audit-max-bytes): removed the {} oldest "
                "row(s)",
                cap,
                fut.result(),
            )

    # -- calling into the writer thread -----------------------------------------------

    def _submit(self, fn: Callable[[Connection], T]) -> concurrent.futures.Future[T]:
        """Queue ``fn`` for a caller on any thread; its future has the result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue_op(fn, fut)
        return fut

    def _queue_op(self, fn: Callable[[Connection], Any], outcome: _Outcome) -> None:
        with self._gate:
            if self._closed:
                outcome.set_exception(StoreError("the store is closed"))
            else:
                self._queue.put((fn, outcome))

    def _submit_here(self, fn: Callable[[Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for a coroutine on the running loop (see :class:`_LoopOutcome`)."""
        outcome = _LoopOutcome(asyncio.get_running_loop())
        self._queue_op(fn, outcome)
        return outcome.future

    async def _run(self, fn: Callable[[Connection], T]) -> T:
        if self._operation_timeout is None:
            return await self._submit_here(fn)
        deadline = time.monotonic() + self._operation_timeout
        future = self._submit_here(postgresql.by_deadline(deadline, fn))
        try:
            return await asyncio.wait_for(
                future, self._operation_timeout + postgresql.COMMIT_GRACE_S
            )
        except TimeoutError:
            raise StoreError(
                f"no answer from {self.location} within {self._operation_timeout:g} s"
            ) from None

    # -- health ---------------------------------------------------------------------

    async def check(self, timeout: float) -> None:
        """A transaction through the writer thread (``BEGIN IMMEDIATE`` on SQLite, so it
        takes the write lock), within ``timeout``; :class:`StoreError` otherwise.

        A SQLite file is also checked where it lies: an open file keeps taking
        commits after its folder is removed or made read-only, but those rows are
        lost, or the next start cannot open the file, so that counts as gone.
        """
        file = sqlite.file_of(self.url) if self._sqlite else None
        if file is not None and self._file_id is not None:
            problem = sqlite.file_problem(file, self._file_id)
            if problem:
                raise StoreError(problem)
        fut = self._submit(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            raise StoreError(f"no commit within {timeout:g} s (the writer is stuck)") from None

    # -- the audit log ------------------------------------------------------------------

    async def record(
        self, entry: AuditEntry, new_rule: Rule | None = None, *, once: bool = False
    ) -> Recorded:
        """Commit an audit row (and the rule an always_allow makes) in one transaction.

        ``new_rule``'s id is ignored; the committed rule (or an identical active
        one, reused) comes back and matches from then on. ``once``: only if the
        request has no row yet (:meth:`_claim`), else :class:`AlreadyRecorded`.
        """

        if new_rule is None and not once:
            return Recorded(await self._run(_AuditRow(entry)), None)

        def write(conn: Connection) -> Recorded:
            if once:
                self._claim(conn, entry)
            rule = self._insert_rule(conn, new_rule) if new_rule is not None else None
            return Recorded(_AuditRow(entry)(conn), rule)

        recorded = await self._run(write)
        if recorded.rule is not None:
            self._policy_add(recorded.rule)
        return recorded

    def _claim(self, conn: Connection, entry: AuditEntry) -> None:
        """The compare-and-set of ``record(once=True)``, in the caller's transaction.

        The request is (project, req_id, requested_at): a sled may use an id again for
        a later request. On PostgreSQL a transaction-level advisory lock on the request
        makes the check and the insert one step across gateways; a decider that finds
        it taken fails at once rather than waiting (no deadlock between two batches,
        and the other decision is about to commit). SQLite has one writer per file.
        There is no index on (project, req_id): the search reads the rows decided
        since the request arrived, which is why the approvals path does not ask for
        it yet (pending requests kept as rows would make this an update of one row).
        """
        if self._postgresql and not postgresql.try_lock_request(conn, entry.project, entry.req_id):
            raise AlreadyRecorded(None)
        query = select(*_AUDIT_COLUMNS).where(
            AUDIT.c.project == entry.project,
            AUDIT.c.req_id == entry.req_id,
            AUDIT.c.requested_at.is_not_distinct_from(entry.requested_at),
        )
        if entry.requested_at is not None:
            # A request's row is written after it arrived: the decided_at index narrows
            # the search to that (an hour's margin for gateways' clocks).
            query = query.where(AUDIT.c.decided_at >= entry.requested_at - _CLOCK_MARGIN_S)
        found = conn.execute(query.limit(1)).first()
        if found is not None:
            raise AlreadyRecorded(_entry(found))

    def record_later(self, entry: AuditEntry) -> concurrent.futures.Future[int]:
        """Queue an audit row without waiting (for paths that send the sled nothing)."""
        fut = self._submit(_AuditRow(entry))

        def report(f: concurrent.futures.Future[int]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("audit row for {!r} not written: {}", entry.req_id, f.exception())

        fut.add_done_callback(report)
        return fut

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
        """Rows newest first; ``before`` is an id (the page after the one ending there);
        ``person``: the rows whose ``who`` it is."""
        query = select(*_AUDIT_COLUMNS)
        if person is not None:
            query = query.where(AUDIT.c.who == person)
        if project is not None:
            query = query.where(AUDIT.c.project == project)
        if since is not None:
            query = query.where(AUDIT.c.decided_at >= since)
        if before is not None:
            query = query.where(AUDIT.c.id < before)
        if decision is not None:
            query = query.where(AUDIT.c.decision == decision)
        query = query.order_by(AUDIT.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [_entry(r) for r in rows]

    # -- rules ------------------------------------------------------------------------------

    @staticmethod
    def _insert_rule(conn: Connection, rule: Rule) -> Rule:
        same = conn.execute(
            select(*_RULE_COLUMNS).where(
                RULES.c.revoked_at.is_(None),
                RULES.c.action == rule.action,
                RULES.c.tool_name == rule.tool_name,
                RULES.c.project.is_not_distinct_from(rule.project),
                RULES.c.match_key.is_not_distinct_from(rule.key),
                RULES.c.rule.is_not_distinct_from(rule.rule),
            )
        ).first()
        if same is not None:
            return _rule(same)
        result = conn.execute(
            _INSERT_RULE,
            {
                "project": rule.project,
                "tool_name": rule.tool_name,
                "match_key": rule.key,
                "action": rule.action,
                "created_at": rule.created_at,
                "created_by": rule.created_by,
                "origin": rule.origin,
                "reason": rule.reason,
                "rule": rule.rule,
            },
        )
        return replace(rule, id=_new_id(result))

    async def add_rule(self, rule: Rule) -> Rule:
        """Commit ``rule`` (its id is ignored); an identical active rule is returned instead."""
        committed = await self._run(lambda conn: self._insert_rule(conn, rule))
        self._policy_add(committed)
        return committed

    async def add_rules(self, rules: Sequence[Rule]) -> list[Rule]:
        """Commit every rule in one transaction, or none (an import is all or nothing)."""

        def insert_all(conn: Connection) -> list[Rule]:
            return [self._insert_rule(conn, rule) for rule in rules]

        committed = await self._run(insert_all)
        for rule in committed:
            self._policy_add(rule)
        return committed

    async def revoke_rule(self, rule_id: int, by: str) -> Rule:
        """Revoke a rule (the row stays, with who and when); UnknownRule / RuleRevoked."""

        def revoke(conn: Connection) -> Rule:
            row = conn.execute(select(*_RULE_COLUMNS).where(RULES.c.id == rule_id)).first()
            if row is None:
                raise UnknownRule(f"no rule {rule_id}")
            rule = _rule(row)
            if rule.revoked_at is not None:
                raise RuleRevoked(rule)
            now = time.time()
            conn.execute(
                update(RULES).where(RULES.c.id == rule_id).values(revoked_at=now, revoked_by=by)
            )
            return replace(rule, revoked_at=now, revoked_by=by)

        revoked = await self._run(revoke)
        self._policy_remove(revoked)
        return revoked

    async def rules(self, *, include_revoked: bool = False) -> list[Rule]:
        query = select(*_RULE_COLUMNS)
        if not include_revoked:
            query = query.where(RULES.c.revoked_at.is_(None))
        query = query.order_by(RULES.c.id.desc())
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [_rule(r) for r in rows]

    # -- person tokens --------------------------------------------------------------------

    async def add_token(self, token: PersonToken, entry: AuditEntry) -> PersonToken:
        """Commit ``token`` (its id is ignored) and its audit row (``req_id`` becomes
        ``token:<id>``) in one transaction."""

        def write(conn: Connection) -> PersonToken:
            result = conn.execute(
                TOKENS.insert(),
                {
                    "person": token.person,
                    "secret_sha256": token.secret_sha256,
                    "created_at": token.created_at,
                    "created_by": token.created_by,
                    "expires_at": token.expires_at,
                },
            )
            made = replace(token, id=_new_id(result))
            _AuditRow(replace(entry, req_id=f"token:{made.id}"))(conn)
            return made

        return await self._run(write)

    async def token_by_hash(self, secret_sha256: str) -> PersonToken | None:
        """The token whose secret hashes to this, revoked and expired ones too."""
        query = select(*_TOKEN_COLUMNS).where(TOKENS.c.secret_sha256 == secret_sha256)
        row = await self._run(lambda conn: conn.execute(query).first())
        return PersonToken(*row) if row is not None else None

    async def tokens(self, *, include_revoked: bool = False) -> list[PersonToken]:
        """Tokens newest first."""
        query = select(*_TOKEN_COLUMNS)
        if not include_revoked:
            query = query.where(TOKENS.c.revoked_at.is_(None))
        query = query.order_by(TOKENS.c.id.desc())
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [PersonToken(*r) for r in rows]

    async def revoke_token(self, token_id: int, by: str, entry: AuditEntry) -> PersonToken:
        """Revoke a token and write its audit row in one transaction; :class:`UnknownToken`,
        :class:`TokenRevoked`."""

        def revoke(conn: Connection) -> PersonToken:
            row = conn.execute(select(*_TOKEN_COLUMNS).where(TOKENS.c.id == token_id)).first()
            if row is None:
                raise UnknownToken(f"no token {token_id}")
            token = PersonToken(*row)
            if token.revoked_at is not None:
                raise TokenRevoked(token)
            now = time.time()
            conn.execute(
                update(TOKENS).where(TOKENS.c.id == token_id).values(revoked_at=now, revoked_by=by)
            )
            _AuditRow(replace(entry, req_id=f"token:{token_id}"))(conn)
            return replace(token, revoked_at=now, revoked_by=by)

        return await self._run(revoke)

    # -- votes ------------------------------------------------------------------------------

    async def add_vote(self, vote: Vote) -> None:
        """Commit one vote (its audit trail: the decision's own row comes with the quorum)."""
        await self._run(
            lambda conn: conn.execute(
                VOTES.insert(),
                {
                    "project": vote.project,
                    "req_id": vote.req_id,
                    "requested_at": vote.requested_at,
                    "person": vote.person,
                    "decision": vote.decision,
                    "channel": vote.channel,
                    "at": vote.at,
                    "reason": vote.reason,
                    "needs": vote.needs,
                },
            )
        )

    async def votes(self, project: str, req_id: str) -> list[Vote]:
        """The votes on a request, oldest first (every request under that id)."""
        query = (
            select(*_VOTE_COLUMNS)
            .where(VOTES.c.project == project, VOTES.c.req_id == req_id)
            .order_by(VOTES.c.id)
        )
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [Vote(*r) for r in rows]
