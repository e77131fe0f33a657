"""The approvals service on its own: a real store and the read model, no HTTP, no sockets.

A sled is a recorder of the answers the service hands it; deciders are
:class:`Principal` values. The store is a real SQLite file, failed for real
(a trigger added by a second connection) where a test needs a failing commit.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from protocol import Decision
from sled_gateway.approvals import Approvals, Forbidden, NotRecorded
from sled_gateway.events import Events, PermissionDecided, PermissionRequested, RulesChanged
from sled_gateway.principal import Channel, Principal, Role
from sled_gateway.records import AlreadyDecided, UnknownRequest
from sled_gateway.state import GatewayState
from sled_gateway.store import DENY, Rule, Store, make_store

pytestmark = pytest.mark.timeout(30)

APPROVER = Principal("@op:example.org", Channel.MATRIX, frozenset({Role.APPROVER}))
VIEWER = Principal("watcher", Channel.CONSOLE, frozenset({Role.VIEWER}))
SESSION = 7


class Sled:
    """Records the answers delivered to it, as the hub would send them."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, str, Decision]] = []

    async def answer(self, session: int, req_id: str, decision: Decision) -> bool:
        self.answers.append((session, req_id, decision))
        return True


class Setup:
    def __init__(self, approvals: Approvals, sled: Sled, store: Store, db: Path) -> None:
        self.approvals = approvals
        self.sled = sled
        self.store = store
        self.db = db
        self.state = approvals.state
        self.events = approvals.events

    async def ask(self, req_id: str, tool: str = "Bash", command: str = "make") -> None:
        await self.approvals.request(SESSION, "p", req_id, tool, {"command": command})

    async def audit(self) -> list[tuple[str, str, str]]:
        rows = await self.store.audit(project="p")
        return [(r.req_id, r.decision, r.by) for r in reversed(rows)]


@asynccontextmanager
async def approvals(tmp_path: Path, **options: object) -> AsyncIterator[Setup]:
    db = tmp_path / "gateway.db"
    store = make_store(db).open()
    state = GatewayState(10.0)
    events = Events()
    state.follow(events)
    service = Approvals(store, state, events, **options)  # type: ignore[arg-type]
    sled = Sled()
    service.answer_through(sled)
    try:
        yield Setup(service, sled, store, db)
    finally:
        await asyncio.to_thread(store.close)


