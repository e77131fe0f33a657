"""``perm_response`` → decision, the words a deny carries, and the words a person
answers with.

Ports ``resolve_perm_response_approve`` / ``_deny`` / ``_always_allow`` from
``reference/sled_uplink.rs.txt`` (the registry-level halves — unknown req_id,
fail-close — belong to the actor tests).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    DECISION_WORDS,
    DENY_MESSAGES,
    Decision,
    Envelope,
    Mapped,
    Outcome,
    Reason,
    decide,
    decision_word,
    parse,
)


def mapped(payload: Any) -> tuple[Decision, Reason]:
    result = decide(payload)
    return result.decision, result.reason


# ── The reference's tests ─────────────────────────────────────────────────


def test_resolve_perm_response_approve() -> None:
    assert decide({"approved": True, "always_allow": False}) == Mapped(
        Decision.APPROVE, Reason.GATEWAY
    )


def test_resolve_perm_response_deny() -> None:
    assert decide({"approved": False}) == Mapped(Decision.DENY, Reason.GATEWAY)


def test_resolve_perm_response_always_allow() -> None:
    assert decide({"approved": True, "always_allow": True}) == Mapped(
        Decision.ALWAYS_ALLOW, Reason.GATEWAY
    )


def test_decision_from_a_parsed_perm_response_frame() -> None:
    env = parse(
        '{"type":"perm_response","req_id":"r1","payload":{"approved":true,"always_allow":false}}'
    )
    assert env == Envelope("perm_response", "r1", {"approved": True, "always_allow": False})
    assert decide(env.payload).decision is Decision.APPROVE


# ── The mapping rules ─────────────────────────────────────────────────────


def test_approve_alone_approves() -> None:
    assert mapped({"approved": True}) == (Decision.APPROVE, Reason.GATEWAY)


@pytest.mark.parametrize(
    "payload",
    [
        {"always_allow": True},
        {"always_allow": True, "approved": True},
        # "unless approved is explicitly false": anything else does not veto it.
        {"always_allow": True, "approved": None},
        {"always_allow": True, "approved": 0},
        {"always_allow": True, "approved": "false"},
        {"always_allow": True, "approved": True, "note": "extra keys are ignored"},
    ],
)
def test_always_allow_wins_unless_approved_is_explicitly_false(payload: dict[str, Any]) -> None:
    result = decide(payload)
    assert (result.decision, result.reason) == (Decision.ALWAYS_ALLOW, Reason.GATEWAY)
    assert result.warning is None


def test_always_allow_with_approved_false_is_a_contradictory_deny_with_a_warning() -> None:
    result = decide({"approved": False, "always_allow": True})
    assert result.decision is Decision.DENY
    assert result.reason is Reason.CONTRADICTORY
    assert isinstance(result.warning, str)
    assert "contradictory" in result.warning.lower()


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"approved": False, "always_allow": False},
        {"always_allow": False},
        {"approved": 1},
        {"approved": "true"},
        {"approved": None},
        {"approved": 1.0},
        {"approved": [True]},
        {"approved": {"value": True}},
        {"always_allow": 1},
        {"always_allow": "true"},
        {"always_allow": None},
        {"always_allow": 1, "approved": 1},
        {"always_allow": "true", "approved": "true"},
        {"Approved": True, "AlwaysAllow": True},
    ],
)
def test_anything_but_real_booleans_denies(payload: dict[str, Any]) -> None:
    result = decide(payload)
    assert (result.decision, result.reason) == (Decision.DENY, Reason.GATEWAY)
    assert result.warning is None


@pytest.mark.parametrize(
    "payload",
    [None, [], [{"approved": True}], "approved", "", True, 1, 0.5],
    ids=["null", "empty-list", "list", "string", "empty-string", "true", "int", "float"],
)
def test_payload_not_an_object_denies(payload: Any) -> None:
    assert mapped(payload) == (Decision.DENY, Reason.GATEWAY)


def test_missing_payload_frame_denies() -> None:
    env = parse('{"type":"perm_response","req_id":"r1"}')
    assert mapped(env.payload) == (Decision.DENY, Reason.GATEWAY)


# ── Decisions and their words ─────────────────────────────────────────────


def test_decision_wire_names_and_allows() -> None:
    assert [d.value for d in Decision] == ["approve", "always_allow", "deny"]
    assert Decision.APPROVE.allows
    assert Decision.ALWAYS_ALLOW.allows
    assert not Decision.DENY.allows


@pytest.mark.parametrize("reason", list(Reason))
def test_every_deny_reason_has_a_non_empty_message(reason: Reason) -> None:
    message = Outcome("r1", Decision.DENY, reason).message
    assert isinstance(message, str)
    assert message.strip()


@pytest.mark.parametrize("decision", [Decision.APPROVE, Decision.ALWAYS_ALLOW])
def test_allows_have_an_empty_message(decision: Decision) -> None:
    assert Outcome("r1", decision, Reason.GATEWAY).message == ""


def test_deny_messages_cover_exactly_the_reasons() -> None:
    assert set(DENY_MESSAGES) == set(Reason)


def test_timeout_is_worded_differently_from_a_gateway_deny() -> None:
    timeout = Outcome("r1", Decision.DENY, Reason.TIMEOUT).message
    gateway = Outcome("r1", Decision.DENY, Reason.GATEWAY).message
    assert timeout != gateway
    assert "timeout" in timeout.lower()


def test_session_end_and_shutdown_are_not_worded_as_a_gateway_deny() -> None:
    gateway = DENY_MESSAGES[Reason.GATEWAY]
    assert DENY_MESSAGES[Reason.SESSION_ENDED] != gateway
    assert DENY_MESSAGES[Reason.SHUTDOWN] != gateway


# ── Property: total, and fail closed ──────────────────────────────────────

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=15,
)
# Objects that often carry the two keys, with any JSON value in them.
perm_payloads = st.builds(
    lambda base, fields: {**base, **fields},
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "approved": st.booleans() | json_values,
            "always_allow": st.booleans() | json_values,
        },
    ),
)


@settings(max_examples=300, deadline=None)
@given(json_values | perm_payloads)
def test_decide_is_total_and_only_allows_on_a_real_true(payload: Any) -> None:
    result = decide(payload)
    assert isinstance(result, Mapped)
    assert isinstance(result.decision, Decision)
    assert isinstance(result.reason, Reason)
    is_object = isinstance(payload, dict)
    always = is_object and payload.get("always_allow") is True
    approved = payload.get("approved") if is_object else None
    if result.decision.allows:
        assert always or approved is True
    # The whole rule, as an oracle.
    if always and approved is False:
        expected = Decision.DENY
    elif always:
        expected = Decision.ALWAYS_ALLOW
    elif approved is True:
        expected = Decision.APPROVE
    else:
        expected = Decision.DENY
    assert result.decision is expected
    assert (result.reason is Reason.CONTRADICTORY) == (always and approved is False)
    assert (result.warning is not None) == (result.reason is Reason.CONTRADICTORY)


# ── the words a person answers with (terminal and Matrix) ────────────────


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("approve", Decision.APPROVE),
        ("Approved!", Decision.APPROVE),
        (" yes.\n", Decision.APPROVE),
        ("DENY", Decision.DENY),
        ("denied", Decision.DENY),
        ("no", Decision.DENY),
        ("always", Decision.ALWAYS_ALLOW),
        ("always_allow", Decision.ALWAYS_ALLOW),
        ("Always   Allow", Decision.ALWAYS_ALLOW),
        ("always deny", None),
        ("approve rm -rf /", None),
        ("", None),
        ("y", None),
        ("n", None),
        ("a", None),
    ],
)
def test_decision_words(text: str, expected: Decision | None) -> None:
    assert decision_word(text) is expected


def test_decision_letters_only_where_asked_for() -> None:
    assert decision_word(" Y\n", letters=True) is Decision.APPROVE
    assert decision_word("n", letters=True) is Decision.DENY
    assert decision_word("a", letters=True) is Decision.ALWAYS_ALLOW
    assert decision_word("deny", letters=True) is Decision.DENY
    assert decision_word("b", letters=True) is None
    assert set(DECISION_WORDS.values()) == set(Decision)
