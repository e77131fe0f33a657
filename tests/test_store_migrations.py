"""The store's schema: Alembic revisions, files from earlier releases, files it must refuse.

``tests/fixtures/gateway-0.2.0.sqlite3`` was written by the 0.2.0 store
itself (see ``tests/fixtures/README.md``); each test works on a copy. The
tests at the end run on SQLite and on a real PostgreSQL (``tests/pg.py``).
"""

from __future__ import annotations

import concurrent.futures
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from sled_gateway.store import StoreError, make_store, migrations
from sled_gateway.store.sql import METADATA, SCHEMA_VERSION
from tests.pg import PostgresServer

pytestmark = pytest.mark.timeout(60)

FIXTURE = Path(__file__).parent / "fixtures" / "gateway-0.2.0.sqlite3"


def raw(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def schema_drift(db: Path) -> list[Any]:
    """What differs between the tables in ``db`` and the ones the store declares.

    0.2.0 declared its ``INTEGER PRIMARY KEY`` ids without ``NOT NULL``; they are
    SQLite's rowid, never NULL either way, so that difference does not count.
    """
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), METADATA)
    finally:
        engine.dispose()
    flat = [d for group in diffs for d in (group if isinstance(group, list) else [group])]
    return [d for d in flat if not (d[0] == "modify_nullable" and d[3] == "id")]


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    copy = tmp_path / "gateway.db"
    shutil.copy(FIXTURE, copy)
    return copy


def test_schema_version_is_the_newest_revision() -> None:
    assert int(migrations.head()) == SCHEMA_VERSION
    assert all(len(r) == 4 and r.isdigit() for r in migrations.known_revisions())


