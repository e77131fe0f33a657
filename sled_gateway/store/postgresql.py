"""Everything the store does only because the engine is PostgreSQL, in one place.

- **Where**: ``--db postgresql://user:password@host:port/database`` (or
  ``postgresql+psycopg://...``); the driver is psycopg 3 (the ``cluster``
  extra), whatever SQLAlchemy's default driver for ``postgresql://`` is.
- **Durability**: a commit returns once PostgreSQL has it in its write-ahead
  log (its default ``synchronous_commit = on``; with synchronous standbys
  configured, once they have it too). The store answers a sled only after
  that commit, as on SQLite. A server set to ``synchronous_commit = off``
  trades that away for every client; the store does not override the
  server's choice.
- **Connection loss**: the writer thread's connection may die with the
  server, a failover or a proxy's idle timeout. Before each transaction the
  store asks the server ``SELECT 1``; a dead connection is replaced then, so
  an operation after the server is back succeeds. A commit that fails raises
  to its caller (a decision stays pending and the API answers ``503``); it
  is never retried, since whether it reached the disk is unknown.
- **A server that stops answering** (frozen by ``SIGSTOP``, a hung host, a
  partition that drops packets) leaves a TCP connection that looks alive:
  the kernel still acknowledges what is sent, so neither TCP keepalives nor
  ``tcp_user_timeout`` ever fire, ``statement_timeout`` runs on the server
  that is not running, and libpq waits forever. So every operation is
  bounded on this side: its caller stops waiting after
  :data:`OPERATION_TIMEOUT_S` (a :class:`~.models.StoreError`: the decision
  is not taken, the API answers ``503``), and a :class:`Watchdog` shuts the
  socket of a transaction that runs longer than that, so the writer thread
  is free for the next one (a new connection, bounded by
  ``connect_timeout``). An operation whose caller has given up is not
  started, and one that ends after its deadline fails inside the
  transaction (:func:`by_deadline`): otherwise a decision queued while the
  server was frozen would commit when it thaws, after its decider was told
  ``503``. What stays unknowable is a ``COMMIT`` already sent when the
  server stopped: it lands when the server resumes, as after any lost
  reply. Keepalives and ``tcp_user_timeout`` are still set: they find a
  dead peer while the connection is idle or unacknowledged.
- **Several gateways on one database** are allowed (no lock file): the
  schema migration takes a transaction-level advisory lock so that two
  replicas starting together do not both create the tables, and
  ``record(once=True)`` one per request, so that of two replicas deciding
  one request exactly one records it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from loguru import logger
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL

from sled_gateway.store.models import StoreError

log = logger.bind(actor="gateway-store")

#: The driver the store uses for a ``postgresql://`` URL.
DRIVER = "postgresql+psycopg"
#: Seconds to wait for a connection before the operation fails (unless the URL says).
CONNECT_TIMEOUT_S = 10
#: The longest an operation's caller waits, and the longest one transaction may run, before
#: it fails (the writer's connection is then shut and replaced). Well above a busy server's
#: slowest commit of a full batch, well under a person's patience.
OPERATION_TIMEOUT_S = 5.0
# An arbitrary constant naming the store's migration lock among advisory locks.
_MIGRATION_LOCK = 0x5E1D_0004


def is_postgresql(url: URL) -> bool:
    return url.get_backend_name() == "postgresql"


def driver_url(url: URL) -> URL:
    """``url`` with psycopg 3 as its driver when it names none."""
    return url.set(drivername=DRIVER) if url.drivername == "postgresql" else url


def connect_args(url: URL) -> dict[str, Any]:
    """Bounds on connecting and on a silent peer, each unless the URL's query sets its own."""
    defaults: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": int(OPERATION_TIMEOUT_S * 1000),
    }
    return {k: v for k, v in defaults.items() if k not in url.query}


#: The bound on the hourly retention purge, which nobody waits for and may delete many rows.
PURGE_TIMEOUT_S = 300.0
#: How much longer than an operation's own deadline its caller waits, for the commit that
#: follows the operation's last statement.
COMMIT_GRACE_S = 1.0

T = TypeVar("T")


def by_deadline(deadline: float, operation: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """``operation``, refused unless it both starts and ends before ``deadline``
    (``time.monotonic()``): past it, its caller has been told it failed."""

    def bounded(conn: Connection) -> T:
        if time.monotonic() >= deadline:
            raise StoreError("the operation's caller stopped waiting before it began")
        result = operation(conn)
        if time.monotonic() >= deadline:
            raise StoreError("the operation ended after its caller stopped waiting")
        return result

    return bounded


class Watchdog:
    """Shuts the socket of the writer's connection when one transaction runs too long.

    A blocked libpq call then sees the connection end, raises, and SQLAlchemy
    invalidates the connection; the writer fails that batch and connects
    anew for the next. :meth:`bound` is entered around each batch; it fires
    again every ``limit`` seconds while the batch still runs (its retry, or a
    reconnect, may hang as well).
    """

    def __init__(self, engine: Engine, limit: float = OPERATION_TIMEOUT_S) -> None:
        self.limit = limit
        #: Connections shut by the watchdog (a test reads it).
        self.fired = 0
        self._raw: Any = None  # the newest psycopg connection (NullPool: the writer's one)
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._stopped = False
        event.listen(engine, "connect", self._connected)
        self._thread = threading.Thread(
            target=self._watch, name="gateway-store-watchdog", daemon=True
        )
        self._thread.start()

    def _connected(self, dbapi_connection: Any, _record: Any) -> None:
        with self._cond:
            self._raw = dbapi_connection

    @contextlib.contextmanager
    def bound(self, limit: float | None = None) -> Iterator[None]:
        """Shut the connection if the block runs over ``limit`` (default: :attr:`limit`)."""
        with self._cond:
            self._deadline = time.monotonic() + (limit or self.limit)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(self.limit)

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = time.monotonic() + self.limit
                self._shut(self._raw)

    def _shut(self, raw: Any) -> None:
        try:
            fd = raw.pgconn.socket  # raises once the connection is closed
        except Exception:
            return
        try:
            # A duplicate of the descriptor: shutting it ends the connection for libpq's
            # own descriptor too, and closing it leaves libpq's open (libpq closes that).
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.warning("store watchdog could not shut the connection: {}", exc)
            return
        self.fired += 1
        log.error(
            "store: a transaction ran over {:g} s (the database does not answer); "
            "its connection is shut and the operation fails",
            self.limit,
        )


def try_lock_request(connection: Connection, project: str, req_id: str) -> bool:
    """Take the request's lock until the caller's transaction ends; False when another
    transaction holds it (``record(once=True)``: another decision is committing)."""
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"{project}\x1f{req_id}"},
        ).scalar_one()
    )


def lock_migrations(connection: Connection) -> None:
    """Hold the migration lock until the caller's transaction ends."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
