"""Rule matching (sled_gateway.policy): pure, in memory, no store and no loop."""

from __future__ import annotations

import pytest

from sled_gateway.policy import Policy, rule_key
from sled_gateway.store import ALLOW, DENY, Rule

_ids = iter(range(1, 10_000))


def rule(
    action: str, project: str | None, tool: str = "Bash", key: str | None = None, **kw: object
) -> Rule:
    return Rule(next(_ids), project, tool, key, action, 0.0, "console", **kw)


def test_nothing_matches_an_empty_policy() -> None:
    policy = Policy()
    assert policy.match("p", "Bash", {"command": "ls"}) is None
    assert len(policy) == 0


def test_an_exact_key_matches_only_that_use_of_that_sled() -> None:
    make = rule(ALLOW, "p", key="make test")
    policy = Policy([make])
    assert policy.match("p", "Bash", {"command": "make test", "description": "x"}) == make
    assert policy.match("p", "Bash", {"command": "make"}) is None
    assert policy.match("q", "Bash", {"command": "make test"}) is None
    assert policy.match("p", "Read", {"file_path": "make test"}) is None


def test_a_tool_wide_rule_matches_any_use_even_without_a_key() -> None:
    bash = rule(ALLOW, "p")
    policy = Policy([bash])
    assert policy.match("p", "Bash", {"command": "anything"}) == bash
    assert policy.match("p", "Bash", {"no": "command"}) == bash
    assert policy.match("p", "Bash", "not an object") == bash


def test_a_file_tool_matches_on_its_path() -> None:
    edit = rule(ALLOW, "p", "Edit", "/src/a.py")
    notebook = rule(ALLOW, "p", "NotebookEdit", "/n.ipynb")
    policy = Policy([edit, notebook])
    assert policy.match("p", "Edit", {"file_path": "/src/a.py", "old_string": "1"}) == edit
    assert policy.match("p", "Edit", {"file_path": "/src/b.py"}) is None
    assert policy.match("p", "NotebookEdit", {"notebook_path": "/n.ipynb"}) == notebook


def test_a_deny_beats_every_allow_whatever_its_scope() -> None:
    allow_exact = rule(ALLOW, "p", key="rm -rf /")
    allow_tool = rule(ALLOW, "p")
    deny_everyone = rule(DENY, None, key="rm -rf /")
    policy = Policy([allow_exact, allow_tool, deny_everyone])
    assert policy.match("p", "Bash", {"command": "rm -rf /"}) == deny_everyone
    assert policy.match("q", "Bash", {"command": "rm -rf /"}) == deny_everyone
    assert policy.match("p", "Bash", {"command": "ls"}) == allow_tool
    assert policy.match("q", "Bash", {"command": "ls"}) is None


def test_the_narrowest_allow_answers() -> None:
    everyone_tool = rule(ALLOW, None)
    sled_tool = rule(ALLOW, "p")
    sled_exact = rule(ALLOW, "p", key="make")
    policy = Policy([everyone_tool, sled_tool, sled_exact])
    assert policy.match("p", "Bash", {"command": "make"}) == sled_exact
    assert policy.match("p", "Bash", {"command": "ls"}) == sled_tool
    assert policy.match("q", "Bash", {"command": "make"}) == everyone_tool


def test_an_allow_and_a_deny_in_one_place_both_count() -> None:
    allow = rule(ALLOW, "p", key="make")
    deny = rule(DENY, "p", key="make")
    policy = Policy([allow, deny])
    assert len(policy) == 2
    assert policy.match("p", "Bash", {"command": "make"}) == deny
    policy.remove(deny)
    assert policy.match("p", "Bash", {"command": "make"}) == allow


def test_remove_goes_by_id_and_revoked_rules_never_match() -> None:
    first = rule(ALLOW, "p", key="make")
    policy = Policy([first])
    stale = rule(ALLOW, "p", key="make")  # same place, another id
    policy.remove(stale)
    assert policy.match("p", "Bash", {"command": "make"}) == first
    policy.remove(first)
    assert policy.match("p", "Bash", {"command": "make"}) is None
    assert len(policy) == 0
    policy.add(rule(DENY, None, revoked_at=1.0, revoked_by="api"))
    assert policy.match("p", "Bash", {"command": "make"}) is None
    assert len(policy) == 0


@pytest.mark.parametrize(
    ("tool", "tool_input", "expected"),
    [
        ("Bash", {"command": "make test", "description": "x"}, (True, "make test")),
        ("Read", {"file_path": "/src/a.py"}, (True, "/src/a.py")),
        ("NotebookEdit", {"notebook_path": "/n.ipynb"}, (True, "/n.ipynb")),
        ("NotebookEdit", {"file_path": "/n.ipynb"}, (True, "/n.ipynb")),
        ("WebFetch", {"url": "https://example.org"}, (True, None)),
        ("Bash", {"command": ""}, (False, None)),
        ("Write", "not an object", (False, None)),
    ],
)
def test_rule_key(tool: str, tool_input: object, expected: tuple[bool, str | None]) -> None:
    assert rule_key(tool, tool_input) == expected
