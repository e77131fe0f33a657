"""Rule matching (sled_gateway.policy): pure, in memory, no store and no loop."""

from __future__ import annotations

import pytest

from sled_gateway.policy import (
    MAX_KEY_TEXT,
    MAX_SUGGESTED_RULE_CHARS,
    Policy,
    legacy_key,
    rule_key,
    suggested_rules,
)
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
        ("Bash", {"command": "make test", "description": "x"}, "make test"),
        ("Read", {"file_path": "/src/a.py"}, "/src/a.py"),
        ("NotebookEdit", {"notebook_path": "/n.ipynb"}, "/n.ipynb"),
        ("NotebookEdit", {"file_path": "/n.ipynb"}, "/n.ipynb"),
        ("WebFetch", {"url": "https://example.org"}, None),
        ("Bash", {"command": ""}, None),
        ("Write", "not an object", None),
        ("Bash", {"command": 'input:{"command":"ls"}'}, None),  # never read as an input key
        ("Read", {"file_path": "input-sha256:00"}, None),
    ],
)
def test_legacy_key(tool: str, tool_input: object, expected: str | None) -> None:
    assert legacy_key(tool, tool_input) == expected


def test_rule_key_is_the_whole_input_minus_cosmetic_fields() -> None:
    assert rule_key("Bash", {"description": "x", "command": "ls"}) == 'input:{"command":"ls"}'
    assert rule_key("Bash", {"command": "ls", "run_in_background": True}) == (
        'input:{"command":"ls","run_in_background":true}'
    )
    assert rule_key("Write", {"file_path": "/a", "content": "A"}) != rule_key(
        "Write", {"file_path": "/a", "content": "B"}
    )
    # description is cosmetic for Bash only: an MCP tool's argument of that name counts.
    assert rule_key("mcp__s__t", {"description": "x"}) == 'input:{"description":"x"}'
    big = rule_key("Write", {"file_path": "/a", "content": "x" * MAX_KEY_TEXT})
    assert big.startswith("input-sha256:") and len(big) == len("input-sha256:") + 64


def test_always_allow_keys_cover_only_the_input_seen() -> None:
    """The three findings of issue 21 item 3, at the matcher."""
    write = rule(ALLOW, "p", "Write", rule_key("Write", {"file_path": "/p", "content": "A"}))
    echo = rule(ALLOW, "p", "Bash", rule_key("Bash", {"command": "echo hi", "description": "d"}))
    mcp = rule(ALLOW, "p", "mcp__s__run", rule_key("mcp__s__run", {"cmd": "echo hi"}))
    policy = Policy([write, echo, mcp])
    assert policy.match("p", "Write", {"file_path": "/p", "content": "A"}) == write
    assert policy.match("p", "Write", {"file_path": "/p", "content": "B"}) is None
    assert policy.match("p", "Bash", {"command": "echo hi", "description": "other"}) == echo
    assert (
        policy.match("p", "Bash", {"command": "echo hi", "dangerouslyDisableSandbox": True}) is None
    )
    assert policy.match("p", "Bash", {"command": "echo hi", "run_in_background": True}) is None
    assert policy.match("p", "mcp__s__run", {"cmd": "echo hi"}) == mcp
    assert policy.match("p", "mcp__s__run", {"cmd": "rm -rf ~"}) is None


def test_an_older_command_key_keeps_its_meaning_but_is_never_borrowed() -> None:
    old = rule(ALLOW, "p", "Bash", "echo hi")  # made before keys named whole inputs
    exact = rule(ALLOW, "p", "Bash", rule_key("Bash", {"command": "rm -rf /"}))
    policy = Policy([old, exact])
    assert policy.match("p", "Bash", {"command": "echo hi"}) == old
    # ... except that no rule, an old one included, allows running outside the sandbox.
    off = {"command": "echo hi", "dangerouslyDisableSandbox": True}
    assert policy.match("p", "Bash", off) is None
    assert policy.explain("p", "Bash", off).would_allow == old
    # A command spelled like the input key of an allowed input does not borrow its rule.
    assert policy.match("p", "Bash", {"command": 'input:{"command":"rm -rf /"}'}) is None
    assert old.describes == "Bash with the command echo hi (whatever its other input fields)"
    assert exact.describes == 'Bash with exactly the input {"command":"rm -rf /"}'
    assert rule(ALLOW, None, "Bash").describes == "any use of Bash"


