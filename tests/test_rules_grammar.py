"""Claude Code's permission-rule grammar (protocol/rules.py): parsing, errors with
positions, every example of Claude Code's permission documentation, paths,
fetch hosts, MCP names, and the rules the console offers.

The documentation examples are from code.claude.com/docs/en/permissions (and
its earlier home, docs.anthropic.com/en/docs/claude-code/iam). Where the
gateway is stricter than Claude Code (a path rule that is not absolute; the
legacy ``:*`` read as `` *`` with its word boundary) the table says so.
"""

from __future__ import annotations

from typing import Any

import pytest

from protocol import PermissionRule, RuleSet, RuleSyntaxError, exact_rule, parse_rule, prefix_rule
from protocol.claude_code import session_rule
from protocol.rules import Action, normalize_path, url_host


def _one(rule: str, action: Action = "allow") -> RuleSet:
    return RuleSet([(1, parse_rule(rule), action)])


def _decides(rule: str, tool: str, tool_input: dict[str, Any], action: Action = "allow") -> bool:
    return _one(rule, action).evaluate(tool, tool_input).action == action


def _bash(rule: str, command: str) -> bool:
    return _decides(rule, "Bash", {"command": command})


# ── parsing ────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "tool", "specifier", "canonical"),
    [
        ("Bash", "Bash", None, "Bash"),
        ("Bash(*)", "Bash", None, "Bash"),
        ("  Bash(ls *)  ", "Bash", "ls *", "Bash(ls *)"),
        ("Bash(npm run test:*)", "Bash", "npm run test:*", "Bash(npm run test:*)"),
        ("Bash(echo (x))", "Bash", "echo (x)", "Bash(echo (x))"),
        ("Read(//etc/**)", "Read", "//etc/**", "Read(//etc/**)"),
        ("Edit(//tmp/scratch.txt)", "Edit", "//tmp/scratch.txt", "Edit(//tmp/scratch.txt)"),
        ("WebFetch(domain:example.com)", "WebFetch", "domain:example.com", None),
        ("WebFetch", "WebFetch", None, "WebFetch"),
        ("mcp__puppeteer", "mcp__puppeteer", None, "mcp__puppeteer"),
        ("mcp__puppeteer__*", "mcp__puppeteer", None, "mcp__puppeteer"),
        ("mcp__puppeteer__puppeteer_navigate", "mcp__puppeteer__puppeteer_navigate", None, None),
        ("Agent(Explore)", "Agent", "Explore", "Agent(Explore)"),
        ("WebSearch", "WebSearch", None, "WebSearch"),
    ],
)
def test_parse(text: str, tool: str, specifier: str | None, canonical: str | None) -> None:
    rule = parse_rule(text)
    assert (rule.tool, rule.specifier) == (tool, specifier)
    assert rule.text == (canonical or text.strip())
    assert parse_rule(rule.text) == rule


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        ("", 0, "empty"),
        ("(ls)", 0, "tool name"),
        ("Bash(ls", 7, "not closed"),
        ("Bash(ls)x", 8, "after the closing"),
        ("Bash()", 5, "empty"),
        ("Bash ls", 4, "unexpected"),
        ("Bash(:*)", 5, "':*'"),
        ("Bash(ls\n)", 7, "control character"),
        ("  Bash(ls", 9, "not closed"),
        ("Read(src/**)", 5, "relative path"),
        ("Read(./.env)", 5, "relative path"),
        ("Read(*.env)", 5, "relative path"),
        ("Edit(/docs/**)", 5, "project root"),
        ("Read(~/.zshrc)", 5, "home"),
        ("Read(///x)", 7, "slashes"),
        ("WebFetch(example.com)", 9, "domain:"),
        ("WebFetch(domain:exa mple.com)", 16, "not a host"),
        ("Frobnicate(x)", 11, "no specifier"),
        ("mcp__s(x)", 7, "no specifier"),
        ("mcp__", 0, "MCP rule"),
    ],
)
def test_parse_errors_name_position_and_reason(text: str, position: int, reason: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(text)
    assert caught.value.position == position
    assert reason in caught.value.reason
    assert str(caught.value) == f"position {position}: {caught.value.reason}"
    assert isinstance(caught.value, ValueError)


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule(None)  # type: ignore[arg-type]


def test_rule_is_a_frozen_value() -> None:
    rule = parse_rule("Bash(ls *)")
    assert rule == PermissionRule("Bash", "ls *", "Bash(ls *)")
    with pytest.raises(AttributeError):
        rule.tool = "Read"  # type: ignore[misc]


# ── the documentation's Bash examples ──────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("rule", "command", "matches"),
    [
        # A bare tool name matches every use; Bash(*) is the same.
        ("Bash", "anything at all --really", True),
        ("Bash(*)", "npm run build", True),
        # Exact command.
        ("Bash(npm run build)", "npm run build", True),
        ("Bash(npm run build)", "npm run build:prod", False),
        ("Bash(npm run build)", "npm run", False),
        # Wildcards anywhere.
        ("Bash(npm run *)", "npm run test", True),
        ("Bash(npm run *)", "npm run", True),
        ("Bash(npm run *)", "npm install", False),
        ("Bash(git commit *)", 'git commit -m "fix"', True),
        ("Bash(git * main)", "git checkout main", True),
        ("Bash(git * main)", "git merge main", True),
        ("Bash(git * main)", "git checkout dev", False),
        ("Bash(* --version)", "node --version", True),
        ("Bash(* --version)", "node --help", False),
        ("Bash(* --help *)", "npm --help install", True),
        # The space before * is a word boundary.
        ("Bash(ls *)", "ls", True),
        ("Bash(ls *)", "ls -la", True),
        ("Bash(ls *)", "lsof", False),
        ("Bash(ls*)", "lsof", True),
        ("Bash(ls*)", "ls -la", True),
        # The legacy :* suffix is " *".
        ("Bash(ls:*)", "ls -la", True),
        ("Bash(ls:*)", "lsof", False),
        ("Bash(npm run test:*)", "npm run test", True),
        ("Bash(npm run test:*)", "npm run test --coverage", True),
        ("Bash(npm run test:*)", "npm run build", False),
        # Claude Code reads "curl http://site.com/:*" as a raw prefix; the contract's
        # word boundary keeps the gateway to curl http://site.com/ and its arguments.
        ("Bash(curl http://site.com/:*)", "curl http://site.com/ -o x", True),
        ("Bash(curl http://site.com/:*)", "curl http://site.com/.evil", False),
        # The documented bypasses of a prefix rule, none of which match.
        ("Bash(curl http://github.com/:*)", "curl -X GET http://github.com/x", False),
        ("Bash(curl http://github.com/:*)", "curl https://github.com/x", False),
        ("Bash(curl http://github.com/:*)", "URL=http://github.com && curl $URL", False),
        # Compound commands need every part allowed.
        ("Bash(safe-cmd:*)", "safe-cmd && other-cmd", False),
        ("Bash(safe-cmd *)", "safe-cmd; other-cmd", False),
        # Wrappers are stripped.
        ("Bash(npm test *)", "timeout 30 npm test", True),
        ("Bash(npm test *)", "nice -n 10 npm test", True),
        ("Bash(npm test *)", "nohup npm test", True),
        ("Bash(npm test *)", "time npm test", True),
        ("Bash(npm test *)", "stdbuf -oL npm test", True),
        # In a wildcard pattern an escaped star is a star; a pattern with no
        # wildcard is compared as written.
        (r"Bash(echo \*)", r"echo \*", True),
        (r"Bash(echo \*)", "echo *", False),
        (r"Bash(echo \* *)", "echo * x", True),
        (r"Bash(echo \* *)", "echo a x", False),
    ],
)
def test_documented_bash_examples(rule: str, command: str, matches: bool) -> None:
    assert _bash(rule, command) is matches


