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

Rules in Claude Code's grammar (``Rule.rule``, e.g. ``Bash(npm test:*)``) are
matched by :class:`protocol.rules.RuleSet`, which parses a Bash command as
shell. They are kept as one rule set per scope: the fleet's (``project``
None) and, for a project with rules of its own, the fleet's and that
project's together, so every part of a compound command may be allowed by a
rule of either scope. Exact rows and grammar rules are weighed together:
deny, then ask, then allow. An ``ask`` match, no match, or a command that
cannot be parsed leaves the request to a person; a call with
``dangerouslyDisableSandbox`` is never allowed by any rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from loguru import logger

from protocol import JSON, canonical_json, input_sha256
from protocol.rules import (
    Action,
    PermissionRule,
    RuleSet,
    Verdict,
    exact_rule,
    parse_rule,
    prefix_rule,
)
from sled_gateway.store.models import ALLOW, ASK, DENY, INPUT_HASH_KEY, INPUT_KEY, Rule

log = logger.bind(actor="gateway")

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


def sandbox_off(tool_input: JSON) -> bool:
    """Whether the call asks to run outside the sandbox: never allowed by a rule."""
    return isinstance(tool_input, dict) and tool_input.get("dangerouslyDisableSandbox") is True


#: A rule longer than this is not offered on a card: a person cannot check it at
#: a glance, a pending item's size in ``/api/state`` stays bounded, and a Bash
#: rule that long could only name commands over the 10,000 characters no rule
#: allows. "Always allow" of the exact input stays available.
MAX_SUGGESTED_RULE_CHARS = 2_000


def suggested_rules(
    tool_name: str, tool_input: JSON, sled: Iterable[str] = ()
) -> tuple[tuple[str, str], ...]:
    """What "always allow" may offer for this use: ``(rule, kind)``, the exact rule
    first, then the prefix rule (each only when the grammar can spell a safe one),
    then the rules the sled's agent suggested (``claude``: Claude Code's
    ``permission_suggestions``), each only when it parses, names more than a
    whole tool and allows this very request: a sled cannot get a card to offer
    a rule for something else."""
    found: list[tuple[str, str]] = []
    try:
        for text, kind in (
            (exact_rule(tool_name, tool_input), "exact"),
            (prefix_rule(tool_name, tool_input), "prefix"),
        ):
            if _offerable(text, found):
                assert text is not None
                found.append((text, kind))
    except Exception:  # a suggestion is a convenience: never a reason to fail a request
        log.opt(exception=True).warning("no rule suggestions for a {} request", tool_name)
    for offered in sled:
        text = _covering(offered, tool_name, tool_input)
        if _offerable(text, found):
            assert text is not None
            found.append((text, "claude"))
    return tuple(found)


def _offerable(text: str | None, found: list[tuple[str, str]]) -> bool:
    return (
        text is not None
        and len(text) <= MAX_SUGGESTED_RULE_CHARS
        and all(text != seen for seen, _ in found)
    )


def _covering(text: str, tool_name: str, tool_input: JSON) -> str | None:
    """``text``'s canonical spelling when, as an allow rule, it allows this request; else None."""
    try:
        parsed = parse_rule(text)
        if parsed.specifier is None:
            return None
        verdict = RuleSet([(0, parsed, cast(Action, ALLOW))]).evaluate(tool_name, tool_input)
    except Exception:  # a rule that does not parse, or an input the matcher cannot read
        return None
    return parsed.text if verdict.action == ALLOW else None


def grammar_tool(text: str) -> str:
    """The tool a grammar rule names (``Bash`` of ``Bash(ls *)``), for the row's ``tool_name``."""
    return text.split("(", 1)[0].strip()