# -- rules in Claude Code's grammar, weighed with the exact rows -----------------------------


def grammar(action: str, project: str | None, text: str) -> Rule:
    return rule(action, project, text.split("(", 1)[0], None, rule=text)


def test_a_grammar_rule_is_not_any_use_of_its_tool() -> None:
    # Its row has no key; were it indexed as an exact row it would allow every Bash call.
    mkdir = grammar(ALLOW, "p", "Bash(mkdir d*)")
    policy = Policy([mkdir])
    assert policy.match("p", "Bash", {"command": "mkdir d1"}) == mkdir
    assert policy.match("p", "Bash", {"command": "rm -rf /"}) is None
    assert policy.match("q", "Bash", {"command": "mkdir d1"}) is None
    assert len(policy) == 1


def test_deny_then_ask_then_allow_across_exact_rows_and_grammar_rules() -> None:
    exact_allow = rule(ALLOW, "p", key="git push origin main")
    exact_deny = rule(DENY, None, key="make deploy")
    make = grammar(ALLOW, "p", "Bash(make:*)")
    push = grammar("ask", None, "Bash(git push:*)")
    rm = grammar(DENY, None, "Bash(rm:*)")
    policy = Policy([exact_allow, exact_deny, make, push, rm])
    assert policy.match("p", "Bash", {"command": "make deploy"}) == exact_deny
    assert policy.match("p", "Bash", {"command": "make test"}) == make
    # An ask rule beats the exact allow row: a person decides.
    assert policy.match("p", "Bash", {"command": "git push origin main"}) is None
    asked = policy.explain("p", "Bash", {"command": "git push origin main"})
    assert asked.action == "ask" and asked.rule == push
    # A deny of the fleet beats this sled's allow in a compound command.
    denied = policy.explain("p", "Bash", {"command": "make && rm -rf x"})
    assert denied.action == DENY and denied.rule == rm
    assert [(part.action, part.rule) for part in denied.parts] == [(ALLOW, make), (DENY, rm)]


def test_every_part_may_be_allowed_by_a_rule_of_either_scope() -> None:
    ls = grammar(ALLOW, None, "Bash(ls:*)")
    mkdir = grammar(ALLOW, "p", "Bash(mkdir d*)")
    policy = Policy([ls, mkdir])
    assert policy.match("p", "Bash", {"command": "mkdir d1 && ls"}) is not None
    assert policy.match("q", "Bash", {"command": "mkdir d1 && ls"}) is None
    assert policy.match("q", "Bash", {"command": "ls -la"}) == ls
    policy.remove(mkdir)
    assert policy.match("p", "Bash", {"command": "mkdir d1"}) is None
    assert policy.match("p", "Bash", {"command": "ls"}) == ls


def test_no_grammar_rule_allows_a_call_outside_the_sandbox() -> None:
    mkdir = grammar(ALLOW, "p", "Bash(mkdir d*)")
    policy = Policy([mkdir])
    off = {"command": "mkdir d1", "dangerouslyDisableSandbox": True}
    assert policy.match("p", "Bash", off) is None
    outcome = policy.explain("p", "Bash", off)
    assert outcome.action is None and outcome.would_allow == mkdir
    assert outcome.to_json()["pending"] is True


def test_a_stored_rule_that_no_longer_parses_matches_nothing() -> None:
    policy = Policy([grammar(ALLOW, "p", "Bash(mkdir d*")])
    assert len(policy) == 0
    assert policy.match("p", "Bash", {"command": "mkdir d1"}) is None


def test_no_rule_longer_than_a_person_can_check_is_suggested() -> None:
    short = suggested_rules("Bash", {"command": "npm test -- --watch=false"})
    assert ("Bash(npm test:*)", "prefix") in short
    long_command = "echo " + "z" * MAX_SUGGESTED_RULE_CHARS
    offered = suggested_rules("Bash", {"command": long_command}, sled=[f"Bash({long_command})"])
    assert all(len(text) <= MAX_SUGGESTED_RULE_CHARS for text, _ in offered)
    assert not any(kind in ("exact", "claude") for _, kind in offered)
