"""``can_use_tool`` for agents written against the Claude Agent SDK (``claude-agent-sdk``).

::

    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient
    from actors.agent_sdk import can_use_tool

    with Uplink(config) as uplink:            # or: async with Uplink(config) as uplink
        options = ClaudeAgentOptions(can_use_tool=can_use_tool(uplink))

Each permission Claude Code would ask about goes to the gateway, with the
tool use's id as the request id. approve → allow with the input unchanged;
always_allow → the same plus the narrowest session rule (the exact Bash
command, the file path, or the tool); deny, timeout and any trouble → deny
with the uplink's message. Claude Code's own suggestions (``context.suggestions``)
go with the request, for the gateway to offer on its "always allow". The SDK
is imported when a decision is made, so the uplink does not depend on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from actors.claude_code import ask
from protocol.claude_code import claude_suggestions

if TYPE_CHECKING:
    from actors.system import Uplink


def can_use_tool(uplink: Uplink) -> Callable[[str, dict[str, Any], Any], Awaitable[Any]]:
    """A ``can_use_tool`` callback that asks ``uplink`` (started, in any loop)."""

    async def decide(tool_name: str, tool_input: dict[str, Any], context: Any) -> Any:
        from claude_agent_sdk.types import (
            PermissionResultAllow,
            PermissionResultDeny,
            PermissionRuleValue,
            PermissionUpdate,
        )

        request_id = getattr(context, "tool_use_id", None) or None
        answer = await ask(
            uplink.arequest_permission,
            tool_name,
            tool_input,
            request_id,
            abandon=uplink.abandon,
            suggestions=_suggestions(context),
        )
        if answer["behavior"] != "allow":
            return PermissionResultDeny(message=answer["message"])
        updates = [
            PermissionUpdate(
                type="addRules",
                rules=[
                    PermissionRuleValue(
                        tool_name=rule["toolName"], rule_content=rule.get("ruleContent")
                    )
                    for rule in update["rules"]
                ],
                behavior="allow",
                destination="session",
            )
            for update in answer.get("updatedPermissions", [])
        ]
        return PermissionResultAllow(
            updated_input=answer["updatedInput"], updated_permissions=updates or None
        )

    return decide


def _suggestions(context: Any) -> tuple[str, ...]:
    """The SDK's ``context.suggestions`` (``PermissionUpdate`` objects) as the rule texts
    forwarded to the gateway; one that cannot be read is left out."""
    wire: list[Any] = []
    for update in getattr(context, "suggestions", None) or []:
        try:
            wire.append(update.to_dict() if hasattr(update, "to_dict") else update)
        except (ValueError, TypeError):
            continue
    return claude_suggestions(wire)