def test_a_0_2_0_file_is_taken_forward_with_every_row_and_rule(old_file: Path) -> None:
    audit_before = raw(old_file, "SELECT * FROM audit ORDER BY id")
    rules_before = raw(old_file, "SELECT * FROM rules ORDER BY id")
    assert len(audit_before) == 6
    assert len(rules_before) == 3
    assert raw(old_file, "PRAGMA user_version") == [(2,)]

    store = make_store(old_file).open()
    try:
        assert store.found_version == 2
        assert len(store.policy) == 2  # the revoked rule does not match

        async def read() -> tuple[list[Any], list[Any]]:
            return await store.audit(), await store.rules(include_revoked=True)

        import asyncio

        rows, rules = asyncio.run(read())
    finally:
        store.close()

    assert [(e.id, e.req_id, e.decision, e.by) for e in rows] == [
        (6, "a-4", "always_allow", "rule:1"),
        (5, "a-3", "always_allow", "console"),
        (4, "b-2", "withdrawn", "sled_disconnected"),
        (3, "b-1", "deny", "invalid"),
        (2, "a-2", "deny", "api"),
        (1, "a-1", "approve", "console"),
    ]
    by_id = {e.id: e for e in rows}
    assert by_id[2].tool_input == {"file_path": "/src/é.py", "old_string": "x"}
    assert by_id[2].reason == "not that file"
    assert by_id[3].tool_input == "not an object"
    assert by_id[3].session is None
    assert by_id[1].to_json()["decided_at"] == "2026-01-01T00:00:01.250+00:00"
    assert [(r.id, r.project, r.key, r.action, r.revoked_by) for r in rules] == [
        (3, "beta", None, "allow", "matrix:@op:example.org"),
        (2, None, "rm -rf /", "deny", None),
        (1, "alpha", "pytest -q", "allow", None),
    ]
    assert rules[2].origin == "always_allow of request a-3"
    # Byte for byte the same rows (a rule gains only an empty grammar ``rule``),
    # now under Alembic at the newest version.
    # Every row kept as it was; who and channel were not recorded then.
    assert [row[:11] for row in raw(old_file, "SELECT * FROM audit ORDER BY id")] == audit_before
    assert {row[11:] for row in raw(old_file, "SELECT * FROM audit")} == {(None, None)}
    assert raw(old_file, "SELECT * FROM rules ORDER BY id") == [(*r, None) for r in rules_before]
    assert all(r.rule is None for r in rules)
    assert raw(old_file, "SELECT version_num FROM alembic_version") == [(migrations.head(),)]
    assert raw(old_file, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert schema_drift(old_file) == []


def test_a_second_open_changes_nothing(old_file: Path) -> None:
    make_store(old_file).open().close()
    layout = raw(old_file, "PRAGMA schema_version")  # SQLite counts every schema change
    tables = raw(old_file, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    store = make_store(old_file).open()
    store.close()
    assert store.found_version == SCHEMA_VERSION
    assert raw(old_file, "PRAGMA schema_version") == layout
    assert raw(old_file, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == tables
    assert len(raw(old_file, "SELECT * FROM audit")) == 6


def test_a_new_file_gets_the_declared_schema(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    store = make_store(db).open()
    store.close()
    assert store.found_version == 0
    assert schema_drift(db) == []
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    # Same tables, columns and indexes as 0.2.0 made, and the grammar rule's text.
    for table in ("audit", "rules"):
        columns = f"SELECT name, type, pk FROM pragma_table_info('{table}') ORDER BY cid"
        indexes = f"SELECT name FROM pragma_index_list('{table}') ORDER BY name"
        added = (
            [("rule", "TEXT", 0)]
            if table == "rules"
            else [("who", "TEXT", 0), ("channel", "TEXT", 0)]
        )
        assert sorted(raw(db, columns)) == sorted(raw(FIXTURE, columns) + added)
        new_indexes = [] if table == "rules" else [("audit_who",)]
        assert sorted(raw(db, indexes)) == sorted(raw(FIXTURE, indexes) + new_indexes)


def test_the_revisions_build_what_a_new_database_gets(tmp_path: Path) -> None:
    # A new database is made from the declared tables and stamped, without
    # Alembic; the revisions, run from nothing, must build the very same.
    stepwise, direct = tmp_path / "stepwise.db", tmp_path / "direct.db"
    engine = create_engine(f"sqlite:///{stepwise}")
    try:
        with engine.begin() as conn:
            migrations.upgrade(conn)
    finally:
        engine.dispose()
    make_store(direct).open().close()
    layout = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert raw(stepwise, layout) == raw(direct, layout)
    assert raw(direct, "SELECT version_num FROM alembic_version") == [(migrations.head(),)]
    assert schema_drift(stepwise) == []


def test_a_file_from_a_newer_release_is_refused_untouched(old_file: Path) -> None:
    make_store(old_file).open().close()
    conn = sqlite3.connect(old_file)
    with conn:
        conn.execute("UPDATE alembic_version SET version_num = '0009'")
    conn.close()
    with pytest.raises(
        StoreError, match=rf"schema version 9; .* up to {SCHEMA_VERSION} \(a newer release"
    ):
        make_store(old_file).open()
    assert raw(old_file, "SELECT version_num FROM alembic_version") == [("0009",)]
    # The lock is released: the file can be opened again once it is fixed.
    conn = sqlite3.connect(old_file)
    with conn:
        conn.execute(f"UPDATE alembic_version SET version_num = '{SCHEMA_VERSION:04d}'")
    conn.close()
    make_store(old_file).open().close()


def test_another_projects_alembic_database_is_refused(old_file: Path) -> None:
    conn = sqlite3.connect(old_file)
    with conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('ae1027a6acf')")
    conn.close()
    with pytest.raises(StoreError, match="not a gateway database"):
        make_store(old_file).open()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not SQLite at all\n" * 200)
    with pytest.raises(StoreError, match="not a usable gateway database"):
        make_store(junk).open()
    assert junk.read_bytes() == b"this is not SQLite at all\n" * 200


def test_a_second_store_on_one_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "one.db"
    first = make_store(db).open()
    try:
        with pytest.raises(StoreError, match="is in use by another gateway process"):
            make_store(db).open()
    finally:
        first.close()
    make_store(db).open().close()


def _rules_of(db: Path) -> list[Any]:
    import asyncio

    store = make_store(db).open()
    try:
        return asyncio.run(store.rules(include_revoked=True))
    finally:
        store.close()


def test_0002_to_0003_keeps_exact_rules_and_takes_grammar_rules_and_ask(old_file: Path) -> None:
    """The 0.2.0 rules keep their ids, keys and meaning; the next id continues after them;
    a grammar rule with ``ask`` is accepted by the new CHECK, a bad action still is not."""
    import asyncio

    from sled_gateway.store import Rule

    before = [(r.id, r.project, r.tool_name, r.key, r.action) for r in _rules_of(old_file)]
    assert before == [
        (3, "beta", "Read", None, "allow"),
        (2, None, "Bash", "rm -rf /", "deny"),
        (1, "alpha", "Bash", "pytest -q", "allow"),
    ]
    store = make_store(old_file).open()
    try:
        made = asyncio.run(
            store.add_rule(Rule(0, "alpha", "Bash", None, "ask", 1.0, "t", rule="Bash(git push:*)"))
        )
        assert made.id == 4 and made.rule == "Bash(git push:*)" and made.action == "ask"
        # An exact rule still matches as it did (the grammar rule is not "any use of Bash").
        found = store.policy.match("alpha", "Bash", {"command": "pytest -q"})
        assert found is not None and found.id == 1
    finally:
        store.close()
    conn = sqlite3.connect(old_file)
    with pytest.raises(sqlite3.IntegrityError, match="rules_action"), conn:
        conn.execute(
            "INSERT INTO rules (project, tool_name, action, created_at, created_by) "
            "VALUES (NULL, 'Bash', 'maybe', 0, 'x')"
        )
    conn.close()
    assert [r.id for r in _rules_of(old_file)] == [4, 3, 2, 1]


def test_a_head_database_opens_again_with_its_grammar_rules(tmp_path: Path) -> None:
    import asyncio

    from sled_gateway.store import Rule

    db = tmp_path / "head.db"
    store = make_store(db).open()
    try:
        asyncio.run(
            store.add_rules(
                [
                    Rule(0, None, "Bash", None, "deny", 1.0, "t", rule="Bash(rm:*)"),
                    Rule(0, "p", "Bash", "input:{}", "allow", 1.0, "t"),
                ]
            )
        )
    finally:
        store.close()
    again = make_store(db).open()
    again.close()
    assert again.found_version == SCHEMA_VERSION
    # Loaded back into the policy as grammar rules, matched as shell.
    denied = again.policy.match("p", "Bash", {"command": "ls && rm -rf /"})
    assert denied is not None and denied.rule == "Bash(rm:*)"
    assert again.policy.match("p", "Bash", {"command": "ls"}) is None
    assert [(r.rule, r.action) for r in _rules_of(db)] == [(None, "allow"), ("Bash(rm:*)", "deny")]


# -- on every engine ------------------------------------------------------------------------
# The tests above read SQLite's own catalogue; these ask SQLAlchemy's inspector,
# so they run on SQLite and on a real PostgreSQL (tests/pg.py) alike.


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """``new_database()`` → the URL of another empty database on this test's engine."""
    made: list[str] = []

    def make() -> str:
        if request.param == "sqlite":
            made.append(f"db{len(made)}.sqlite3")
            return f"sqlite:///{tmp_path / made[-1]}"
        server: PostgresServer = request.getfixturevalue("postgres")
        made.append(server.create_database())
        return server.url(made[-1])

    yield make
    if request.param == "postgresql":
        for name in made:
            request.getfixturevalue("postgres").drop_database(name)


def _engine_for(url: str) -> Engine:
    return create_engine(make_store(url).url)  # the store's own driver for the URL


def _drift(url: str) -> list[Any]:
    engine = _engine_for(url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), METADATA)
    finally:
        engine.dispose()
    return [d for group in diffs for d in (group if isinstance(group, list) else [group])]


def _layout(url: str) -> dict[str, Any]:
    """Every table's columns (name, type, nullable), indexes, CHECKs and primary key."""
    engine = _engine_for(url)
    try:
        with engine.connect() as conn:
            seen = inspect(conn)
            return {
                table: (
                    [(c["name"], str(c["type"]), c["nullable"]) for c in seen.get_columns(table)],
                    sorted(
                        (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                        for i in seen.get_indexes(table)
                    ),
                    sorted((c["name"], c["sqltext"]) for c in seen.get_check_constraints(table)),
                    seen.get_pk_constraint(table)["constrained_columns"],
                )
                for table in sorted(seen.get_table_names())
            }
    finally:
        engine.dispose()


def _upgrade(url: str, revision: str) -> None:
    from alembic import command

    engine = _engine_for(url)
    try:
        with engine.begin() as conn:
            command.upgrade(migrations.config(conn), revision)
    finally:
        engine.dispose()


def test_the_revisions_build_what_a_new_database_gets_on_every_engine(
    new_database: Callable[[], str],
) -> None:
    stepwise, direct = new_database(), new_database()
    _upgrade(stepwise, "head")
    make_store(direct).open().close()
    assert _layout(stepwise) == _layout(direct)
    assert _drift(stepwise) == []
    assert _drift(direct) == []


def test_a_0002_database_is_migrated_with_its_rows_and_rules_on_every_engine(
    new_database: Callable[[], str],
) -> None:
    import asyncio

    from sled_gateway.store import Rule

    url = new_database()
    _upgrade(url, "0002")
    engine = _engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit (project, session, req_id, tool_name, tool_input, "
                    "decision, decided_by, requested_at, decided_at) "
                    "VALUES ('p', 1, 'old-1', 'Bash', '{}', 'approve', 'console', 1.0, 2.0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO rules (project, tool_name, match_key, action, created_at, "
                    "created_by) VALUES ('p', 'Bash', 'make', 'allow', 1.0, 'console')"
                )
            )
    finally:
        engine.dispose()
    store = make_store(url).open()
    try:
        assert store.found_version == 2
        made = asyncio.run(
            store.add_rule(Rule(0, "p", "Bash", None, "ask", 1.0, "t", rule="Bash(git push:*)"))
        )
        rows = asyncio.run(store.audit())
    finally:
        store.close()
    assert made.id == 2 and made.action == "ask"
    assert [(r.req_id, r.decision, r.who) for r in rows] == [("old-1", "approve", None)]
    assert _drift(url) == []
    engine = _engine_for(url)
    try:
        with pytest.raises(IntegrityError, match="rules_action"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO rules (project, tool_name, action, created_at, created_by) "
                    "VALUES (NULL, 'Bash', 'maybe', 0, 'x')"
                )
            )
    finally:
        engine.dispose()


def test_a_login_in_flight_when_0007_is_applied_still_ends_on_every_engine(
    new_database: Callable[[], str],
) -> None:
    """A person halfway through a sign-in while the gateway upgrades can finish it: the
    login's row keeps its state, and counts toward no client's share (it names none)."""
    import asyncio
    import time

    url = new_database()
    _upgrade(url, "0006")
    expires = time.time() + 600
    engine = _engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO oidc_logins (key, value, created_at, expires_at) "
                    "VALUES ('_state_sled_abc', '{\"data\": 1}', :now, :expires)"
                ),
                {"now": expires - 600, "expires": expires},
            )
    finally:
        engine.dispose()
    store = make_store(url).open()
    try:
        assert store.found_version == 6
        assert asyncio.run(store.login_state("_state_sled_abc")) == '{"data": 1}'
        asyncio.run(store.set_login_state("k", "v", 60, limit=5, client="10.0.0.1", per_client=1))
    finally:
        store.close()
    assert _drift(url) == []