def test_deny_beats_a_more_specific_allow_and_ask_beats_allow() -> None:
    rules = RuleSet(
        [
            (1, parse_rule("Bash(aws s3 ls)"), "allow"),
            (2, parse_rule("Bash(aws *)"), "deny"),
            (3, parse_rule("Bash(git push)"), "allow"),
            (4, parse_rule("Bash(git *)"), "ask"),
        ]
    )
    denied = rules.evaluate("Bash", {"command": "aws s3 ls"})
    assert (denied.action, denied.rule_id) == ("deny", 2)
    asked = rules.evaluate("Bash", {"command": "git push"})
    assert (asked.action, asked.rule_id) == ("ask", 4)


def test_first_matching_rule_of_an_action_is_named() -> None:
    rules = RuleSet(
        [
            ("b", parse_rule("Bash(ls *)"), "allow"),
            ("a", parse_rule("Bash(ls -la)"), "allow"),
            ("c", parse_rule("Bash(* -la)"), "allow"),
        ]
    )
    assert rules.evaluate("Bash", {"command": "ls -la"}).rule_id == "b"


def test_no_rule_means_a_human_decides() -> None:
    verdict = RuleSet([]).evaluate("Bash", {"command": "ls"})
    assert verdict.action is None
    assert verdict.rule_id is None
    assert verdict.reasons


