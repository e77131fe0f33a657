"""The history checker (tests/history.py) on hand-made histories: it passes a clean
one and names each kind of violation, so it is proven able to fail."""

from __future__ import annotations

from typing import Any

import pytest

from tests.history import VIOLATION_KINDS, History, response_value

APPROVE = {"approved": True, "always_allow": False}
DENY = {"approved": False, "always_allow": False}
ALWAYS = {"approved": True, "always_allow": True}


def row(req_id: str, decision: str, project: str = "s1") -> dict[str, Any]:
    return {"project": project, "req_id": req_id, "decision": decision, "by": "api"}


def clean() -> History:
    """Three requests ended the three right ways: decided, withdrawn, decided but undelivered."""
    h = History()
    for r in ("a", "b", "c"):
        h.sent("s1", r)
    h.voted("api", "s1", "a", "approve", 200)
    h.voted("console", "s1", "a", "deny", 409)
    h.delivered("s1", "a", APPROVE)
    h.denied_by_sled("s1", "b", "session ended")
    h.voted("api", "s1", "c", "deny", 200)
    h.denied_by_sled("s1", "c", "session ended")
    h.audited([row("a", "approve"), row("b", "withdrawn"), row("c", "deny")])
    return h


def test_a_clean_history_passes_with_its_counts() -> None:
    verdict = clean().check()
    assert verdict.ok, str(verdict)
    c = verdict.counts
    assert (c["sent"], c["votes"], c["votes_200"], c["votes_409"]) == (3, 3, 2, 1)
    assert (c["delivered"], c["delivered_allow"], c["denied_by_sled"]) == (1, 1, 2)
    assert (c["audit_decisions"], c["audit_withdrawn"], c["decided_undelivered"]) == (2, 1, 1)
    assert c["violations"] == 0
    assert str(verdict).startswith("history OK: sent=3")


def test_the_response_values() -> None:
    assert [response_value(p) for p in (APPROVE, DENY, ALWAYS)] == [
        "approve",
        "deny",
        "always_allow",
    ]


def one(kind: str) -> History:
    """A history with one violation of ``kind`` on request s1/x (and nothing else wrong)."""
    h = History()
    h.sent("s1", "x")
    if kind == "two_decisions":
        h.delivered("s1", "x", APPROVE)
        h.audited([row("x", "approve"), row("x", "deny")])
    elif kind == "decided_and_withdrawn":
        h.denied_by_sled("s1", "x", "session ended")
        h.audited([row("x", "approve"), row("x", "withdrawn")])
    elif kind == "delivered_differs":
        h.delivered("s1", "x", APPROVE)
        h.audited([row("x", "deny")])
    elif kind == "delivered_not_audited":
        h.delivered("s1", "x", DENY)
        h.audited([row("x", "withdrawn")])
    elif kind == "allow_without_audit":
        h.delivered("s1", "x", ALWAYS)
        h.audited([row("x", "withdrawn")])
    elif kind == "acknowledged_lost":
        h.voted("alice", "s1", "x", "approve", 200)
        h.delivered("s1", "x", DENY)
        h.audited([row("x", "deny")])
    elif kind == "not_final":
        h.audited([row("x", "withdrawn")])
    elif kind == "unaccounted":
        h.denied_by_sled("s1", "x", "session ended")
    elif kind == "unknown_request":
        h.delivered("s1", "x", DENY)
        h.audited([row("x", "deny"), row("ghost", "approve")])
    return h


@pytest.mark.parametrize("kind", VIOLATION_KINDS)
def test_each_violation_kind_is_found_and_named(kind: str) -> None:
    verdict = one(kind).check()
    assert not verdict.ok
    assert set(verdict.kinds()) == {kind}, str(verdict)
    named = verdict.violations[0]
    expected_key = ("s1", "ghost") if kind == "unknown_request" else ("s1", "x")
    assert named.key == expected_key
    assert f"{expected_key[0]}/{expected_key[1]}: {kind}:" in str(verdict)
    assert verdict.counts["violations"] == len(verdict.violations)


def test_two_deciders_told_200_and_two_deliveries_are_each_named() -> None:
    h = History()
    h.sent("s1", "x")
    h.voted("api", "s1", "x", "approve", 200)
    h.voted("console", "s1", "x", "deny", 200)
    h.delivered("s1", "x", APPROVE)
    h.delivered("s1", "x", DENY)
    h.audited([row("x", "approve")])
    verdict = h.check()
    whats = [v.what for v in verdict.of_kind("two_decisions")]
    assert any("2 deciders told 200" in w for w in whats), whats
    assert any("2 perm_responses delivered" in w for w in whats), whats
    # ... and the deny the sled got and the deny the console was promised differ from the audit.
    assert set(verdict.kinds()) == {"two_decisions", "delivered_differs", "acknowledged_lost"}


def test_requests_are_told_apart_by_sled() -> None:
    h = History()
    h.sent("s1", "x")
    h.sent("s2", "x")
    h.delivered("s1", "x", APPROVE)
    h.delivered("s2", "x", DENY)
    h.audited([row("x", "approve", "s1"), row("x", "deny", "s2")])
    assert h.check().ok
    h.audited([row("x", "approve", "s2")])
    verdict = h.check()
    assert [(v.key, v.kind) for v in verdict.violations] == [(("s2", "x"), "two_decisions")]


def test_a_long_verdict_is_cut_but_counted() -> None:
    h = History()
    for i in range(60):
        h.sent("s1", f"r{i}")
    verdict = h.check()
    assert verdict.kinds() == {"not_final": 60, "unaccounted": 60}
    assert "... and 70 more" in str(verdict)
