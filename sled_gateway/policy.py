"""Which rule answers a permission request: pure matching over the active rules, in memory.

A rule is ``(project or every sled, tool, key or any use, allow | deny)``. The
key "always allow" makes is :func:`rule_key`: the WHOLE input the person saw
(canonical JSON, prefixed ``input:``), minus the fields in
:data:`COSMETIC_FIELDS` that change nothing the tool does; so a ``Write`` of
other content, a ``Bash`` command with ``dangerouslyDisableSandbox`` or
``run_in_background``, or an MCP tool with other arguments is asked again.
Keys of the older kind (a ``Bash`` command, a file tool's path; rules made
before, or over the API) still match as they always did: :func:`legacy_key`.
:class:`Policy` holds the active rules and answers :meth:`Policy.match`
without I/O, because every ``perm_request`` is matched on the event loop.
Whoever commits a rule change (the store) tells the policy afterwards, so the
policy never holds a rule the database does not.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol import JSON, canonical_json, input_sha256
from sled_gateway.store.models import ALLOW, DENY, INPUT_HASH_KEY, INPUT_KEY, Rule

#: Input fields that change nothing the tool does, per tool: left out of an
#: always-allow key, so a repeat worded differently is still covered. Only what
#: is known to be inert is here; every other field counts (``timeout``,
#: ``run_in_background``, ``dangerouslyDisableSandbox``, contents, MCP arguments).
COSMETIC_FIELDS: dict[str, frozenset[str]] = {
    "Bash": frozenset({"description"}),  # Claude Code's note for the person, not run
}

#: Longest canonical input kept as text in a key; a longer one is keyed by its hash.
MAX_KEY_TEXT = 4000

#: Tools whose narrowest key is the file they touch, and the input field naming it.
FILE_TOOLS: dict[str, tuple[str, ...]] = {
    "Read": ("file_path",),
    "Write": ("file_path",),
    "Edit": ("file_path",),
    "MultiEdit": ("file_path",),
    "NotebookEdit": ("notebook_path", "file_path"),
}

_Slot = tuple[str | None, str, str | None]  # (project or None, tool, key or None)


def rule_key(tool_name: str, tool_input: JSON) -> str:
    """The key of an always-allow rule for exactly this use (and the one it is matched by).

    ``input:`` + the canonical JSON of ``tool_input`` without the tool's
    :data:`COSMETIC_FIELDS`, or ``input-sha256:`` + its hash when that is
    longer than :data:`MAX_KEY_TEXT` characters.
    """
    cosmetic = COSMETIC_FIELDS.get(tool_name, frozenset())
    kept = tool_input
    if cosmetic and isinstance(tool_input, dict):
        kept = {k: v for k, v in tool_input.items() if k not in cosmetic}
    text = canonical_json(kept)
    if len(text) > MAX_KEY_TEXT:
        return INPUT_HASH_KEY + input_sha256(kept)
    return INPUT_KEY + text


def legacy_key(tool_name: str, tool_input: JSON) -> str | None:
    """The key of the older kind this use matches: the ``Bash`` command or the file
    tool's path; None for other tools or when the input has none.

    A value that itself starts like an input key is never looked up as one, so a
    command spelled ``input:{…}`` cannot borrow the rule of that input.
    """
    fields: tuple[str, ...] = ()
    if tool_name == "Bash":
        fields = ("command",)
    elif tool_name in FILE_TOOLS:
        fields = FILE_TOOLS[tool_name]
    if isinstance(tool_input, dict):
        for name in fields:
            value = tool_input.get(name)
            if isinstance(value, str) and value:
                if value.startswith((INPUT_KEY, INPUT_HASH_KEY)):
                    return None
                return value
    return None


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

        Looked up from the narrowest to the broadest: this sled's exact input,
        its command or path (older keys), its whole tool, then the same for rules
        made for every sled.
        """
        legacy = legacy_key(tool_name, tool_input)
        keys = [rule_key(tool_name, tool_input), *([legacy] if legacy is not None else []), None]
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