# ── paths ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("rule", "tool", "path", "matches"),
    [
        ("Read(//Users/alice/secrets/**)", "Read", "/Users/alice/secrets/key", True),
        ("Read(//Users/alice/secrets/**)", "Read", "/Users/alice/secrets/a/b/c", True),
        ("Read(//Users/alice/secrets/**)", "Read", "/Users/alice/secretsX/key", False),
        ("Read(//Users/alice/secrets/**)", "Read", "/Users/alice/other", False),
        ("Edit(//tmp/scratch.txt)", "Edit", "/tmp/scratch.txt", True),
        ("Edit(//tmp/scratch.txt)", "Edit", "/tmp/scratch.txt.bak", False),
        # An Edit rule covers every tool that edits files.
        ("Edit(//tmp/scratch.txt)", "Write", "/tmp/scratch.txt", True),
        ("Edit(//tmp/scratch.txt)", "MultiEdit", "/tmp/scratch.txt", True),
        ("Edit(//tmp/n.ipynb)", "NotebookEdit", "/tmp/n.ipynb", True),
        ("Edit(//tmp/scratch.txt)", "Read", "/tmp/scratch.txt", False),
        ("Read(//tmp/scratch.txt)", "Edit", "/tmp/scratch.txt", False),
        ("Write(//tmp/w)", "Write", "/tmp/w", True),
        ("Write(//tmp/w)", "Edit", "/tmp/w", False),
        # gitignore: * stays in one directory, ** crosses them; a name covers its subtree.
        ("Read(//home/u/*.pdf)", "Read", "/home/u/a.pdf", True),
        ("Read(//home/u/*.pdf)", "Read", "/home/u/d/a.pdf", False),
        ("Read(//home/u/**/*.pdf)", "Read", "/home/u/d/e/a.pdf", True),
        ("Read(//home/u/docs)", "Read", "/home/u/docs/a.md", True),
        ("Read(//**/.env)", "Read", "/srv/app/.env", True),
        ("Read(//**/.env)", "Read", "/srv/app/.envrc", False),
        # Normalised before matching.
        ("Read(//srv/app/**)", "Read", "/srv/app/./src//a.py", True),
        ("Read(//srv/app/**)", "Read", "//srv/app/a.py", True),
        ("Read(//srv/app/**)", "Read", "///srv/app/a.py", True),
        # Never allowed: relative, or through "..".
        ("Read(//srv/app/**)", "Read", "srv/app/a.py", False),
        ("Read(//srv/app/**)", "Read", "./a.py", False),
        ("Read(//srv/app/**)", "Read", "/srv/app/x/../a.py", False),
        ("Read(//srv/app/**)", "Read", "/srv/app/../../srv/app/a.py", False),
        ("Read(//srv/app/**)", "Read", "/srv/app/..", False),
    ],
)
def test_path_rules(rule: str, tool: str, path: str, matches: bool) -> None:
    field = "notebook_path" if tool.startswith("Notebook") else "file_path"
    assert _decides(rule, tool, {field: path}) is matches


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a//b/", "/a/b"),
        ("//a/b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/../../etc", "/etc"),
        ("a/b", None),
        ("", None),
        ("/a\x00b", None),
    ],
)
def test_normalize_path(path: str, expected: str | None) -> None:
    assert normalize_path(path) == expected


def test_deny_sees_through_dots_that_allow_refuses() -> None:
    rules = RuleSet(
        [(1, parse_rule("Read(//srv/**)"), "allow"), (2, parse_rule("Read(//srv/s/**)"), "deny")]
    )
    denied = rules.evaluate("Read", {"file_path": "/srv/x/../s/key"})
    assert (denied.action, denied.rule_id) == ("deny", 2)
    escape = rules.evaluate("Read", {"file_path": "/srv/link/../../etc/passwd"})
    assert escape.action is None


def test_a_tool_wide_rule_does_not_need_a_path() -> None:
    assert _decides("Read", "Read", {"file_path": "relative.txt"})
    assert _decides("Edit", "Write", {"file_path": "/x"})


def test_path_rule_ignores_a_missing_or_non_string_path() -> None:
    assert not _decides("Read(//**)", "Read", {})
    assert not _decides("Read(//**)", "Read", {"file_path": ["/etc/passwd"]})
    assert _decides("Read(//**)", "Read", {"file_path": "/etc/passwd"}, "allow")


