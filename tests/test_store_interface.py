"""The store interface, run against every engine the same way.

Each test takes ``engine``, a way to make stores on one database: a SQLite
file, SQLite in memory, and PostgreSQL (a real server, ``tests/pg.py``, an
empty database per test; skipped with its reason when PostgreSQL 15 is not
installed). Tests that restart the store run only where data survives a close.

Nothing is mocked: the stores are the real implementation on real databases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text

from sled_gateway.store import (
    ALLOW,
    DENY,
    MAX_PAGE,
    MEMORY,
    AlreadyRecorded,
    AuditEntry,
    Rule,
    RuleRevoked,
    SessionEnded,
    Store,
    StoreError,
    UnknownRule,
    make_store,
)
from sled_gateway.store.fleet import (
    DECIDED,
    PENDING,
    UNDELIVERED,
    WITHDRAWN,
    StateChanged,
)

pytestmark = pytest.mark.timeout(60)

R = TypeVar("R")
T0 = 1767225600.0  # 2026-01-01T00:00:00Z


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


@dataclass
class Engine:
    """Makes stores on one database; closes them all at the end of the test."""

    location: str
    persistent: bool
    opened: list[Store] = field(default_factory=list)

    def open(self, *, retention_days: float | None = None) -> Store:
        store = make_store(self.location, retention_days=retention_days).open()
        self.opened.append(store)
        return store


def _sqlite_file(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine(str(tmp_path / "store.db"), persistent=True)


def _sqlite_memory(request: pytest.FixtureRequest, _tmp_path: Path) -> Engine:
    return Engine(MEMORY, persistent=False)


def _postgresql(request: pytest.FixtureRequest, _tmp_path: Path) -> Engine:
    # tests/pg.py: the session's server, an empty database of this test's own.
    return Engine(request.getfixturevalue("pg_url"), persistent=True)


ENGINES: dict[str, Callable[[pytest.FixtureRequest, Path], Engine]] = {
    "sqlite-file": _sqlite_file,
    "sqlite-memory": _sqlite_memory,
    "postgresql": _postgresql,
}
#: The engines whose data outlives a close of the store.
LASTING = ("postgresql", "sqlite-file")


def _engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    made = ENGINES[request.param](request, tmp_path)
    yield made
    for store in made.opened:
        store.close()


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(request, tmp_path)


# What is closed and opened again: only the engines that keep data across a close.
@pytest.fixture(params=LASTING)
def lasting_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(request, tmp_path)


def entry(i: int, project: str = "p", decision: str = "approve", at: float = T0) -> AuditEntry:
    return AuditEntry(
        project, i, f"{project}-{i}", "Bash", {"command": f"echo {i}"}, decision, "console",
        None, at, at + 0.5,
    )  # fmt: skip


def rule(action: str = ALLOW, project: str | None = "p", key: str | None = "make") -> Rule:
    return Rule(0, project, "Bash", key, action, T0, "console", "operator", None)


# -- the audit log ---------------------------------------------------------------------------


def test_a_recorded_row_reads_back_as_written(engine: Engine) -> None:
    store = engine.open()
    odd = AuditEntry(
        "p", None, "r-2", "Read", "not an object", "deny", "invalid", "why ✓", None, T0 + 1
    )

    async def scenario() -> None:
        first = await store.record(entry(1))
        second = await store.record(odd)
        assert first.rule is None
        assert second.id > first.id
        rows = await store.audit()
        assert rows == [replace(odd, id=second.id), replace(entry(1), id=first.id)]
        assert rows[1].to_json()["tool_input"] == {"command": "echo 1"}

    run(scenario())


def test_audit_filters_and_pages_newest_first(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        for i in range(30):
            project = "a" if i % 3 else "b"
            decision = "deny" if i % 5 == 0 else "approve"
            await store.record(entry(i, project, decision, at=T0 + i))
        everything = await store.audit(limit=MAX_PAGE)
        assert [e.req_id for e in everything] == [
            f"{'a' if i % 3 else 'b'}-{i}" for i in reversed(range(30))
        ]
        ids = [e.id for e in everything]
        assert ids == sorted(ids, reverse=True)

        pages: list[int | None] = []
        before = None
        while True:
            page = await store.audit(limit=7, before=before)
            pages += [e.id for e in page]
            if len(page) < 7:
                break
            before = page[-1].id
        assert pages == ids

        only_b = await store.audit(project="b", limit=MAX_PAGE)
        assert {e.project for e in only_b} == {"b"}
        assert len(only_b) == 10
        denies = await store.audit(decision="deny")
        assert [e.req_id for e in denies] == [
            f"{'a' if i % 3 else 'b'}-{i}" for i in (25, 20, 15, 10, 5, 0)
        ]
        recent = await store.audit(since=T0 + 20.5)
        assert [e.req_id for e in recent][-1] == "a-20"  # decided at T0 + 20.5
        assert len(recent) == 10
        both = await store.audit(project="a", decision="deny", since=T0 + 10)
        assert [e.req_id for e in both] == ["a-25", "a-20", "a-10"]
        assert len(await store.audit(limit=0)) == 1  # at least one row
        assert len(await store.audit(limit=10**6)) == 30  # at most MAX_PAGE

    run(scenario())


def test_a_row_queued_without_waiting_is_committed(engine: Engine) -> None:
    store = engine.open()
    future = store.record_later(entry(1))
    row_id = future.result(10)

    async def scenario() -> None:
        (row,) = await store.audit()
        assert row.id == row_id
        assert row.req_id == "p-1"

    run(scenario())


def test_a_burst_of_writes_is_committed_in_few_transactions(engine: Engine) -> None:
    store = engine.open()
    commits = getattr(store, "commits", None)
    if commits is None:
        pytest.skip("this store does not count its transactions")

    futures = [store.record_later(entry(i)) for i in range(2000)]
    assert len({f.result(30) for f in futures}) == 2000
    queued = store.commits - commits

    async def concurrent_decisions() -> int:
        before = store.commits
        done = await asyncio.gather(*(store.record(entry(i, "q")) for i in range(500)))
        assert len({r.id for r in done}) == 500
        return int(store.commits) - before

    awaited = run(concurrent_decisions())
    # One commit each would be 2,000 and 500; a batch holds up to 512 operations.
    assert 4 <= queued <= 200, queued
    assert 1 <= awaited <= 50, awaited

    async def count() -> int:
        return len(await store.audit(limit=MAX_PAGE, project="q"))

    assert run(count()) == 500


def test_one_failing_operation_fails_only_itself_in_a_batch(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        results = await asyncio.gather(
            store.record(entry(1)),
            store.revoke_rule(424242, "console"),
            store.record(entry(2)),
            return_exceptions=True,
        )
        assert isinstance(results[1], UnknownRule)
        assert [e.req_id for e in await store.audit()] == ["p-2", "p-1"]

    run(scenario())


def test_a_row_the_database_refuses_fails_alone_and_says_little(engine: Engine) -> None:
    store = engine.open()
    secret = {"command": "export TOKEN=s3cret"}
    refused = replace(entry(2), project=None, tool_input=secret)  # NOT NULL

    async def scenario() -> None:
        with pytest.raises(StoreError) as alone:
            await store.record(refused)
        assert "s3cret" not in str(alone.value)  # no statement parameters in the error
        # In a batch: only the refused row fails, the rows around it are committed.
        futures = [store.record_later(entry(i)) for i in (1, 3)]
        futures.insert(1, store.record_later(refused))
        futures.append(store.record_later(entry(4)))
        for i, future in enumerate(futures):
            if i == 1:
                with pytest.raises(StoreError):
                    await asyncio.wrap_future(future)
            else:
                assert await asyncio.wrap_future(future) > 0
        assert [e.req_id for e in await store.audit()] == ["p-4", "p-3", "p-1"]

    run(scenario())


def test_a_closed_store_refuses_writes(engine: Engine) -> None:
    store = engine.open()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.record_later(entry(1)).result(1)

    async def scenario() -> None:
        with pytest.raises(StoreError, match="closed"):
            await store.record(entry(2))

    run(scenario())


# -- rules ---------------------------------------------------------------------------------


def test_rules_are_added_reused_listed_and_revoked_once(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        allow = await store.add_rule(rule(ALLOW))
        assert allow.id > 0
        assert (await store.add_rule(rule(ALLOW))).id == allow.id  # identical: reused
        deny_all = await store.add_rule(rule(DENY, project=None, key=None))
        assert deny_all.id != allow.id
        assert [r.id for r in await store.rules()] == [deny_all.id, allow.id]
        assert store.policy.match("p", "Bash", {"command": "make"}) == deny_all
        assert store.policy.match("other", "Bash", {"command": "ls"}) == deny_all

        revoked = await store.revoke_rule(deny_all.id, "api")
        assert revoked.revoked_by == "api"
        assert revoked.revoked_at is not None
        assert revoked.to_json()["active"] is False
        with pytest.raises(RuleRevoked) as again:
            await store.revoke_rule(deny_all.id, "console")
        assert again.value.rule.revoked_by == "api"  # the first revocation stands
        with pytest.raises(UnknownRule):
            await store.revoke_rule(deny_all.id + 100, "console")

        assert [r.id for r in await store.rules()] == [allow.id]
        listed = await store.rules(include_revoked=True)
        assert [(r.id, r.revoked_by) for r in listed] == [(deny_all.id, "api"), (allow.id, None)]
        assert store.policy.match("p", "Bash", {"command": "make"}) == allow
        assert store.policy.match("other", "Bash", {"command": "ls"}) is None
        # A revoked rule does not count as identical: adding it again makes a new one.
        fresh = await store.add_rule(rule(DENY, project=None, key=None))
        assert fresh.id not in (allow.id, deny_all.id)

    run(scenario())


def test_a_decision_and_the_rule_it_makes_commit_together(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        made = await store.record(entry(1, decision="always_allow"), rule(ALLOW))
        assert made.rule is not None
        assert made.rule.id > 0
        assert store.policy.match("p", "Bash", {"command": "make"}) == made.rule
        again = await store.record(entry(2, decision="always_allow"), rule(ALLOW))
        assert again.rule == made.rule  # the same rule, not a second one
        assert [r.id for r in await store.rules()] == [made.rule.id]
        assert [e.req_id for e in await store.audit()] == ["p-2", "p-1"]

    run(scenario())


# -- restarts, retention, durability ----------------------------------------------------------


def test_a_restart_keeps_rows_rules_and_revocations(lasting_engine: Engine) -> None:
    engine = lasting_engine
    store = engine.open()

    async def write() -> tuple[list[AuditEntry], list[Rule]]:
        await store.record(entry(1))
        await store.record(entry(2, decision="always_allow"), rule(ALLOW))
        gone = await store.add_rule(rule(DENY, key="rm -rf /"))
        await store.revoke_rule(gone.id, "console")
        return await store.audit(), await store.rules(include_revoked=True)

    rows, rules = run(write())
    store.close()
    reopened = engine.open()

    async def read() -> None:
        assert await reopened.audit() == rows
        assert await reopened.rules(include_revoked=True) == rules
        assert reopened.policy.match("p", "Bash", {"command": "make"}) == rules[1]
        assert reopened.policy.match("p", "Bash", {"command": "rm -rf /"}) is None  # revoked
        assert len(reopened.policy) == 1
        assert (await reopened.record(entry(3))).id > max(r.id or 0 for r in rows)

    run(read())


def test_retention_purges_old_rows_and_keeps_rules(lasting_engine: Engine) -> None:
    engine = lasting_engine
    store = engine.open()
    now = time.time()

    async def write() -> None:
        for i in range(5):
            await store.record(entry(i, "old", at=now - 40 * 86400))
        await store.record(entry(9, "new", at=now - 60))
        await store.add_rule(rule())

    run(write())
    store.close()
    kept = engine.open(retention_days=3650)

    async def count(s: Store) -> int:
        return len(await s.audit())

    assert run(count(kept)) == 6
    kept.close()
    month = engine.open(retention_days=30)
    deadline = time.monotonic() + 10
    while run(count(month)) != 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # the purge runs on the writer thread as it starts

    async def check() -> None:
        assert [e.req_id for e in await month.audit()] == ["new-9"]
        assert len(await month.rules()) == 1

    run(check())


def test_a_recorded_row_is_visible_to_another_connection_at_once(lasting_engine: Engine) -> None:
    engine = lasting_engine
    store = engine.open()
    url = store.url if hasattr(store, "url") else None
    if url is None:
        pytest.skip("this store does not say where its database is")
    row_id = run(store.record(entry(1))).id
    reader = create_engine(url)
    try:
        with reader.connect() as conn:
            found = conn.execute(
                text("SELECT req_id FROM audit WHERE id = :id"), {"id": row_id}
            ).scalar_one()
    finally:
        reader.dispose()
    assert found == "p-1"


def test_record_later_futures_are_concurrent_futures(engine: Engine) -> None:
    store = engine.open()
    future = store.record_later(entry(1))
    assert isinstance(future, concurrent.futures.Future)
    assert isinstance(future.result(10), int)


def test_a_request_is_recorded_once_of_two_concurrent_deciders(engine: Engine) -> None:
    store = engine.open()
    approve, deny = entry(1), replace(entry(1), decision="deny", by="matrix:@b:x")
    later = replace(entry(1), requested_at=T0 + 60, decided_at=T0 + 61)  # the id used again

    async def scenario() -> None:
        results = await asyncio.gather(
            store.record(approve, once=True),
            store.record(deny, once=True),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, AlreadyRecorded)]
        assert len(refused) == 1, results
        winner = approve if results[1] is refused[0] else deny
        assert refused[0].entry is not None and refused[0].entry.decision == winner.decision
        rows = await store.audit()
        assert [(e.req_id, e.decision) for e in rows] == [("p-1", winner.decision)]
        # A later request under the same id is another request; without once, no check.
        await store.record(later, once=True)
        await store.record(approve)
        assert len(await store.audit()) == 3

    run(scenario())


# -- what replicas share: pending requests, sleds, leases ----------------------------------------


async def _pend(store: Any, req_id: str, at: float = T0, replica: str = "A") -> None:
    await store.add_pending(
        "p", req_id, at, replica=replica, session=1, tool_name="Bash",
        tool_input={"command": req_id}, needs=1, offer={"suggested_rules": [["Bash(ls)", "exact"]]},
    )  # fmt: skip


def decision(req_id: str, value: str, at: float = T0, by: str = "console") -> AuditEntry:
    return AuditEntry(
        "p", 1, req_id, "Bash", {"command": req_id}, value, by, None, at, at + 1
    )  # fmt: skip


def test_a_pending_request_is_decided_once_then_delivered(engine: Engine) -> None:
    store: Any = engine.open()

    async def scenario() -> None:
        await _pend(store, "r1")
        _sleds, pending = await store.fleet()
        assert [(r.req_id, r.state, r.offer["suggested_rules"]) for r in pending] == [
            ("r1", PENDING, [["Bash(ls)", "exact"]])
        ]
        results = await asyncio.gather(
            store.decide_pending(decision("r1", "approve")),
            store.decide_pending(decision("r1", "deny", by="matrix:@b:x")),
            store.end_pending(
                decision("r1", WITHDRAWN, by="sled_disconnected"), PENDING, WITHDRAWN
            ),
            return_exceptions=True,
        )
        lost = [r for r in results if isinstance(r, StateChanged)]
        assert len(lost) == 2, results
        assert all(x.row is not None and x.row.state == DECIDED for x in lost)
        row = await store.pending_row("p", "r1")
        assert (row.state, row.decision) in {(DECIDED, "approve"), (DECIDED, "deny")}
        assert [(e.req_id, e.decision) for e in await store.audit()] == [("r1", row.decision)]
        assert [r.req_id for r in await store.decided_for("A")] == ["r1"]
        assert await store.decided_for("B") == []
        assert await store.delivered("p", "r1", T0) is True
        assert await store.delivered("p", "r1", T0) is False  # once
        assert (await store.fleet())[1] == []
        # A finished request gives way to a new one under its id; a pending one does not.
        await _pend(store, "r1", T0 + 60)
        with pytest.raises(StoreError):
            await _pend(store, "r1", T0 + 120)
        with pytest.raises(StateChanged) as other:  # a decision of the old one
            await store.decide_pending(decision("r1", "approve", at=T0))
        assert other.value.row is not None and other.value.row.requested_at == T0 + 60

    run(scenario())


def test_a_dead_replicas_requests_and_sleds_are_released(engine: Engine) -> None:
    store: Any = engine.open()

    async def scenario() -> None:
        await store.renew_lease("A", T0, T0 + 10)
        await store.renew_lease("B", T0, T0 + 30)
        await store.hold_sled("p", "A", 1, "127.0.0.1:1", {"owner": "alice"})
        await store.hold_sled("q", "B", 7, "127.0.0.1:2", {})
        await _pend(store, "r1")
        await _pend(store, "r2")
        await store.decide_pending(decision("r2", "deny"))
        await _pend(store, "r3", replica="B")
        assert await store.expired_replicas(T0 + 20) == ["A"]
        assert await store.release_replica(
            "A", T0 + 20, "replica_lost", "replica_lost", "gateway"
        ) == (1, 1)
        assert await store.expired_replicas(T0 + 20) == []
        sleds, pending = await store.fleet()
        assert [(s.project, s.replica) for s in sleds] == [("q", "B")]
        assert [r.req_id for r in pending] == ["r3"]
        states = {r: (await store.pending_row("p", r)).state for r in ("r1", "r2", "r3")}
        assert states == {"r1": WITHDRAWN, "r2": UNDELIVERED, "r3": PENDING}
        audit = sorted((e.req_id, e.decision) for e in await store.audit())
        assert audit == [("r1", WITHDRAWN), ("r2", "deny"), ("r2", UNDELIVERED)]
        # The sled moves to B; A's late end of its old session does not touch it.
        await store.hold_sled("p", "B", 9, "127.0.0.1:3", {})
        await store.let_go_sled("p", "A", 1)
        assert sorted(s.project for s in (await store.fleet())[0]) == ["p", "q"]
        await store.let_go_sled("p", "B", 9)
        assert [s.project for s in (await store.fleet())[0]] == ["q"]

    run(scenario())


def test_a_hold_whose_session_ended_before_its_commit_writes_nothing(engine: Engine) -> None:
    """The session is asked about last, just before the commit, when the hold would
    replace another replica's row: ended, the hold writes nothing (that row stays), alone
    or in a batch with others. Over no other replica's row it is written, for its let-go
    to mark the sled left."""
    store: Any = engine.open()
    asked: list[str] = []

    def ended(project: str) -> Callable[[], bool]:
        def still_held() -> bool:
            asked.append(project)
            return False

        return still_held

    async def scenario() -> None:
        await store.hold_sled("p", "B", 9, "127.0.0.1:3", {})
        with pytest.raises(SessionEnded):
            await store.hold_sled("p", "A", 1, "127.0.0.1:1", {}, still_held=ended("p"))
        # In one burst with a hold that stands: only the ended one is undone.
        late, live = await asyncio.gather(
            store.hold_sled("p", "A", 2, "127.0.0.1:1", {}, still_held=ended("p")),
            store.hold_sled("q", "A", 3, "127.0.0.1:1", {}, still_held=lambda: True),
            return_exceptions=True,
        )
        assert isinstance(late, SessionEnded) and live is None, (late, live)
        await store.hold_sled("r", "A", 4, "127.0.0.1:1", {}, still_held=ended("r"))
        rows = {(s.project, s.replica, s.session) for s in (await store.fleet())[0]}
        assert rows == {("p", "B", 9), ("q", "A", 3), ("r", "A", 4)}
        assert asked and set(asked) == {"p"}

    run(scenario())


def test_two_replicas_on_one_database_decide_each_request_once(postgres: Any) -> None:
    """Two stores on one PostgreSQL database (two replicas' writers), 200 requests, each
    decided by both at once with conflicting answers, in batches: one wins each."""
    url = postgres.url(postgres.create_database())
    a: Any = make_store(url).open()
    b: Any = make_store(url).open()
    try:

        async def scenario() -> None:
            ids = [f"r{i}" for i in range(200)]
            for req_id in ids:
                await _pend(a, req_id)
            calls = []
            for i, req_id in enumerate(ids):
                first, second = (a, b) if i % 2 else (b, a)
                calls.append(first.decide_pending(decision(req_id, "approve")))
                calls.append(second.decide_pending(decision(req_id, "deny", by="other")))
            results = await asyncio.gather(*calls, return_exceptions=True)
            lost = [r for r in results if isinstance(r, StateChanged)]
            assert len(lost) == 200, [r for r in results if isinstance(r, Exception)][:3]
            rows = await a.audit(limit=1000)
            assert sorted(e.req_id for e in rows) == sorted(ids)

        run(scenario())
    finally:
        a.close()
        b.close()


# -- health ------------------------------------------------------------------------------------


def test_check_passes_on_an_open_store_and_fails_once_it_is_closed(engine: Engine) -> None:
    store = engine.open()
    run(store.check(2.0))  # a transaction through the writer: nothing raised
    run(store.record(entry(1)))
    run(store.check(2.0))
    assert [r.req_id for r in run(store.audit())] == ["p-1"]  # the probe wrote nothing
    store.close()
    with pytest.raises(StoreError):
        run(store.check(2.0))


def test_a_row_whose_caller_stopped_waiting_is_committed_and_the_store_goes_on(
    engine: Engine,
) -> None:
    """A decision's caller may be cancelled (its HTTP client left) while its row is
    queued, and its event loop may be gone by the time the writer hands the result
    back: the row is committed all the same, and the writer serves the next caller."""
    store = engine.open()

    async def cancelled_while_queued() -> None:
        task = asyncio.create_task(store.record(entry(1, "gone")))
        await asyncio.sleep(0)  # queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancelled_while_queued())

    async def loop_closes_first() -> None:
        # Queued, and this loop is closed by asyncio.run before the result can come back.
        left = asyncio.create_task(store.record(entry(2, "gone")))
        await asyncio.sleep(0)
        assert not left.done()  # asyncio.run cancels it, then closes the loop

    run(loop_closes_first())

    async def next_caller() -> list[str]:
        await store.record(entry(3, "next"))
        deadline = time.monotonic() + 10
        while True:
            rows = await store.audit(project="gone")
            if len(rows) == 2 or time.monotonic() > deadline:
                return sorted(r.req_id for r in rows)
            await asyncio.sleep(0.02)

    assert run(next_caller()) == ["gone-1", "gone-2"]
