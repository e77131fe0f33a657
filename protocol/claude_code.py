"""Claude Code's permission vocabulary: answers, session rules, hook shapes.

Pure functions from an :class:`Outcome` to what Claude Code reads, shared by
the MCP permission tool, the hook endpoint, the ``hook`` command (which must
start fast, so it imports nothing heavier than this package) and the Agent
SDK adapter. An allow carries ``updatedInput`` (required by Claude Code); an
always-allow adds the narrowest session rule that names this use exactly, or
none when it cannot be named exactly; a deny carries the uplink's message.

Whether a path is a regular file is a question for the file system, asked by
the caller (``regular_file``), so this module stays free of I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.decisions import Decision, Outcome
from protocol.envelope import JSON
from protocol.frames import MAX_SUGGESTION_CHARS, MAX_SUGGESTIONS

TOOL_NAME = "permission_prompt"
SERVER_NAME = "sled"  # the --mcp-config key: the tool is mcp__sled__permission_prompt
PROMPT_TOOL = f"mcp__{SERVER_NAME}__{TOOL_NAME}"

# Tools an always-allow names a session rule for: Bash by its exact command, a
# file tool by its path (under Read or Edit, the two tools Claude Code matches
# paths for; an absolute path is written with a leading ``//``). The spelling
# is protocol.rules', the one grammar the gateway matches with too; a command
# or path it cannot spell exactly gets no rule (the approval still stands for
# this call; the next one asks again).
_RULE_TOOLS = frozenset(
    {"Bash", "Read", "NotebookRead", "Edit", "MultiEdit", "Write", "NotebookEdit"}
)


#: Asked whether a path names an existing regular file (not a directory, not a symlink).
RegularFile = Callable[[str], bool]


def session_rule(
    tool_name: str, tool_input: JSON, regular_file: RegularFile | None = None
) -> dict[str, str] | None:
    """The narrowest session allow rule for this use, or None when none is exact.

    ``Bash`` → the exact command; a file tool → its absolute path (under
    ``Read`` or ``Edit``, the two tools Claude Code matches paths for), only
    when ``regular_file(path)`` says it is an existing regular file: Claude
    Code reads a path rule with gitignore semantics, so a directory's would
    cover its whole subtree, and a symlink's or a missing file's names
    something else later. Without ``regular_file``, or for any other tool, no
    rule: a rule for the tool alone would cover every input of it, and the
    gateway's own rule (keyed on the whole input) answers the repeats anyway.
    """
    # The rule grammar loads tree-sitter: imported here so the hook command,
    # which never builds a session rule, starts without it.
    from protocol.rules import PATH_FIELDS, exact_rule, parse_rule

    fields = tool_input if isinstance(tool_input, dict) else {}
    if tool_name != "Bash":
        path = fields.get(PATH_FIELDS.get(tool_name, ""))
        if not isinstance(path, str) or regular_file is None:
            return None
    text = exact_rule(tool_name, tool_input) if tool_name in _RULE_TOOLS else None
    if text is None:
        return None
    if tool_name != "Bash" and (regular_file is None or not regular_file(str(path))):
        return None
    rule = parse_rule(text)
    if rule.specifier is None:
        return None
    return {"toolName": rule.tool, "ruleContent": rule.specifier}


def updated_permissions(
    tool_name: str, tool_input: JSON, regular_file: RegularFile | None = None
) -> list[dict[str, Any]]:
    """``updatedPermissions`` for an always-allow: one session rule, or none."""
    rule = session_rule(tool_name, tool_input, regular_file)
    if rule is None:
        return []
    return [{"type": "addRules", "rules": [rule], "behavior": "allow", "destination": "session"}]


def prompt_answer(
    outcome: Outcome, tool_name: str, tool_input: JSON, regular_file: RegularFile | None = None
) -> dict[str, Any]:
    """The permission-prompt answer (``behavior`` allow or deny) for an outcome
    (``regular_file``: see :func:`session_rule`)."""
    if outcome.decision is Decision.DENY:
        return deny_answer(outcome.message)
    answer: dict[str, Any] = {"behavior": "allow", "updatedInput": tool_input}
    if outcome.decision is Decision.ALWAYS_ALLOW:
        rules = updated_permissions(tool_name, tool_input, regular_file)
        if rules:
            answer["updatedPermissions"] = rules
    return answer


def deny_answer(message: str) -> dict[str, Any]:
    return {"behavior": "deny", "message": message}


def hook_answer(event: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A permission-prompt answer in the shape of a hook's output for ``event``."""
    if event == "PreToolUse":
        allowed = answer["behavior"] == "allow"
        return {
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": "allow" if allowed else "deny",
                "permissionDecisionReason": (
                    "Approved through the sled's gateway." if allowed else answer["message"]
                ),
            }
        }
    return {"hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": answer}}


HOOK_EVENTS = ("PreToolUse", "PermissionRequest")


@dataclass(frozen=True, slots=True)
class HookCall:
    event: str
    tool_name: str
    tool_input: JSON
    tool_use_id: str | None
    #: Claude Code's own allow-rule suggestions (PermissionRequest only), as rule texts.
    suggestions: tuple[str, ...] = ()


def claude_suggestions(permission_suggestions: JSON) -> tuple[str, ...]:
    """Claude Code's ``permission_suggestions`` as the rule texts the gateway may offer.

    Only ``addRules`` with ``behavior: allow`` and a rule that names its use
    (``{"toolName": "Bash", "ruleContent": "npm test:*"}`` → ``Bash(npm test:*)``)
    are kept: a mode change or a directory is nothing a gateway rule can hold,
    and a rule for a whole tool is never offered. The gateway parses and checks
    every text again (it must cover the request it comes with), so this only
    spells them; what is malformed is skipped.
    """
    if not isinstance(permission_suggestions, list):
        return ()
    found: list[str] = []
    for update in permission_suggestions:
        if not isinstance(update, dict) or update.get("type") != "addRules":
            continue
        if update.get("behavior") != "allow" or not isinstance(update.get("rules"), list):
            continue
        for rule in update["rules"]:
            if not isinstance(rule, dict):
                continue
            tool, content = rule.get("toolName"), rule.get("ruleContent")
            if not isinstance(tool, str) or not tool or not isinstance(content, str) or not content:
                continue
            text = f"{tool}({content})"
            if len(text) <= MAX_SUGGESTION_CHARS and text not in found:
                found.append(text)
            if len(found) == MAX_SUGGESTIONS:
                return tuple(found)
    return tuple(found)


def parse_hook(body: JSON) -> HookCall:
    """The parts of a Claude Code hook JSON the uplink needs; ValueError if unusable."""
    if not isinstance(body, dict):
        raise ValueError("the hook input must be a JSON object")  # noqa: TRY004 (bad input)
    event = body.get("hook_event_name")
    if event not in HOOK_EVENTS:
        raise ValueError(f"hook_event_name must be one of {', '.join(HOOK_EVENTS)}")
    tool_name = body.get("tool_name")
    if not isinstance(tool_name, str) or not tool_name.strip():
        raise ValueError("tool_name must be a non-empty string")
    tool_use_id = body.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        tool_use_id = None
    suggestions = (
        claude_suggestions(body.get("permission_suggestions"))
        if event == "PermissionRequest"
        else ()
    )
    return HookCall(str(event), tool_name, body.get("tool_input", {}), tool_use_id, suggestions)


def trouble_message(problem: str) -> str:
    return f"Denied: the uplink could not forward the request ({problem})."
