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
  store asks the server ``SELECT 1`` (:func:`ping`); a dead connection is
  replaced then, so an operation after the server is back succeeds. A commit
  that fails raises to its caller (a decision stays pending and the API
  answers ``503``); it is never retried, since whether it reached the disk
  is unknown.
- **Several gateways on one database** are allowed (no lock file): the
  schema migration takes a transaction-level advisory lock so that two
  replicas starting together do not both create the tables, and
  ``record(once=True)`` one per request, so that of two replicas deciding
  one request exactly one records it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

#: The driver the store uses for a ``postgresql://`` URL.
DRIVER = "postgresql+psycopg"
#: Seconds to wait for a connection before the operation fails (unless the URL says).
CONNECT_TIMEOUT_S = 10
# An arbitrary constant naming the store's migration lock among advisory locks.
_MIGRATION_LOCK = 0x5E1D_0004


def is_postgresql(url: URL) -> bool:
    return url.get_backend_name() == "postgresql"


def driver_url(url: URL) -> URL:
    """``url`` with psycopg 3 as its driver when it names none."""
    return url.set(drivername=DRIVER) if url.drivername == "postgresql" else url


def connect_args(url: URL) -> dict[str, Any]:
    """A bound on connecting, unless the URL's query sets its own."""
    return {} if "connect_timeout" in url.query else {"connect_timeout": CONNECT_TIMEOUT_S}


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
