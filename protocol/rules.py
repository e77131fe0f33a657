"""Claude Code's permission-rule grammar, and a rule set that answers tool calls with it.

Pure: text and JSON in, values out. The grammar is the one Claude Code's
permission documentation states: ``Tool`` or ``Tool(specifier)``; Bash
specifiers with ``*`` wildcards (``Bash(ls *)`` matches ``ls`` and ``ls -la``,
not ``lsof``) and the legacy ``:*`` suffix; ``Read``/``Edit``/``Write`` path
globs with gitignore semantics, ``//`` starting an absolute path;
``WebFetch(domain:…)``; ``mcp__server``, ``mcp__server__*`` and
``mcp__server__tool``; ``Agent(name)``/``Task(name)``.

Where the gateway differs from Claude Code it is stricter, never looser: it has
no working directory and no home directory of the sled's user, so a path rule
that is not absolute (``src/**``, ``./x``, ``/x`` which Claude Code reads from
the project root, ``~/x``) is refused; and a Bash command is read as shell
(:mod:`protocol.shell`), every simple command of it answered on its own.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

import pathspec

from protocol.envelope import JSON
from protocol.shell import ParsedCommand, SimpleCommand, parse_command

Action = Literal["allow", "ask", "deny"]
ACTIONS: tuple[Action, ...] = ("deny", "ask", "allow")

#: Tools a ``Read(...)`` / ``Edit(...)`` rule (or the bare tool name) covers, like Claude Code.
FAMILIES: dict[str, frozenset[str]] = {
    "Read": frozenset({"Read", "NotebookRead"}),
    "Edit": frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"}),
}
#: The input field holding the path, per file tool.
PATH_FIELDS: dict[str, str] = {
    "Read": "file_path",
    "NotebookRead": "notebook_path",
    "Edit": "file_path",
    "Write": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
}
_PATH_TOOLS = frozenset({"Read", "Edit", "Write", "MultiEdit", "NotebookEdit", "NotebookRead"})
_AGENT_TOOLS = frozenset({"Agent", "Task"})
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST = re.compile(
    r"^(?:\*\.)?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$"
)


class RuleSyntaxError(ValueError):
    """A rule that does not parse: ``position`` (0-based, in the text given) and ``reason``."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"position {position}: {reason}")
        self.position = position
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PermissionRule:
    """One rule: ``tool``, its ``specifier`` (None: every use of the tool), and
    ``text``, the canonical spelling."""

    tool: str
    specifier: str | None
    text: str


def parse_rule(text: str) -> PermissionRule:
    """Parse one rule in Claude Code's grammar; :class:`RuleSyntaxError` when it does not parse."""
    if not isinstance(text, str):
        raise RuleSyntaxError(0, "a rule is a string")
    offset = len(text) - len(text.lstrip())
    body = text.strip()
    if not body:
        raise RuleSyntaxError(0, "the rule is empty")
    bad = _CONTROL.search(body)
    if bad:
        raise RuleSyntaxError(offset + bad.start(), "a control character")
    name = _TOOL_NAME.match(body)
    if name is None:
        raise RuleSyntaxError(offset, "a rule starts with a tool name")
    tool = name.group()
    end = name.end()
    if tool.startswith("mcp__") and body[end:] == "*" and tool.endswith("__"):
        # mcp__server__* : every tool of the server, the same as mcp__server.
        tool = tool[:-2]
        end = len(body)
    if end == len(body):
        return _checked(PermissionRule(tool, None, tool), offset)
    if body[end] != "(":
        raise RuleSyntaxError(offset + end, f"unexpected {body[end]!r} after the tool name")
    if not body.endswith(")"):
        close = body.rfind(")")
        if close > end:
            raise RuleSyntaxError(offset + close + 1, "text after the closing ')'")
        raise RuleSyntaxError(offset + len(body), "the specifier is not closed with ')'")
    specifier = body[end + 1 : -1]
    if not specifier:
        raise RuleSyntaxError(offset + end + 1, "the specifier is empty")
    if tool == "Bash" and specifier == "*":
        return PermissionRule("Bash", None, "Bash")
    rule = PermissionRule(tool, specifier, f"{tool}({specifier})")
    return _checked(rule, offset + end + 1)


def _checked(rule: PermissionRule, at: int) -> PermissionRule:
    """Refuse what the gateway cannot match (``at``: where the specifier starts)."""
    tool, spec = rule.tool, rule.specifier
    if tool.startswith("mcp__"):
        if spec is not None:
            raise RuleSyntaxError(at, "an MCP rule takes no specifier")
        if len(tool) <= len("mcp__") or "__" not in tool or tool.endswith("_"):
            raise RuleSyntaxError(0, "an MCP rule is mcp__server or mcp__server__tool")
        return rule
    if spec is None:
        return rule
    try:
        _compile(rule)
    except _Refused as refused:
        raise RuleSyntaxError(at + refused.position, refused.reason) from None
    return rule


