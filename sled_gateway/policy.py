"""Which rule answers a permission request: pure matching over the active rules, in memory.

A rule is ``(project or every sled, tool, key or any use, allow | deny)``; the
key of a use is :func:`rule_key`'s (the exact ``Bash`` command, the path a
file tool touches, or nothing for other tools). :class:`Policy` holds the
active rules and answers :meth:`Policy.match` without I/O, because every
``perm_request`` is matched on the event loop. Whoever commits a rule change
(the store) tells the policy afterwards, so the policy never holds a rule the
database does not.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol import JSON
from sled_gateway.store.models import ALLOW, DENY, Rule

#: Tools whose narrowest key is the file they touch, and the input field naming it.
FILE_TOOLS: dict[str, tuple[str, ...]] = {
    "Read": ("file_path",),
    "Write": ("file_path",),
    "Edit": ("file_path",),
    "MultiEdit": ("file_path",),
    "NotebookEdit": ("notebook_path", "file_path"),
}

_Slot = tuple[str | None, str, str | None]  # (project or None, tool, key or None)


def rule_key(tool_name: str, tool_input: JSON) -> tuple[bool, str | None]:
    """The narrowest key a rule for this use can have: ``(usable, key)``.

    ``Bash`` → the exact command; a file tool → the file's path; any other
    tool → None (the tool alone). ``usable`` is False when the tool needs a
    key and the input has none, so no rule is made that is broader than the
    use the operator saw.
    """
    fields: tuple[str, ...] = ()
    if tool_name == "Bash":
        fields = ("command",)
    elif tool_name in FILE_TOOLS:
        fields = FILE_TOOLS[tool_name]
    else:
        return True, None
    if isinstance(tool_input, dict):
        for name in fields:
            value = tool_input.get(name)
            if isinstance(value, str) and value:
                return True, value
    return False, None


class Policy:
    """The active rules, indexed for :meth:`match`; not thread-safe (one owner thread)."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._slots: dict[_Slot, dict[str, Rule]] = {}
        for rule in rules:
            self.add(rule)

    def __len__(self) -> int:
        return sum(len(actions) for actions in self._slots.values())

    def add(self, rule: Rule) -> None:
        """Make an active rule match (a revoked one is ignored)."""
        if rule.revoked_at is None:
            self._slots.setdefault((rule.project, rule.tool_name, rule.key), {})[rule.action] = rule

    def remove(self, rule: Rule) -> None:
        """Stop ``rule`` matching (by id: another rule in the same place stays)."""
        slot = (rule.project, rule.tool_name, rule.key)
        actions = self._slots.get(slot)
        if actions is not None and actions.get(rule.action, rule).id == rule.id:
            actions.pop(rule.action, None)
            if not actions:
                del self._slots[slot]

    def match(self, project: str, tool_name: str, tool_input: JSON) -> Rule | None:
        """The active rule that answers this request, if any (a deny beats an allow).

        Looked up from the narrowest to the broadest: this sled's exact key,
        this sled's whole tool, then the same for rules made for every sled.
        """
        usable, key = rule_key(tool_name, tool_input)
        keys = ([key] if usable and key is not None else []) + [None]
        found: Rule | None = None
        for scope in (project, None):
            for k in keys:
                actions = self._slots.get((scope, tool_name, k))
                if not actions:
                    continue
                if DENY in actions:
                    return actions[DENY]
                found = found or actions.get(ALLOW)
        return found
