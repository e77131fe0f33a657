"""Everything the store does only because the engine is SQLite, in one place.

- **Where**: a file path or :data:`~sled_gateway.store.MEMORY`.
- **Durability**: WAL mode with ``synchronous=NORMAL``. A transaction is in the
  operating system's page cache once its commit returns, so it survives a crash
  of the process (``kill -9``); only a power loss or kernel crash can lose the
  last few. ``FULL`` would fsync every commit and halve the decision rate for
  that case.
- **Transactions**: Python's ``sqlite3`` module opens transactions by itself and
  not for DDL or savepoints; its own control is turned off and every
  transaction starts with ``BEGIN IMMEDIATE``, which takes the write lock at
  once, so the migrations are transactional, a savepoint belongs to its
  transaction, and a second writer (a person with the ``sqlite3`` shell) waits
  instead of failing halfway.
- **One gateway per file**: an ``flock`` on ``PATH.lock``. Each gateway holds
  the active rules in memory, so a second one would answer with stale rules;
  the kernel releases the lock even when the holder is killed.
- **Private files**: the audit holds every tool input (commands, file
  contents, the secrets in them). A folder the store creates is ``0700`` and
  a new database file ``0600`` whatever the umask; SQLite gives the ``-wal``,
  ``-shm`` and ``-journal`` files it makes the database file's mode. An
  existing folder or file others can read is left as it is (it is the
  user's) and named in a warning with the ``chmod`` that fixes it.
- **The 0.2.0 version marker**: ``PRAGMA user_version`` is the schema version
  0.2.0 reads. It is kept equal to the Alembic revision's number, so 0.2.0
  refuses a file a newer release has changed instead of writing into it.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from sled_gateway.store import MEMORY
from sled_gateway.store.models import StoreError

log = logger.bind(actor="gateway-store")

#: The files SQLite keeps beside a database (WAL mode, or the rollback journal).
COMPANIONS = ("-wal", "-shm", "-journal")


def make_private(file: str) -> None:
    """Create ``file``'s missing folders ``0700`` and the file itself ``0600``."""
    path = Path(file)
    missing = []
    here = path.parent
    while not here.exists():
        missing.append(here)
        here = here.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    for made in missing:
        os.chmod(made, 0o700)  # mkdir's mode is masked by the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # SQLite gives its -wal and -shm this file's mode
    finally:
        os.close(fd)


def warn_if_readable(file: str) -> None:
    """Warn about ``file``'s folder, the file and its companions if others may read them
    (once the store is open: a file refused is not used, so not worth a warning)."""
    _warn_if_open(Path(file).parent, "chmod 700")
    for name in (file, *(file + suffix for suffix in COMPANIONS)):
        _warn_if_open(Path(name), "chmod 600")


def _warn_if_open(path: Path, fix: str) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        log.warning(
            "{} is mode {:04o}: other local users may read the audit (every tool input); "
            "fix: {} '{}'",
            path,
            mode,
            fix,
            path,
        )


def file_id(file: str) -> tuple[int, int] | None:
    """The (device, inode) of ``file``, to notice it replaced or removed later."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def file_problem(file: str, opened: tuple[int, int]) -> str | None:
    """Why the open database ``file`` no longer takes durable commits, or None."""
    if file_id(file) != opened:
        return f"{file} was removed or replaced"
    folder = os.path.dirname(os.path.abspath(file))
    # The WAL's checkpoints and the journal need the folder writable, not just the file.
    if not os.access(folder, os.W_OK) or not os.access(file, os.W_OK):
        return f"{file} or its folder is not writable"
    return None


def url_for_path(path: str) -> URL:
    """The SQLAlchemy URL of a database file, or of :data:`MEMORY`."""
    return URL.create("sqlite", database=None if path == MEMORY else path)


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def file_of(url: URL) -> str | None:
    """The database file of a SQLite URL; None when it lives in memory."""
    database = url.database
    if not database or database == MEMORY or database.startswith("file::memory:"):
        return None
    return database


def prepare_engine(engine: Engine, *, in_file: bool) -> None:
    """Set each new connection up for the store (see the module's docstring)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the BEGIN below is the only one
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 5000")
            if in_file:
                mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"cannot use WAL mode (got {mode})")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        # Straight to the driver: this runs once per transaction, on the hot path.
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]


@functools.lru_cache(maxsize=16)
def _insert_statement(table: str, columns: tuple[str, ...]) -> str:
    # Names come from the code's own tables and keys, never from input.
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def insert_row(connection: Connection, table: str, row: dict[str, Any]) -> int:
    """Insert ``row`` into ``table`` in ``connection``'s open transaction; its rowid.

    Straight to the driver, as ``BEGIN IMMEDIATE`` is: the hot path's one statement
    (a decision's audit row) then costs the driver's few microseconds, where
    SQLAlchemy's execution around it took several times the insert itself. The
    transaction, its commit and rollback stay SQLAlchemy's. A driver error is
    raised as SQLAlchemy's, without the values (a tool's input), as
    ``hide_parameters`` does for the other statements.
    """
    statement = _insert_statement(table, tuple(row))
    driver = connection.connection.driver_connection
    assert driver is not None
    try:
        rowid = driver.execute(statement, tuple(row.values())).lastrowid
    except sqlite3.Error as exc:
        raise DBAPIError.instance(
            statement, None, exc, sqlite3.Error, hide_parameters=True
        ) from exc
    assert rowid is not None
    return int(rowid)


def marked_version(connection: Connection) -> int:
    """The schema version in the file's header (0 for a new file)."""
    return int(connection.exec_driver_sql("PRAGMA user_version").scalar_one())


def mark_version(connection: Connection, version: int) -> None:
    """Write the schema version into the header, in the caller's transaction."""
    if marked_version(connection) != version:
        connection.exec_driver_sql(f"PRAGMA user_version = {int(version)}")


class FileLock:
    """An exclusive ``flock`` on ``PATH.lock`` for as long as the store is open."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or :class:`StoreError` naming the file another gateway holds."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another gateway process") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