# ── fetch hosts, MCP, agents ───────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("rule", "url", "matches"),
    [
        ("WebFetch(domain:example.com)", "https://example.com/page", True),
        ("WebFetch(domain:example.com)", "http://EXAMPLE.com./x", True),
        ("WebFetch(domain:example.com)", "https://example.com:8443/x", True),
        ("WebFetch(domain:example.com)", "https://www.example.com/", False),
        ("WebFetch(domain:example.com)", "https://example.com.evil.net/", False),
        ("WebFetch(domain:example.com)", "https://evilexample.com/", False),
        ("WebFetch(domain:example.com)", "https://example.com@evil.net/", False),
        ("WebFetch(domain:example.com)", "https://evil.net\\@example.com/", False),
        ("WebFetch(domain:example.com)", "https://evil.net\\.example.com/", False),
        ("WebFetch(domain:example.com)", "https://example.com\t.evil/", False),
        ("WebFetch(domain:example.com)", "ftp://example.com/", False),
        ("WebFetch(domain:example.com)", "example.com", False),
        ("WebFetch(domain:*.example.com)", "https://docs.example.com/", True),
        ("WebFetch(domain:*.example.com)", "https://example.com/", False),
        ("WebFetch(domain:ex\u0430mple.com)", "https://example.com/", False),
    ],
)
def test_webfetch_domain(rule: str, url: str, matches: bool) -> None:
    try:
        rules = _one(rule)
    except RuleSyntaxError:
        assert not matches
        return
    assert (rules.evaluate("WebFetch", {"url": url}).action == "allow") is matches


def test_url_host() -> None:
    assert url_host("https://Example.COM/x") == "example.com"
    assert url_host("https://a b/") is None
    assert url_host("javascript:alert(1)") is None
    assert url_host("https://[::1]:80/") == "::1"


@pytest.mark.parametrize(
    ("rule", "tool", "matches"),
    [
        ("mcp__puppeteer", "mcp__puppeteer__puppeteer_navigate", True),
        ("mcp__puppeteer__*", "mcp__puppeteer__puppeteer_navigate", True),
        ("mcp__puppeteer__puppeteer_navigate", "mcp__puppeteer__puppeteer_navigate", True),
        ("mcp__puppeteer__puppeteer_navigate", "mcp__puppeteer__puppeteer_click", False),
        ("mcp__puppeteer", "mcp__puppeteerx__navigate", False),
        ("mcp__puppeteer", "mcp__puppeteer", True),
        ("mcp__a", "mcp__a__b__c", True),
        ("mcp__a__b", "mcp__a__b__c", True),
        ("Bash", "mcp__a__Bash", False),
    ],
)
def test_mcp_rules(rule: str, tool: str, matches: bool) -> None:
    assert _decides(rule, tool, {}) is matches


def test_agent_rules_name_the_subagent() -> None:
    assert _decides("Agent(Explore)", "Agent", {"subagent_type": "Explore"})
    assert not _decides("Agent(Explore)", "Agent", {"subagent_type": "Plan"})


def test_sandbox_off_is_never_allowed_by_a_rule() -> None:
    call = {"command": "ls", "dangerouslyDisableSandbox": True}
    assert RuleSet([(1, parse_rule("Bash"), "allow")]).evaluate("Bash", call).action is None
    assert RuleSet([(1, parse_rule("Bash(ls)"), "allow")]).evaluate("Bash", call).action is None
    assert RuleSet([(1, parse_rule("Bash(ls)"), "deny")]).evaluate("Bash", call).action == "deny"
    assert RuleSet([(1, parse_rule("Bash(ls)"), "ask")]).evaluate("Bash", call).action == "ask"
    read = {"file_path": "/a", "dangerouslyDisableSandbox": True}
    assert RuleSet([(1, parse_rule("Read"), "allow")]).evaluate("Read", read).action is None
    # Only the boolean true counts; anything else is the ordinary call.
    call["dangerouslyDisableSandbox"] = "false"
    assert RuleSet([(1, parse_rule("Bash(ls)"), "allow")]).evaluate("Bash", call).action == "allow"


@pytest.mark.parametrize("bad", [None, [], "ls", 7, {"command": 5}, {"command": None}, {}])
def test_bad_inputs_are_never_an_error(bad: Any) -> None:
    rules = RuleSet([(1, parse_rule("Bash"), "allow"), (2, parse_rule("Read(//**)"), "deny")])
    for tool in ("Bash", "Read", "WebFetch", "mcp__x__y", ""):
        verdict = rules.evaluate(tool, bad)
        assert verdict.action in (None, "allow", "deny")
    assert rules.evaluate("Bash", bad).action is None


