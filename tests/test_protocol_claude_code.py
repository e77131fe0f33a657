"""Claude Code's answers and session rules (protocol/claude_code.py): values in, values out."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.claude_code import regular_file
from protocol import DENY_MESSAGES, Decision, Outcome, Reason
from protocol.claude_code import hook_answer, parse_hook, prompt_answer, session_rule


def _every_path_is_a_file(path: str) -> bool:
    return True


@pytest.mark.parametrize(
    ("tool", "tool_input", "rule"),
    [
        ("Bash", {"command": "mkdir -p d1"}, {"toolName": "Bash", "ruleContent": "mkdir -p d1"}),
        ("Write", {"file_path": "/w/a.txt"}, {"toolName": "Edit", "ruleContent": "//w/a.txt"}),
        ("Edit", {"file_path": "/w/a.txt"}, {"toolName": "Edit", "ruleContent": "//w/a.txt"}),
        ("MultiEdit", {"file_path": "/w/a"}, {"toolName": "Edit", "ruleContent": "//w/a"}),
        (
            "NotebookEdit",
            {"notebook_path": "/n.ipynb"},
            {"toolName": "Edit", "ruleContent": "//n.ipynb"},
        ),
        ("Read", {"file_path": "/etc/hosts"}, {"toolName": "Read", "ruleContent": "//etc/hosts"}),
    ],
)
def test_the_narrowest_rule_for_each_kind_of_tool(tool: str, tool_input: dict, rule: dict) -> None:
    assert session_rule(tool, tool_input, _every_path_is_a_file) == rule


@pytest.mark.parametrize(
    ("tool", "tool_input"),
    [("WebFetch", {"url": "https://x"}), ("mcp__srv__tool", {"cmd": "echo hi"})],
)
def test_no_tool_wide_session_rule(tool: str, tool_input: dict) -> None:
    """A rule for the tool alone would let Claude Code run any input of it unasked
    (``{"cmd": "rm -rf ~"}`` after ``{"cmd": "echo hi"}``); the gateway's rule answers."""
    assert session_rule(tool, tool_input, _every_path_is_a_file) is None


def test_a_path_rule_only_for_an_existing_regular_file(tmp_path: Path) -> None:
    """Claude Code reads a path rule with gitignore semantics: a directory's covers its
    subtree. Real files and directories, checked with the uplink's own lstat check."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "secret.key").write_text("k")
    plain = tmp_path / "notes.txt"
    plain.write_text("n")
    link = tmp_path / "link.txt"
    link.symlink_to(plain)
    dir_link = tmp_path / "dir-link"
    dir_link.symlink_to(folder)
    for tool in ("Read", "Edit", "Write"):
        assert session_rule(tool, {"file_path": str(plain)}, regular_file) == {
            "toolName": "Read" if tool == "Read" else "Edit",
            "ruleContent": "/" + str(plain),
        }
        for not_a_file in (folder, link, dir_link, tmp_path / "missing.txt", Path("/dev/null")):
            assert session_rule(tool, {"file_path": str(not_a_file)}, regular_file) is None, (
                tool,
                not_a_file,
            )
    assert session_rule("Read", {"file_path": str(plain) + "\x00"}, regular_file) is None
    # Without the check there is no path rule at all.
    assert session_rule("Read", {"file_path": str(plain)}) is None


@pytest.mark.parametrize(
    ("tool", "tool_input"),
    [
        ("Bash", {"command": "rm *.o"}),  # '*' would make it a wildcard rule
        ("Bash", {"command": "  "}),
        ("Bash", {}),
        ("Write", {"file_path": "relative/a.txt"}),
        ("Write", {"file_path": "/w/*.txt"}),
        ("Edit", {"file_path": "/w/[ab].txt"}),
        ("Edit", {"file_path": 7}),
        ("Write", "not an object"),
    ],
)
def test_no_rule_when_the_use_cannot_be_named_exactly(tool: str, tool_input: object) -> None:
    assert session_rule(tool, tool_input) is None  # type: ignore[arg-type]


def test_prompt_answers() -> None:
    tool_input = {"command": "ls"}
    approve = prompt_answer(Outcome("r", Decision.APPROVE, Reason.GATEWAY), "Bash", tool_input)
    assert approve == {"behavior": "allow", "updatedInput": tool_input}
    always = prompt_answer(Outcome("r", Decision.ALWAYS_ALLOW, Reason.GATEWAY), "Bash", tool_input)
    assert always["updatedPermissions"] == [
        {
            "type": "addRules",
            "rules": [{"toolName": "Bash", "ruleContent": "ls"}],
            "behavior": "allow",
            "destination": "session",
        }
    ]
    # No exact rule: still allowed, nothing remembered.
    wild = prompt_answer(
        Outcome("r", Decision.ALWAYS_ALLOW, Reason.GATEWAY), "Bash", {"command": "ls *"}
    )
    assert wild == {"behavior": "allow", "updatedInput": {"command": "ls *"}}
    for reason in Reason:
        deny = prompt_answer(Outcome("r", Decision.DENY, reason), "Bash", tool_input)
        assert deny == {"behavior": "deny", "message": DENY_MESSAGES[reason]}


def test_hook_shapes() -> None:
    deny = {"behavior": "deny", "message": "no"}
    assert hook_answer("PreToolUse", deny) == {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": "no",
        }
    }
    assert hook_answer("PermissionRequest", deny) == {
        "hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": deny}
    }


def test_parse_hook() -> None:
    call = parse_hook(
        {
            "hook_event_name": "PreToolUse",
            "tool_name": "Bash",
            "tool_input": {"command": "x"},
            "tool_use_id": "toolu_1",
        }
    )
    assert (call.event, call.tool_name, call.tool_input, call.tool_use_id) == (
        "PreToolUse",
        "Bash",
        {"command": "x"},
        "toolu_1",
    )
    assert (
        parse_hook({"hook_event_name": "PermissionRequest", "tool_name": "Bash"}).tool_use_id
        is None
    )
    for bad in (
        [],
        {"hook_event_name": "Stop", "tool_name": "Bash"},
        {"hook_event_name": "PreToolUse", "tool_name": 3},
    ):
        with pytest.raises(ValueError, match=r"hook input|hook_event_name|tool_name"):
            parse_hook(bad)  # type: ignore[arg-type]