class _Refused(Exception):
    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


# Matchers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bash:
    exact: str | None
    regex: re.Pattern[str] | None
    first_word: str | None

    def matches(self, text: str) -> bool:
        if self.exact is not None:
            return text == self.exact
        assert self.regex is not None
        return self.regex.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class _Path:
    spec: pathspec.PathSpec[Any]
    # The literal directory the pattern starts with ("/home/u/src" for
    # //home/u/src/**/*.py): only paths at or under it can match.
    anchor: str

    def matches(self, path: str) -> bool:
        return bool(self.spec.match_file(path.lstrip("/")))


@dataclass(frozen=True, slots=True)
class _Domain:
    host: str
    subdomains: bool

    def matches(self, host: str) -> bool:
        if self.subdomains:
            return host.endswith("." + self.host)
        return host == self.host


@dataclass(frozen=True, slots=True)
class _Name:
    name: str


_Matcher = _Bash | _Path | _Domain | _Name


@lru_cache(maxsize=65536)
def _compile(rule: PermissionRule) -> _Matcher:
    spec = rule.specifier
    assert spec is not None
    if rule.tool == "Bash":
        return _bash(spec)
    if rule.tool in _PATH_TOOLS:
        return _path(spec)
    if rule.tool == "WebFetch":
        if not spec.startswith("domain:"):
            raise _Refused(0, "a WebFetch rule is WebFetch(domain:host)")
        host = spec[len("domain:") :].lower().rstrip(".")
        if not _HOST.match(host):
            raise _Refused(len("domain:"), f"{host!r} is not a host name")
        if host.startswith("*."):
            return _Domain(host[2:], True)
        return _Domain(host, False)
    if rule.tool in _AGENT_TOOLS:
        return _Name(spec)
    raise _Refused(0, f"the gateway knows no specifier for {rule.tool} (use {rule.tool} alone)")


def _bash(spec: str) -> _Bash:
    if spec.endswith(":*"):
        prefix = spec[:-2]
        if not prefix:
            raise _Refused(0, "':*' needs a command before it")
        first = prefix.split(" ", 1)[0]
        return _Bash(None, re.compile(re.escape(prefix) + r"(?: .*)?", re.DOTALL), first)
    if not _has_wildcard(spec):
        return _Bash(spec, None, spec.split(" ", 1)[0])
    out: list[str] = []
    literal: list[str] = []
    seen_wildcard = False
    index = 0
    while index < len(spec):
        char = spec[index]
        if char == "\\" and index + 1 < len(spec) and spec[index + 1] in "*\\":
            out.append(re.escape(spec[index + 1]))
            if not seen_wildcard:
                literal.append(spec[index + 1])
            index += 2
            continue
        if char == "*":
            seen_wildcard = True
            if index == len(spec) - 1 and index > 0 and spec[index - 1] == " " and out:
                # A trailing " *" also matches the bare command: Bash(ls *) matches ls.
                out[-1] = ""
                out.append(r"(?: .*)?")
            else:
                out.append(".*")
            index += 1
            continue
        out.append(re.escape(char))
        if not seen_wildcard:
            literal.append(char)
        index += 1
    head = "".join(literal)
    word = head.split(" ", 1)[0] if " " in head else None
    return _Bash(None, re.compile("".join(out), re.DOTALL), word)


def _has_wildcard(spec: str) -> bool:
    index = 0
    while index < len(spec):
        if spec[index] == "\\" and index + 1 < len(spec):
            index += 2
            continue
        if spec[index] == "*":
            return True
        index += 1
    return False


def _path(spec: str) -> _Path:
    if spec.startswith("~/") or spec == "~":
        raise _Refused(
            0, "a ~/ path: the gateway does not know the sled user's home; write //absolute"
        )
    if not spec.startswith("//"):
        if spec.startswith("/"):
            raise _Refused(
                0, "a /path is relative to the project root in Claude Code; write //absolute"
            )
        raise _Refused(0, "a relative path: the gateway has no working directory; write //absolute")
    pattern = spec[1:]
    if pattern.startswith("//"):
        raise _Refused(2, "more than two leading slashes")
    anchor: list[str] = []
    for component in pattern.strip("/").split("/"):
        if not component or _GLOB_CHARS.search(component):
            break
        anchor.append(component)
    return _Path(pathspec.PathSpec.from_lines("gitignore", [pattern]), "/" + "/".join(anchor))