@dataclass(frozen=True, slots=True)
class PartOutcome:
    """One simple command of a Bash call, and the rule that matched it (if any)."""

    command: str
    action: str | None
    rule: Rule | None
    reason: str | None

    def to_json(self) -> dict[str, JSON]:
        return {
            "command": self.command,
            "action": self.action,
            "rule": None if self.rule is None else self.rule.to_json(),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the rules make of one request, and why.

    ``action``: ``allow`` or ``deny`` (a rule answers at once), ``ask`` (an ask
    rule matched: a person decides) or None (no rule: a person decides).
    ``would_allow``: the allow rule that matched but was overruled (by the
    sandbox flag), for the pending card.
    """

    action: str | None
    rule: Rule | None
    reasons: tuple[str, ...] = ()
    parts: tuple[PartOutcome, ...] = ()
    would_allow: Rule | None = None

    @property
    def decides(self) -> Rule | None:
        """The rule that answers the request without a person (allow or deny), if any."""
        return self.rule if self.action in (ALLOW, DENY) else None

    def to_json(self) -> dict[str, JSON]:
        human = self.action not in (ALLOW, DENY)
        return {
            "action": self.action,
            "decision": "a person decides" if human else self.action,
            "pending": human,
            "rule": None if self.rule is None else self.rule.to_json(),
            "reasons": list(self.reasons),
            "parts": [p.to_json() for p in self.parts],
            "would_match": None if self.would_allow is None else self.would_allow.to_json(),
        }


@dataclass(slots=True)
class _Grammar:
    """The grammar rules of one scope, parsed once; the rule set is built when first used."""

    parsed: dict[int, tuple[PermissionRule, Rule]] = field(default_factory=dict)


class Policy:
    """The active rules, indexed for :meth:`match`; not thread-safe (one owner thread)."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._slots: dict[_Slot, dict[str, Rule]] = {}
        self._grammar: dict[str | None, _Grammar] = {}
        # Rule sets by the project they serve (None: the fleet's alone), rebuilt after a change.
        self._sets: dict[str | None, tuple[RuleSet, dict[int | str, Rule]]] = {}
        for rule in rules:
            self.add(rule)

    def __len__(self) -> int:
        exact = sum(len(actions) for actions in self._slots.values())
        return exact + sum(len(g.parsed) for g in self._grammar.values())

    def add(self, rule: Rule) -> None:
        """Make an active rule match (a revoked one is ignored).

        A grammar rule whose text no longer parses (a stricter release) is
        logged and left out: it matches nothing, so it allows nothing.
        """
        if rule.revoked_at is not None:
            return
        if rule.rule is None:
            self._slots.setdefault((rule.project, rule.tool_name, rule.key), {})[rule.action] = rule
            return
        try:
            parsed = parse_rule(rule.rule)
        except ValueError as exc:
            log.warning(
                "rule {} ({!r}) does not parse and matches nothing: {}", rule.id, rule.rule, exc
            )
            return
        self._grammar.setdefault(rule.project, _Grammar()).parsed[rule.id] = (parsed, rule)
        self._sets.clear()

    def remove(self, rule: Rule) -> None:
        """Stop ``rule`` matching (by id: another rule in the same place stays)."""
        if rule.rule is not None:
            scope = self._grammar.get(rule.project)
            if scope is not None and scope.parsed.pop(rule.id, None) is not None:
                if not scope.parsed:
                    del self._grammar[rule.project]
                self._sets.clear()
            return
        slot = (rule.project, rule.tool_name, rule.key)
        actions = self._slots.get(slot)
        if actions is not None and actions.get(rule.action, rule).id == rule.id:
            actions.pop(rule.action, None)
            if not actions:
                del self._slots[slot]

    def _rule_set(self, project: str | None) -> tuple[RuleSet, dict[int | str, Rule]] | None:
        """The rule set for ``project`` (the fleet's and its own), None without grammar rules."""
        scope = project if project in self._grammar else None
        if scope is None and None not in self._grammar:
            return None
        built = self._sets.get(scope)
        if built is None:
            entries: dict[int, tuple[PermissionRule, Rule]] = {}
            for where in {None, scope}:
                entries.update(self._grammar.get(where, _Grammar()).parsed)
            by_id: dict[int | str, Rule] = {rid: rule for rid, (_, rule) in entries.items()}
            rule_set = RuleSet(
                (rid, parsed, cast(Action, rule.action)) for rid, (parsed, rule) in entries.items()
            )
            built = (rule_set, by_id)
            self._sets[scope] = built
        return built

    def _exact(
        self, project: str, tool_name: str, tool_input: JSON
    ) -> tuple[Rule | None, Rule | None]:
        """The exact rows that match: (a deny, an allow), each None when there is none."""
        legacy = legacy_key(tool_name, tool_input)
        keys = [rule_key(tool_name, tool_input), *([legacy] if legacy is not None else []), None]
        allow: Rule | None = None
        for scope in (project, None):
            for k in keys:
                actions = self._slots.get((scope, tool_name, k))
                if not actions:
                    continue
                if DENY in actions:
                    return actions[DENY], None
                allow = allow or actions.get(ALLOW)
        return None, allow

    def _verdict(
        self, project: str, tool_name: str, tool_input: JSON
    ) -> tuple[Verdict, dict[int | str, Rule]] | None:
        built = self._rule_set(project)
        if built is None:
            return None
        rule_set, by_id = built
        try:
            return rule_set.evaluate(tool_name, tool_input), by_id
        except Exception:  # a matcher bug must leave the request to a person, never fail it
            log.opt(exception=True).error("rule evaluation failed for a {} request", tool_name)
            return None

    def explain(self, project: str, tool_name: str, tool_input: JSON) -> Outcome:
        """What the rules make of this request, with the rule that decides and why."""
        deny, allow = self._exact(project, tool_name, tool_input)
        if deny is not None:
            return Outcome(DENY, deny, (f"exact rule {deny.id} denies it",))
        found = self._verdict(project, tool_name, tool_input)
        verdict, by_id = found if found is not None else (None, {})
        parts: tuple[PartOutcome, ...] = ()
        reasons: tuple[str, ...] = ()
        if verdict is not None:
            reasons = tuple(verdict.reasons)
            parts = tuple(
                PartOutcome(
                    p.command,
                    p.action,
                    by_id.get(p.rule_id) if p.rule_id is not None else None,
                    p.reason,
                )
                for p in verdict.parts
            )
            grammar_rule = by_id.get(verdict.rule_id) if verdict.rule_id is not None else None
            if verdict.action == DENY:
                return Outcome(DENY, grammar_rule, reasons, parts)
            if verdict.action == ASK:
                return Outcome(ASK, grammar_rule, reasons, parts)
            if verdict.action == ALLOW and allow is None:
                allow = grammar_rule
        if allow is None and sandbox_off(tool_input) and isinstance(tool_input, dict):
            # The matcher never allows this call; for the pending card, the rule that
            # would have, had the call stayed in the sandbox (rare: one more evaluation).
            inside = {k: v for k, v in tool_input.items() if k != "dangerouslyDisableSandbox"}
            again = self._verdict(project, tool_name, inside)
            if again is not None and again[0].action == ALLOW and again[0].rule_id is not None:
                allow = again[1].get(again[0].rule_id)
        if allow is not None:
            if sandbox_off(tool_input):
                why = "dangerouslyDisableSandbox: a rule never allows running outside the sandbox"
                return Outcome(None, None, (*reasons, why), parts, would_allow=allow)
            return Outcome(ALLOW, allow, reasons or (f"rule {allow.id} allows it",), parts)
        return Outcome(None, None, reasons or ("no rule matches",), parts)

    def match(self, project: str, tool_name: str, tool_input: JSON) -> Rule | None:
        """The active rule that answers this request at once (allow or deny), if any.

        Deny, then ask, then allow, over this sled's rules and the fleet's,
        exact rows and grammar rules alike; an ``ask`` match is None (a person).
        """
        if not self._grammar:
            deny, allow = self._exact(project, tool_name, tool_input)
            if deny is not None:
                return deny
            return None if allow is None or sandbox_off(tool_input) else allow
        return self.explain(project, tool_name, tool_input).decides