def refuse_audit(db: Path) -> Callable[[], None]:
    """Make every insert into the audit table fail; returns the undo."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit "
        "BEGIN SELECT RAISE(ABORT, 'audit refused by the test'); END"
    )

    def undo() -> None:
        conn.execute("DROP TRIGGER refuse_audit")
        conn.close()

    return undo


def test_request_pending_decide_audit_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            seen: list[object] = []
            s.events.subscribe(PermissionRequested, seen.append)
            s.events.subscribe(PermissionDecided, seen.append)
            await s.ask("r1")
            assert s.state.is_pending("p", "r1")
            assert s.sled.answers == []
            record = await s.approvals.decide("p", "r1", Decision.APPROVE, APPROVER, "looks fine")
            assert (record.decision, record.by) == ("approve", "matrix:@op:example.org")
            assert s.sled.answers == [(SESSION, "r1", Decision.APPROVE)]
            assert await s.audit() == [("r1", "approve", "matrix:@op:example.org")]
            assert not s.state.is_pending("p", "r1")
            assert [type(e).__name__ for e in seen] == ["PermissionRequested", "PermissionDecided"]
            with pytest.raises(AlreadyDecided):
                await s.approvals.decide("p", "r1", Decision.DENY, APPROVER)
            with pytest.raises(UnknownRequest):
                await s.approvals.decide("p", "nope", Decision.DENY, APPROVER)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "principal",
    [VIEWER, Principal.matrix("@stranger:example.org", approver=False), Principal.gateway("x")],
)
def test_a_principal_without_the_approver_role_is_forbidden(
    tmp_path: Path, principal: Principal
) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            await s.ask("r1")
            with pytest.raises(Forbidden):
                await s.approvals.decide("p", "r1", Decision.APPROVE, principal)
            assert s.state.is_pending("p", "r1")
            assert s.sled.answers == []
            assert await s.audit() == []
            draft = Rule(0, None, "Bash", None, DENY, time.time(), "")
            with pytest.raises(Forbidden):
                await s.approvals.add_rule(draft, principal)
            with pytest.raises(Forbidden):  # an approver decides but does not make rules
                await s.approvals.add_rule(draft, APPROVER)
            assert await s.store.rules() == []

    asyncio.run(scenario())


def test_a_failed_commit_leaves_the_request_pending(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            await s.ask("r1")
            undo = refuse_audit(s.db)
            with pytest.raises(NotRecorded):
                await s.approvals.decide("p", "r1", Decision.APPROVE, APPROVER)
            assert s.state.is_pending("p", "r1")
            assert s.state.decision_for("p", "r1") is None
            assert s.sled.answers == []
            undo()
            record = await s.approvals.decide("p", "r1", Decision.DENY, APPROVER)
            assert record.decision == "deny"
            assert s.sled.answers == [(SESSION, "r1", Decision.DENY)]
            assert await s.audit() == [("r1", "deny", "matrix:@op:example.org")]

    asyncio.run(scenario())


def test_two_concurrent_deciders_make_exactly_one_decision(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            await s.ask("r1")
            other = Principal.operator(Channel.CONSOLE)
            outcomes = await asyncio.gather(
                s.approvals.decide("p", "r1", Decision.APPROVE, APPROVER),
                s.approvals.decide("p", "r1", Decision.DENY, other),
                return_exceptions=True,
            )
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(won) == 1 and len(lost) == 1
            assert isinstance(lost[0], AlreadyDecided)
            assert lost[0].record == won[0]
            assert len(s.sled.answers) == 1
            assert len(await s.audit()) == 1

    asyncio.run(scenario())


def test_rules_auto_and_caps_answer_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path, max_pending_per_sled=1) as s:
            changed: list[RulesChanged] = []
            s.events.subscribe(RulesChanged, changed.append)
            admin = Principal.operator(Channel.API)
            rule = await s.approvals.add_rule(
                Rule(0, "p", "Bash", "rm -rf /", DENY, time.time(), ""), admin
            )
            assert rule.created_by == "api"
            assert [c.rule.id for c in changed] == [rule.id]
            await s.ask("danger", command="rm -rf /")
            await s.ask("first")
            await s.ask("second")  # over the cap of one pending request
            assert s.sled.answers == [
                (SESSION, "danger", Decision.DENY),
                (SESSION, "second", Decision.DENY),
            ]
            assert await s.audit() == [
                ("danger", "deny", f"rule:{rule.id}"),
                ("second", "deny", "limit"),
            ]
            assert [p.req_id for p in s.state.pending_items()] == ["first"]

    asyncio.run(scenario())


def test_auto_and_a_rule_deny_when_the_commit_fails(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path, auto=Decision.APPROVE) as s:
            await s.ask("ok")
            assert s.sled.answers == [(SESSION, "ok", Decision.APPROVE)]
            undo = refuse_audit(s.db)
            await s.ask("unrecorded")
            undo()
            assert s.sled.answers[-1] == (SESSION, "unrecorded", Decision.DENY)
            shown = s.state.decision_for("p", "unrecorded")
            assert shown is not None and (shown.decision, shown.by) == ("deny", "auto")
            assert await s.audit() == [("ok", "approve", "auto")]

    asyncio.run(scenario())


def test_withdrawal_on_disconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            await s.ask("a")
            await s.ask("b")
            gone = s.approvals.withdraw(SESSION, 1006)
            assert sorted(p.req_id for p in gone) == ["a", "b"]
            assert s.state.pending_items() == []
            with pytest.raises(AlreadyDecided) as caught:
                await s.approvals.decide("p", "a", Decision.APPROVE, APPROVER)
            assert (caught.value.record.decision, caught.value.record.by) == (
                "withdrawn",
                "sled_disconnected",
            )
            assert s.sled.answers == []

    asyncio.run(scenario())


def test_the_audit_labels_of_principals() -> None:
    assert Principal.operator(Channel.CONSOLE).by == "console"
    assert Principal.operator(Channel.API).by == "api"
    assert Principal.terminal().by == "terminal"
    assert Principal.auto().by == "auto"
    assert Principal.rule("rule:3").by == "rule:3"
    assert Principal.matrix("@op:host", approver=True).by == "matrix:@op:host"
    for word in ("invalid", "limit", "sled_disconnected"):
        assert Principal.gateway(word).by == word
    for label in ("console", "api", "terminal", "library", "matrix:@op:host"):
        assert Principal.from_by(label).by == label
    assert Principal.operator(Channel.API).has(Role.APPROVER)
    assert not Principal.matrix("@x:host", approver=False).has(Role.VIEWER)


def test_a_request_is_decidable_before_its_cards_rules_are_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's rules (a shell parse) are not on the path from frame to pending: they are
    computed once, when something first shows or checks them, and the sled's own
    suggestions are still checked against the request."""
    from sled_gateway import policy

    computed: list[str] = []
    real = policy.suggested_rules

    def counted(tool_name: str, tool_input: object, sled: tuple[str, ...] = ()) -> object:
        computed.append(tool_name)
        return real(tool_name, tool_input, sled)  # type: ignore[arg-type]

    monkeypatch.setattr(policy, "suggested_rules", counted)
    # Wherever else it was imported by name, so a computation on the path is seen too.
    import sled_gateway.approvals

    monkeypatch.setattr(sled_gateway.approvals, "suggested_rules", counted, raising=False)

    async def scenario() -> None:
        async with approvals(tmp_path) as s:
            seen: list[PermissionRequested] = []
            s.events.subscribe(PermissionRequested, seen.append)
            await s.approvals.request(
                SESSION,
                "p",
                "r1",
                "Bash",
                {"command": "npm test -- -u"},
                suggestions=("Bash(npm test:*)", "Bash(curl:*)"),
            )
            assert s.state.is_pending("p", "r1")
            assert computed == []
            item = s.state.pending_item("p", "r1")
            expected = [
                {"rule": "Bash(npm test -- -u)", "kind": "exact"},
                {"rule": "Bash(npm test:*)", "kind": "prefix"},
            ]
            assert item.to_json()["suggested_rules"] == expected
            assert seen[0].item.to_json()["suggested_rules"] == expected
            assert len(computed) <= 2  # once per item object, not once per reading
            item.to_json()
            assert len(computed) <= 2
            record = await s.approvals.decide(
                "p", "r1", Decision.ALWAYS_ALLOW, APPROVER, rule="Bash(npm test:*)"
            )
            assert record.decision == "always_allow"

    asyncio.run(scenario())