_GLOB_CHARS = re.compile(r"[*?\[\]\\!]")


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` → ``["/", "/a", "/a/b", "/a/b/c"]``."""
    keys = ["/"]
    at = path.find("/", 1)
    while at > 0:
        keys.append(path[:at])
        at = path.find("/", at + 1)
    if path != "/":
        keys.append(path)
    return keys


# Paths and hosts of an input ----------------------------------------------------------------


def normalize_path(path: str) -> str | None:
    """The absolute path with ``.``, ``..`` and repeated ``/`` resolved (symlinks are
    not: the gateway has no file system); None for a relative or empty path."""
    if not path.startswith("/") or "\x00" in path:
        return None
    normal = posixpath.normpath(path)
    # normpath keeps a leading "//" (POSIX leaves it implementation-defined).
    return "/" + normal.lstrip("/")


def url_host(url: str) -> str | None:
    """The host a fetch of ``url`` reaches, or None when it cannot be told safely."""
    if _CONTROL.search(url) or any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    if "\\" in parts.netloc:
        # Browsers and fetch libraries read "\" as "/", urllib does not: which
        # host is reached is ambiguous.
        return None
    return host.lower().rstrip(".")


# Verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    """How one simple command of a Bash compound was answered."""

    command: str
    action: Action | None
    rule_id: int | str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules say: ``action`` None means no rule decides (a human does)."""

    action: Action | None
    rule_id: int | str | None
    reasons: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Entry:
    position: int
    rule_id: int | str
    rule: PermissionRule
    action: Action
    matcher: _Matcher | None


def _lookup_keys(tool_name: str) -> tuple[str, ...]:
    keys = [tool_name]
    for family, members in FAMILIES.items():
        if tool_name in members and tool_name != family:
            keys.append(family)
    if tool_name.startswith("mcp__"):
        rest = tool_name[len("mcp__") :]
        cut = rest.find("__")
        while cut > 0:
            keys.append("mcp__" + rest[:cut])
            cut = rest.find("__", cut + 2)
    return tuple(keys)


class RuleSet:
    """Rules indexed for answering tool calls: deny, then ask, then allow.

    ``entries``: ``(rule_id, rule, action)`` in order; within one action the
    first matching rule is the one named.
    """

    def __init__(self, entries: Iterable[tuple[int | str, PermissionRule, Action]]) -> None:
        self._by_tool: dict[str, dict[Action, list[_Entry]]] = {}
        # Bash rules with a specifier, by the first word of their pattern when it is literal.
        self._bash_words: dict[Action, dict[str, list[_Entry]]] = {a: {} for a in ACTIONS}
        self._bash_other: dict[Action, list[_Entry]] = {a: [] for a in ACTIONS}
        # Path rules, by tool and the literal directory their pattern starts with.
        self._paths: dict[str, dict[Action, dict[str, list[_Entry]]]] = {}
        self._size = 0
        for position, (rule_id, rule, action) in enumerate(entries):
            if action not in ACTIONS:
                raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
            matcher = None if rule.specifier is None else _compile(rule)
            entry = _Entry(position, rule_id, rule, action, matcher)
            self._size += 1
            if rule.tool == "Bash" and isinstance(matcher, _Bash):
                if matcher.first_word is not None:
                    self._bash_words[action].setdefault(matcher.first_word, []).append(entry)
                else:
                    self._bash_other[action].append(entry)
                continue
            if isinstance(matcher, _Path):
                by_anchor = self._paths.setdefault(rule.tool, {}).setdefault(action, {})
                by_anchor.setdefault(matcher.anchor, []).append(entry)
                continue
            self._by_tool.setdefault(rule.tool, {}).setdefault(action, []).append(entry)

    def __len__(self) -> int:
        return self._size

    def _tool_entries(self, tool_name: str, action: Action, path: str | None) -> list[_Entry]:
        found: list[_Entry] = []
        for key in _lookup_keys(tool_name):
            found.extend(self._by_tool.get(key, {}).get(action, ()))
            if path is not None and key in self._paths:
                by_anchor = self._paths[key].get(action, {})
                for anchor in _ancestors(path):
                    found.extend(by_anchor.get(anchor, ()))
        if len(found) > 1:
            found.sort(key=lambda e: e.position)
        return found

    def evaluate(self, tool_name: str, tool_input: JSON) -> Verdict:
        """What the rules answer for this call (never raises on bad input)."""
        fields = tool_input if isinstance(tool_input, dict) else {}
        sandbox_off = fields.get("dangerouslyDisableSandbox") is True
        if tool_name == "Bash":
            return self._bash(fields, sandbox_off)
        reasons: list[str] = []
        path = None
        raw = fields.get(PATH_FIELDS.get(tool_name, ""))
        if isinstance(raw, str):
            path = normalize_path(raw)
            if path is None:
                reasons.append("a relative path: never allowed by a path rule")
            elif "/../" in raw + "/" or raw.endswith("/.."):
                # Lexically /a/link/../x is /a/x; the kernel follows the link
                # first and may land anywhere. Deny and ask still see /a/x.
                reasons.append("a '..' segment: never allowed by a path rule")
        for action in ACTIONS:
            if action == "allow" and sandbox_off:
                reasons.append("dangerouslyDisableSandbox: never allowed by a rule")
                break
            for entry in self._tool_entries(tool_name, action, path):
                if action == "allow" and reasons and isinstance(entry.matcher, _Path):
                    continue
                why = self._matches(entry, tool_name, fields)
                if why is not None:
                    return Verdict(action, entry.rule_id, [*reasons, f"{entry.rule.text}{why}"])
        if not reasons:
            reasons.append("no rule matches")
        return Verdict(None, None, reasons)

    def _matches(self, entry: _Entry, tool_name: str, fields: dict[str, JSON]) -> str | None:
        """None when ``entry`` does not match; else a note on how it matched."""
        matcher = entry.matcher
        if matcher is None:
            return " covers every use of the tool"
        if isinstance(matcher, _Path):
            raw = fields.get(PATH_FIELDS.get(tool_name, "file_path"))
            if not isinstance(raw, str):
                return None
            path = normalize_path(raw)
            if path is None or not matcher.matches(path):
                return None
            return f" matches {path}"
        if isinstance(matcher, _Domain):
            url = fields.get("url")
            host = url_host(url) if isinstance(url, str) else None
            if host is None or not matcher.matches(host):
                return None
            return f" matches host {host}"
        if isinstance(matcher, _Name):
            name = fields.get("subagent_type")
            return " matches" if name == matcher.name else None
        return None

    # Bash -----------------------------------------------------------------------------------

    def _bash_candidates(self, action: Action, words: Iterable[str]) -> list[_Entry]:
        found: list[_Entry] = []
        seen: set[str] = set()
        for word in words:
            if word not in seen:
                seen.add(word)
                found.extend(self._bash_words[action].get(word, ()))
        found.extend(self._bash_other[action])
        if len(found) > 1:
            found.sort(key=lambda e: e.position)
        return found

    def _bash_match(self, action: Action, texts: tuple[str, ...]) -> _Entry | None:
        firsts = [t.split(" ", 1)[0] for t in texts]
        for entry in self._bash_candidates(action, firsts):
            matcher = entry.matcher
            assert isinstance(matcher, _Bash)
            if any(matcher.matches(t) for t in texts):
                return entry
        return None

    def _bash(self, fields: dict[str, JSON], sandbox_off: bool) -> Verdict:
        command = fields.get("command")
        if not isinstance(command, str):
            return Verdict(None, None, ["the input has no command"])
        parsed = parse_command(command)
        wide = {a: self._by_tool.get("Bash", {}).get(a, []) for a in ACTIONS}
        parts = [self._part(part, wide, parsed, sandbox_off) for part in parsed.parts]
        reasons = [f"{p.command!r}: {p.reason}" for p in parts]
        for action in ("deny", "ask"):
            if wide[action]:
                entry = wide[action][0]
                return Verdict(
                    action,
                    entry.rule_id,
                    [f"{entry.rule.text} covers every command", *reasons],
                    parts,
                )
            whole = self._bash_match(action, (command.strip(),))
            if whole is not None:
                return Verdict(
                    action,
                    whole.rule_id,
                    [f"{whole.rule.text} matches the whole command", *reasons],
                    parts,
                )
            for part in parts:
                if part.action == action:
                    return Verdict(action, part.rule_id, reasons, parts)
        problems = list(parsed.problems)
        if sandbox_off:
            problems.append("dangerouslyDisableSandbox: never allowed by a rule")
        if problems:
            return Verdict(None, None, [*problems, *reasons], parts)
        if parts and all(p.action == "allow" for p in parts):
            return Verdict("allow", parts[0].rule_id, reasons, parts)
        return Verdict(None, None, reasons, parts)

    def _part(
        self,
        part: SimpleCommand,
        wide: dict[Action, list[_Entry]],
        parsed: ParsedCommand,
        sandbox_off: bool,
    ) -> Part:
        shown = part.text or part.source
        texts = tuple(t for t in dict.fromkeys((part.text, part.value_text, _basename(part))) if t)
        for action in ("deny", "ask"):
            if wide[action] and texts:
                entry = wide[action][0]
                return Part(shown, action, entry.rule_id, f"{action}: {entry.rule.text}")
            entry_match = self._bash_match(action, texts) if texts else None
            if entry_match is not None:
                return Part(
                    shown, action, entry_match.rule_id, f"{action}: {entry_match.rule.text}"
                )
        if part.blockers:
            return Part(shown, None, None, "never allowed by a rule: " + "; ".join(part.blockers))
        if parsed.problems or sandbox_off:
            return Part(
                shown, None, None, "not allowed: " + "; ".join(parsed.problems or ("sandbox off",))
            )
        if wide["allow"]:
            entry = wide["allow"][0]
            return Part(shown, "allow", entry.rule_id, f"allow: {entry.rule.text}")
        allowed = self._bash_match("allow", (part.text,))
        if allowed is not None:
            return Part(shown, "allow", allowed.rule_id, f"allow: {allowed.rule.text}")
        return Part(shown, None, None, "no rule matches")


def _basename(part: SimpleCommand) -> str:
    """The value form without the command's directory (``/bin/rm x`` → ``rm x``), for deny."""
    if not part.values or "/" not in part.values[0]:
        return ""
    return " ".join((part.values[0].rsplit("/", 1)[-1], *part.values[1:]))


# Rules the console offers ---------------------------------------------------------------------

# First words whose prefix rule would allow anything at all.
_NO_PREFIX = frozenset(
    {
        "bash",
        "sh",
        "zsh",
        "dash",
        "ksh",
        "fish",
        "eval",
        "exec",
        "env",
        "sudo",
        "doas",
        "xargs",
        "command",
        "builtin",
        "source",
        ".",
        "ssh",
        "su",
        "time",
        "timeout",
        "nice",
        "nohup",
        "stdbuf",
    }
)
# Interpreters: a prefix rule needs a subcommand word (``python -m x`` offers none).
_NEEDS_SUBCOMMAND = frozenset(
    {"python", "python3", "node", "perl", "ruby", "php", "deno", "bun", "npx", "uv", "uvx", "pipx"}
)
_WORD = re.compile(r"^[A-Za-z0-9_./+-]+$")
_SUBCOMMAND = re.compile(r"^[A-Za-z][A-Za-z0-9_:-]*$")


def prefix_rule(tool_name: str, tool_input: JSON) -> str | None:
    """The prefix rule an "always allow" may offer (``Bash(npm test:*)`` for
    ``npm test -- --watch=false``), or None when no safe one exists."""
    if tool_name != "Bash" or not isinstance(tool_input, dict):
        return None
    command = tool_input.get("command")
    if not isinstance(command, str):
        return None
    parsed = parse_command(command)
    if parsed.problems or len(parsed.parts) != 1:
        return None
    part = parsed.parts[0]
    if part.blockers or not part.words:
        return None
    first = part.words[0]
    if not _WORD.match(first) or first in _NO_PREFIX or "*" in first:
        return None
    words = [first]
    if len(part.words) > 1 and _SUBCOMMAND.match(part.words[1]):
        words.append(part.words[1])
    elif first in _NEEDS_SUBCOMMAND:
        return None
    return f"Bash({' '.join(words)}:*)"


def exact_rule(tool_name: str, tool_input: JSON) -> str | None:
    """The rule naming exactly this use, or None when the grammar cannot spell it."""
    if not isinstance(tool_input, dict):
        return None
    if tool_name == "Bash":
        command = tool_input.get("command")
        if not isinstance(command, str) or not command.strip() or command != command.strip():
            return None
        if "*" in command or _CONTROL.search(command):
            return None
        text = f"Bash({command})"
    elif tool_name in PATH_FIELDS:
        raw = tool_input.get(PATH_FIELDS[tool_name])
        if not isinstance(raw, str) or normalize_path(raw) != raw or raw == "/":
            return None
        if _PATH_SPECIAL.search(raw) or raw != raw.rstrip():
            return None
        family = "Read" if tool_name in FAMILIES["Read"] else "Edit"
        text = f"{family}(/{raw})"
    elif tool_name == "WebFetch":
        url = tool_input.get("url")
        host = url_host(url) if isinstance(url, str) else None
        if host is None or not _HOST.match(host) or host.startswith("*."):
            return None
        text = f"WebFetch(domain:{host})"
    else:
        return None
    try:
        rule = parse_rule(text)
    except RuleSyntaxError:
        return None
    return rule.text


_PATH_SPECIAL = re.compile(r"[*?\[\]{}()\\!#\x00-\x1f\x7f]")
