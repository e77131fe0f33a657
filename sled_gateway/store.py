"""The gateway's durable store: the audit log and the always-allow / deny rules, in SQLite.

One SQLite file (``--db PATH``; ``:memory:`` for a throwaway run) in WAL mode.
A single *store thread* owns the connection and runs every statement, so the
event loop never blocks on the disk: the loop hands it a small function and
awaits its future. Whatever is queued while a commit runs goes into the next
transaction together, so a burst of decisions costs one commit, not one each.

Durability: a decision's row is committed before its ``perm_response`` is sent
(the caller awaits :meth:`Store.record`). ``synchronous=NORMAL`` in WAL mode
keeps committed transactions through a crash of the process (``kill -9``): the
WAL is in the operating system's page cache as soon as the commit returns. Only
a power loss or kernel crash can lose the last few transactions; ``FULL``
would fsync each commit and halve the decision rate for that case.

Schema versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` takes any
older file forward in order, each step in its own transaction. A file written
by a newer release is refused rather than guessed at.

Rules are also held in memory (loaded at open, updated after each committed
change) because every ``perm_request`` is matched against them on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from protocol import JSON
from sled_gateway.state import iso

log = logger.bind(actor="gateway-store")

T = TypeVar("T")

MEMORY = ":memory:"
#: Tools whose narrowest key is the file they touch, and the input field naming it.
FILE_TOOLS: dict[str, tuple[str, ...]] = {
    "Read": ("file_path",),
    "Write": ("file_path",),
    "Edit": ("file_path",),
    "MultiEdit": ("file_path",),
    "NotebookEdit": ("notebook_path", "file_path"),
}
ALLOW, DENY = "allow", "deny"
#: Most rows one ``GET /api/audit`` page returns.
MAX_PAGE = 500
#: Most operations in one transaction (a bound on one commit's latency).
_MAX_BATCH = 512
_PURGE_EVERY_S = 3600.0

# Each entry takes the schema from version i to i + 1. Never edit a shipped
# entry: add a new one.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: the audit log.
    (
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            project TEXT NOT NULL,
            session INTEGER,
            req_id TEXT NOT NULL,
            tool_name TEXT NOT NULL,
            tool_input TEXT NOT NULL,
            decision TEXT NOT NULL,
            decided_by TEXT NOT NULL,
            requested_at REAL,
            decided_at REAL NOT NULL
        )""",
        "CREATE INDEX audit_decided_at ON audit (decided_at)",
        "CREATE INDEX audit_project ON audit (project, id)",
    ),
    # 2: a reason on each audit row; rules.
    (
        "ALTER TABLE audit ADD COLUMN reason TEXT",
        """CREATE TABLE rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            project TEXT,
            tool_name TEXT NOT NULL,
            match_key TEXT,
            action TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            origin TEXT,
            reason TEXT,
            revoked_at REAL,
            revoked_by TEXT
        )""",
        "CREATE INDEX rules_revoked_at ON rules (revoked_at)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The database cannot be used (unreadable, locked by another gateway, too new)."""


class UnknownRule(LookupError):
    pass


class RuleRevoked(Exception):
    def __init__(self, rule: Rule) -> None:
        super().__init__(f"rule {rule.id} was already revoked by {rule.revoked_by}")
        self.rule = rule


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/sled-gateway/gateway.db`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sled-gateway" / "gateway.db"


def rule_key(tool_name: str, tool_input: JSON) -> tuple[bool, str | None]:
    """The narrowest key a rule for this use can have: ``(usable, key)``.

    ``Bash`` → the exact command; a file tool → the file's path; any other
    tool → None (the tool alone). ``usable`` is False when the tool needs a
    key and the input has none, so no rule is made that is broader than the
    use the operator saw.
    """
    fields: tuple[str, ...] = ()
    if tool_name == "Bash":
        fields = ("command",)
    elif tool_name in FILE_TOOLS:
        fields = FILE_TOOLS[tool_name]
    else:
        return True, None
    if isinstance(tool_input, dict):
        for name in fields:
            value = tool_input.get(name)
            if isinstance(value, str) and value:
                return True, value
    return False, None


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    project: str | None  # None: every sled
    tool_name: str
    key: str | None  # None: any use of the tool
    action: str  # ALLOW | DENY
    created_at: float
    created_by: str
    origin: str | None = None
    reason: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None

    @property
    def who(self) -> str:
        """The ``by`` of decisions this rule makes."""
        return f"rule:{self.id}"

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "project": self.project,
            "tool_name": self.tool_name,
            "key": self.key,
            "action": self.action,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "origin": self.origin,
            "reason": self.reason,
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
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
        }


_RULE_COLUMNS = (
    "id, project, tool_name, match_key, action, created_at, created_by, "
    "origin, reason, revoked_at, revoked_by"
)
_AUDIT_COLUMNS = (
    "id, project, session, req_id, tool_name, tool_input, decision, decided_by, "
    "reason, requested_at, decided_at"
)


def _rule(row: Sequence[Any]) -> Rule:
    return Rule(*row)


def _entry(row: Sequence[Any]) -> AuditEntry:
    id_, project, session, req_id, tool, tool_input, decision, by, reason, req_at, dec_at = row
    try:
        parsed = json.loads(tool_input)
    except ValueError:
        parsed = tool_input
    return AuditEntry(
        project, session, req_id, tool, parsed, decision, by, reason, req_at, dec_at, id_
    )


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; return the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {found}; this gateway knows versions up to "
            f"{SCHEMA_VERSION} (a newer release wrote it)"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if found < SCHEMA_VERSION and found > 0:
        log.info("migrated {} from schema version {} to {}", path, found, SCHEMA_VERSION)
    return found


_STOP = object()


class Store:
    """The audit log and the rules, behind one store thread."""

    def __init__(
        self, path: str | os.PathLike[str] = MEMORY, *, retention_days: float | None = None
    ):
        self.path = str(path)
        self.retention_days = retention_days
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_file: int | None = None
        # (project or None, tool, key or None) → the active rule; touched on the loop only.
        self._rules: dict[tuple[str | None, str, str | None], dict[str, Rule]] = {}
        self.found_version = 0
        self._purge_due = 0.0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> Store:
        """Open (creating it and its directory), lock, migrate, load rules; :class:`StoreError`."""
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._lock()
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            self._unlock()
            raise StoreError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            self._unlock()
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if self.path != MEMORY:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self.found_version = migrate(conn, self.path)
            rules = [
                _rule(r)
                for r in conn.execute(
                    f"SELECT {_RULE_COLUMNS} FROM rules WHERE revoked_at IS NULL ORDER BY id"
                )
            ]
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._unlock()
            raise StoreError(f"{self.path} is not a usable gateway database: {exc}") from None
        except BaseException:
            conn.close()
            self._unlock()
            raise
        for rule in rules:
            self._cache(rule)
        self._conn = conn
        self._purge_due = 0.0  # purge once at start, then hourly
        self._thread = threading.Thread(target=self._serve, name="gateway-store", daemon=True)
        self._thread.start()
        log.info(
            "store {} open (schema {}, {} active rule(s){})",
            self.path,
            SCHEMA_VERSION,
            len(rules),
            f", audit kept {self.retention_days:g} days" if self.retention_days else "",
        )
        return self

    def _lock(self) -> None:
        # Two gateways on one file would each cache their own rules: refuse the second.
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another gateway process") from None
        self._lock_file = fd

    def _unlock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # closing releases the flock
            self._lock_file = None

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued work, close the file. Idempotent."""
        thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)
            self._thread = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._unlock()

    # -- the store thread ----------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._purge_wait())
            except queue.Empty:
                self._purge()
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
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> None:
        conn = self._conn
        assert conn is not None
        results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                # A savepoint per operation: one failing statement fails only its caller.
                conn.execute("SAVEPOINT op")
                try:
                    value = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((fut, value, None))
            conn.execute("COMMIT")
        except Exception as exc:
            log.opt(exception=exc).error("store transaction of {} operation(s) failed", len(batch))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for _fn, fut in batch:
                fut.set_exception(StoreError(f"the store could not commit: {exc}"))
            return
        for fut, value, error in results:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    def _purge_wait(self) -> float | None:
        if not self.retention_days:
            return None
        return max(0.0, self._purge_due - time.monotonic())

    def _purge(self) -> None:
        self._purge_due = time.monotonic() + _PURGE_EVERY_S
        assert self.retention_days
        cutoff = time.time() - self.retention_days * 86400
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._run_batch(
            [
                (
                    lambda c: (
                        c.execute("DELETE FROM audit WHERE decided_at < ?", (cutoff,)).rowcount
                    ),
                    fut,
                )
            ]
        )
        with contextlib.suppress(Exception):
            removed = fut.result(0)
            if removed:
                log.info(
                    "audit retention: removed {} row(s) older than {:g} days",
                    removed,
                    self.retention_days,
                )

    # -- calling into the store thread -----------------------------------------

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(conn)`` in a transaction on the store thread; its future, once committed."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._thread is None:
            fut.set_exception(StoreError("the store is closed"))
        else:
            self._queue.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    # -- the audit log ---------------------------------------------------------

    @staticmethod
    def _insert(conn: sqlite3.Connection, e: AuditEntry) -> int:
        cur = conn.execute(
            "INSERT INTO audit (project, session, req_id, tool_name, tool_input, decision, "
            "decided_by, reason, requested_at, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e.project,
                e.session,
                e.req_id,
                e.tool_name,
                json.dumps(e.tool_input, ensure_ascii=False),
                e.decision,
                e.by,
                e.reason,
                e.requested_at,
                e.decided_at,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def record(
        self, entry: AuditEntry, new_rule: Rule | None = None
    ) -> tuple[int, Rule | None]:
        """Commit an audit row (and the rule an always_allow makes) in one transaction.

        ``new_rule``'s id is ignored; the committed rule (or an identical active
        one, reused) comes back and is active from then on.
        """

        def write(conn: sqlite3.Connection) -> tuple[int, Rule | None]:
            rule = self._insert_rule(conn, new_rule) if new_rule is not None else None
            return self._insert(conn, entry), rule

        row_id, rule = await self.run(write)
        if rule is not None:
            self._cache(rule)
        return row_id, rule

    def record_later(self, entry: AuditEntry) -> concurrent.futures.Future[int]:
        """Queue an audit row without waiting (for paths that send the sled nothing)."""
        fut = self.submit(lambda conn: self._insert(conn, entry))

        def report(f: concurrent.futures.Future[int]) -> None:
            if f.exception() is not None:
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
    ) -> list[AuditEntry]:
        """Rows newest first; ``before`` is an id (the page after the one ending there)."""
        where: list[str] = []
        args: list[Any] = []
        if project is not None:
            where.append("project = ?")
            args.append(project)
        if since is not None:
            where.append("decided_at >= ?")
            args.append(since)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        if decision is not None:
            where.append("decision = ?")
            args.append(decision)
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(limit, MAX_PAGE)))
        rows = await self.run(lambda conn: conn.execute(sql, args).fetchall())
        return [_entry(r) for r in rows]

    # -- rules -------------------------------------------------------------------

    def _cache(self, rule: Rule) -> None:
        self._rules.setdefault((rule.project, rule.tool_name, rule.key), {})[rule.action] = rule

    def _uncache(self, rule: Rule) -> None:
        slot = self._rules.get((rule.project, rule.tool_name, rule.key))
        if slot is not None and slot.get(rule.action, rule).id == rule.id:
            slot.pop(rule.action, None)
            if not slot:
                del self._rules[(rule.project, rule.tool_name, rule.key)]

    def match(self, project: str, tool_name: str, tool_input: JSON) -> Rule | None:
        """The active rule that answers this request, if any (a deny beats an allow).

        Looked up from the narrowest to the broadest: this sled's exact key,
        this sled's whole tool, then the same for rules made for every sled.
        """
        usable, key = rule_key(tool_name, tool_input)
        keys = ([key] if usable and key is not None else []) + [None]
        found: Rule | None = None
        for scope in (project, None):
            for k in keys:
                slot = self._rules.get((scope, tool_name, k))
                if not slot:
                    continue
                if DENY in slot:
                    return slot[DENY]
                found = found or slot.get(ALLOW)
        return found

    def active_rules(self) -> list[Rule]:
        return sorted(
            (r for slot in self._rules.values() for r in slot.values()), key=lambda r: r.id
        )

    @staticmethod
    def _insert_rule(conn: sqlite3.Connection, rule: Rule) -> Rule:
        same = conn.execute(
            f"SELECT {_RULE_COLUMNS} FROM rules WHERE revoked_at IS NULL AND action = ? "
            "AND tool_name = ? AND project IS ? AND match_key IS ?",
            (rule.action, rule.tool_name, rule.project, rule.key),
        ).fetchone()
        if same is not None:
            return _rule(same)
        cur = conn.execute(
            "INSERT INTO rules (project, tool_name, match_key, action, created_at, created_by, "
            "origin, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rule.project,
                rule.tool_name,
                rule.key,
                rule.action,
                rule.created_at,
                rule.created_by,
                rule.origin,
                rule.reason,
            ),
        )
        assert cur.lastrowid is not None
        return replace(rule, id=cur.lastrowid)

    async def add_rule(self, rule: Rule) -> Rule:
        """Commit ``rule`` (its id is ignored); an identical active rule is returned instead."""
        committed = await self.run(lambda conn: self._insert_rule(conn, rule))
        self._cache(committed)
        return committed

    async def revoke_rule(self, rule_id: int, by: str) -> Rule:
        """Revoke a rule (the row stays, with who and when); UnknownRule / RuleRevoked."""

        def revoke(conn: sqlite3.Connection) -> Rule:
            row = conn.execute(
                f"SELECT {_RULE_COLUMNS} FROM rules WHERE id = ?", (rule_id,)
            ).fetchone()
            if row is None:
                raise UnknownRule(f"no rule {rule_id}")
            rule = _rule(row)
            if rule.revoked_at is not None:
                raise RuleRevoked(rule)
            now = time.time()
            conn.execute(
                "UPDATE rules SET revoked_at = ?, revoked_by = ? WHERE id = ?", (now, by, rule_id)
            )
            return replace(rule, revoked_at=now, revoked_by=by)

        revoked = await self.run(revoke)
        self._uncache(revoked)
        return revoked

    async def rules(self, *, include_revoked: bool = False) -> list[Rule]:
        sql = f"SELECT {_RULE_COLUMNS} FROM rules"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        sql += " ORDER BY id DESC"
        rows = await self.run(lambda conn: conn.execute(sql).fetchall())
        return [_rule(r) for r in rows]