def test_a_database_from_a_newer_release_or_another_project_is_refused_on_every_engine(
    new_database: Callable[[], str],
) -> None:
    newer, other = new_database(), new_database()
    make_store(newer).open().close()
    for url, version in ((newer, "0009"), (other, "ae1027a6acf")):
        engine = _engine_for(url)
        try:
            with engine.begin() as conn:
                if url == other:
                    conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
                    conn.execute(text(f"INSERT INTO alembic_version VALUES ('{version}')"))
                else:
                    conn.execute(text(f"UPDATE alembic_version SET version_num = '{version}'"))
        finally:
            engine.dispose()
    with pytest.raises(StoreError, match=r"schema version 9; .*a newer release"):
        make_store(newer).open()
    with pytest.raises(StoreError, match="not a gateway database"):
        make_store(other).open()


def test_replicas_opening_a_new_postgresql_database_together_make_it_once(
    postgres: PostgresServer, pg_url: str
) -> None:
    """Two gateways started at once on one empty database: one creates the tables,
    the other waits for its migration lock, then finds them."""
    barrier = threading.Barrier(4)

    def open_one(_: int) -> int:
        barrier.wait()
        store = make_store(pg_url).open()
        store.close()
        return store.found_version

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = sorted(pool.map(open_one, range(4)))
    assert found == [0, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION]
    assert _drift(pg_url) == []