def test_ruleset_refuses_an_unknown_action() -> None:
    with pytest.raises(ValueError, match="action"):
        RuleSet([(1, parse_rule("Bash"), "maybe")])  # type: ignore[list-item]


# ── rules the console offers ───────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("command", "rule"),
    [
        ("npm test -- --watch=false", "Bash(npm test:*)"),
        ("npm test", "Bash(npm test:*)"),
        ("git status --short", "Bash(git status:*)"),
        ("ls -la", "Bash(ls:*)"),
        ("pytest tests/test_x.py -q", "Bash(pytest:*)"),
        ("timeout 60 npm test", "Bash(npm test:*)"),
        ("make", "Bash(make:*)"),
        ("npx jest src", "Bash(npx jest:*)"),
        ("python -m pytest", None),
        ("python script.py", None),
        ("bash -c 'ls'", None),
        ("sudo ls", None),
        ("env A=1 ls", None),
        ("xargs rm", None),
        ("FOO=1 npm test", None),
        ("npm test && rm -rf /", None),
        ("npm test > out.txt", None),
        ("npm test $(id)", None),
        ("npm test (", None),
        ("'npm' test", None),
        ("$NPM test", None),
        ("", None),
    ],
)
def test_prefix_rule(command: str, rule: str | None) -> None:
    assert prefix_rule("Bash", {"command": command}) == rule
    if rule is not None:
        assert _bash(rule, command)


def test_prefix_rule_only_for_bash() -> None:
    assert prefix_rule("Read", {"file_path": "/a"}) is None
    assert prefix_rule("Bash", "ls") is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tool", "tool_input", "rule"),
    [
        ("Bash", {"command": "npm test -- --watch=false"}, "Bash(npm test -- --watch=false)"),
        ("Bash", {"command": "echo (x)"}, "Bash(echo (x))"),
        ("Bash", {"command": "ls *.py"}, None),
        ("Bash", {"command": "ls\nrm x"}, None),
        ("Bash", {"command": " ls"}, None),
        ("Read", {"file_path": "/etc/hosts"}, "Read(//etc/hosts)"),
        ("Write", {"file_path": "/w/a.txt"}, "Edit(//w/a.txt)"),
        ("NotebookEdit", {"notebook_path": "/n.ipynb"}, "Edit(//n.ipynb)"),
        ("Read", {"file_path": "/a/../b"}, None),
        ("Read", {"file_path": "/a/*.py"}, None),
        ("Read", {"file_path": "/a/b "}, None),
        ("Read", {"file_path": "a"}, None),
        ("Read", {"file_path": "/"}, None),
        ("WebFetch", {"url": "https://Docs.Example.com/x"}, "WebFetch(domain:docs.example.com)"),
        ("WebFetch", {"url": "https://a\\@b/"}, None),
        ("mcp__s__t", {}, None),
        ("Bash", "ls", None),
    ],
)
def test_exact_rule(tool: str, tool_input: Any, rule: str | None) -> None:
    assert exact_rule(tool, tool_input) == rule
    if rule is not None:
        assert _decides(rule, tool, tool_input)


def test_exact_bash_rule_names_only_its_command() -> None:
    rule = exact_rule("Bash", {"command": "rm -rf build"})
    assert rule is not None
    assert not _bash(rule, "rm -rf build /")
    assert not _bash(rule, "rm -rf build && rm -rf /")


def test_session_rule_is_spelled_by_the_grammar() -> None:
    """The uplink's session rule and the gateway's exact rule are one spelling."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("Bash", {"command": "mkdir -p d1"}),
        ("Write", {"file_path": "/w/a.txt"}),
        ("Read", {"file_path": "/etc/hosts"}),
    ]
    for tool, tool_input in cases:
        made = session_rule(tool, tool_input, lambda _p: True)
        assert made is not None
        text = f"{made['toolName']}({made['ruleContent']})"
        assert text == exact_rule(tool, tool_input)
        assert parse_rule(text).specifier == made["ruleContent"]
    assert session_rule("Bash", {"command": "ls *"}, None) is None
    assert session_rule("Read", {"file_path": "/etc/hosts"}, None) is None
    assert session_rule("WebFetch", {"url": "https://a.b/"}, lambda _p: True) is None
