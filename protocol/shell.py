"""Bash commands read as shell (tree-sitter-bash), cut into the simple commands rules match.

Pure: text in, values out. A permission rule names one simple command
(``npm test``), so a command line is first cut into every simple command it
would run: the parts of ``&&``/``||``/``;``/``|``/``|&``/``&``/newline lists,
and the commands inside substitutions, subshells, groups, control flow,
``bash -c`` strings and ``find -exec``/``xargs`` arguments. Each part carries
the reasons no allow rule may ever answer it (``blockers``) and the text deny
and ask rules are matched against (past assignments, wrappers, quoting).

Why tree-sitter-bash and not bashlex: bashlex raises on constructs agents write
every day (``[[ -f x ]]``, ``$((1+2))``, ``case``, ``function f { …; }``,
here-strings, ``|&``, ``;;&``), and a matcher that cannot parse must fall back
to "a human decides" far too often. tree-sitter-bash parses all of them and
marks what it cannot parse with ``ERROR``/``MISSING`` nodes instead of raising,
which is exactly the signal "never allowed" needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import tree_sitter
import tree_sitter_bash

#: A command longer than this is never allowed by a rule (the contract's limit).
MAX_COMMAND_CHARS = 10_000
#: Past this the command is not even parsed (deny rules then see the raw text only).
MAX_PARSE_CHARS = 100_000

# Wrappers stripped before matching, with the options each takes a value for.
_WRAPPERS: dict[str, frozenset[str]] = {
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
    "time": frozenset({"-f", "--format", "-o", "--output"}),
    "nice": frozenset({"-n", "--adjustment"}),
    "nohup": frozenset(),
    "stdbuf": frozenset({"-i", "-o", "-e", "--input", "--output", "--error"}),
}
# Prefixes that run the command after them: deny and ask rules look past them
# (``env rm -rf /`` is still ``rm -rf /``); an allow rule must name them.
_TRANSPARENT = frozenset({"env", "command", "builtin", "exec", "sudo", "doas"})
_SHELLS = frozenset({"bash", "sh", "zsh", "dash", "ksh", "mksh", "ash", "fish", "busybox"})
_EVALS = frozenset({"eval"})
_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
# Statement nodes whose children are statements (walked, not parts themselves).
_LISTS = frozenset({"program", "list", "pipeline", "negated_command", "redirected_statement"})
_SUBSTITUTIONS = frozenset({"command_substitution", "process_substitution"})
_REDIRECTS = frozenset({"file_redirect", "heredoc_redirect", "herestring_redirect"})
# Parts of compound statements that hold statements but are not one.
_CLAUSES = frozenset({"do_group", "elif_clause", "else_clause", "case_item"})
# Values inside statements: only their substitutions run commands.
_VALUES = frozenset(
    {
        "word", "string", "raw_string", "concatenation", "number", "variable_name",
        "simple_expansion", "expansion", "arithmetic_expansion", "ansi_c_string",
        "translated_string", "array", "binary_expression", "unary_expression",
        "parenthesized_expression", "postfix_expression", "ternary_expression",
        "test_operator", "regex", "extglob_pattern", "special_variable_name",
        "string_content", "heredoc_start", "heredoc_end", "comment", "subscript",
    }
)  # fmt: skip
_SAFE_FD_TARGET = re.compile(r"^(?:[0-9]+|-)$")

_LANGUAGE = tree_sitter.Language(tree_sitter_bash.language())


@dataclass(frozen=True, slots=True)
class SimpleCommand:
    """One simple command of a command line, as a rule sees it.

    ``words``: the words as written (quotes kept), past leading assignments and
    the stripped wrappers; ``text`` their join, which allow rules match.
    ``values``: the same words with quoting removed (``'rm'`` → ``rm``), which
    deny and ask rules also match, with transparent prefixes (``env``,
    ``command``, ``sudo``…) removed. ``blockers``: why no allow rule may answer
    this part (empty when one may).
    """

    source: str
    words: tuple[str, ...]
    values: tuple[str, ...]
    blockers: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def value_text(self) -> str:
        return " ".join(self.values)


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """A command line cut into its simple commands; ``problems`` stop every allow."""

    command: str
    parts: tuple[SimpleCommand, ...]
    problems: tuple[str, ...]


def parse_command(command: str) -> ParsedCommand:
    """The simple commands of ``command`` (cached: agents repeat themselves)."""
    return _parse_cached(command)


@lru_cache(maxsize=4096)
def _parse_cached(command: str) -> ParsedCommand:
    problems: list[str] = []
    if len(command) > MAX_COMMAND_CHARS:
        problems.append(f"the command is longer than {MAX_COMMAND_CHARS} characters")
    if len(command) > MAX_PARSE_CHARS:
        return ParsedCommand(command, (), tuple(problems))
    if not command.strip():
        return ParsedCommand(command, (), ("the command is empty",))
    source = command.encode("utf-8", "surrogatepass")
    tree = tree_sitter.Parser(_LANGUAGE).parse(source)
    root = tree.root_node
    if root.has_error:
        problems.append("the command does not parse as shell")
    walker = _Walker(source)
    walker.statement(root, ())
    if not walker.parts:
        problems.append("the command has no simple command")
    return ParsedCommand(command, tuple(walker.parts), tuple(problems))


def _text(source: bytes, node: tree_sitter.Node) -> str:
    return source[node.start_byte : node.end_byte].decode("utf-8", "surrogatepass")


class _Walker:
    def __init__(self, source: bytes) -> None:
        self.source = source
        self.parts: list[SimpleCommand] = []

    def text(self, node: tree_sitter.Node) -> str:
        return _text(self.source, node)

    # Statements -------------------------------------------------------------------------

    def statement(self, node: tree_sitter.Node, context: tuple[str, ...]) -> None:
        kind = node.type
        if kind == "command":
            self.command(node, context, ())
        elif kind == "redirected_statement":
            self.redirected(node, context)
        elif kind in _LISTS:
            for child in node.named_children:
                self.statement(child, context)
        elif kind in ("comment", "heredoc_body", "heredoc_end", "heredoc_start"):
            return
        elif kind in ("subshell", "compound_statement"):
            reason = "a subshell" if kind == "subshell" else "a { … } group or (( … ))"
            # The group is a part of its own, so one holding no command
            # (``(( x++ ))``) still stops an allow.
            self.parts.append(SimpleCommand(self.text(node), (), (), (f"{reason}",)))
            self.children(node, (*context, f"it runs in {reason}"))
        elif kind == "ERROR":
            self.children(node, (*context, "it is inside text that does not parse"))
        else:
            # Control flow, functions, declarations, tests, arithmetic: never
            # allowed themselves; their inner commands are still seen by deny.
            reason = f"a {kind.replace('_', ' ')} is not a simple command"
            self.parts.append(SimpleCommand(self.text(node), (), (), (reason,)))
            self.children(node, (*context, reason))

    def children(self, node: tree_sitter.Node, context: tuple[str, ...]) -> None:
        for child in node.named_children:
            if child.type in _SUBSTITUTIONS:
                self.substitution(child, context)
            elif child.type in _CLAUSES:
                self.children(child, context)
            elif child.type in _VALUES:
                self.expansions(child, context)
            else:
                # Anything else is read as a statement: an unknown node becomes
                # a part no allow rule answers.
                self.statement(child, context)

    def redirected(self, node: tree_sitter.Node, context: tuple[str, ...]) -> None:
        body = node.child_by_field_name("body")
        redirects = [
            c
            for c in node.named_children
            if body is None or (c.start_byte, c.end_byte) != (body.start_byte, body.end_byte)
        ]
        blockers, extra = self.redirects(redirects, context)
        if body is None:
            self.parts.append(SimpleCommand(self.text(node), (), (), ("a redirection alone",)))
            return
        if body.type == "command":
            self.command(body, context, blockers, extra)
        else:
            self.statement(body, (*context, *blockers))

    def redirects(
        self, redirects: list[tree_sitter.Node], context: tuple[str, ...]
    ) -> tuple[tuple[str, ...], list[tree_sitter.Node]]:
        """Why these redirections stop an allow, and the words that are really arguments."""
        blockers: list[str] = []
        extra: list[tree_sitter.Node] = []
        queue = list(redirects)
        while queue:
            redirect = queue.pop(0)
            if redirect.type == "herestring_redirect":
                if self.expansions(redirect, context):
                    blockers.append("a here-string runs a substitution")
                continue
            if redirect.type == "heredoc_redirect":
                # tree-sitter hangs the rest of the line under the here-document:
                # its other redirections, and the "| cmd" / "&& cmd" that follow.
                for child in redirect.named_children:
                    if child.type == "heredoc_body":
                        if self.expansions(child, context):
                            blockers.append("a here-document runs a substitution")
                    elif child.type in ("heredoc_start", "heredoc_end"):
                        continue
                    elif child.type in _REDIRECTS:
                        queue.append(child)
                    else:
                        self.statement(child, context)
                continue
            if redirect.type != "file_redirect":
                blockers.append(f"an unexpected {redirect.type}")
                continue
            operator = ""
            targets: list[tree_sitter.Node] = []
            for child in redirect.children:
                if child.type == "file_descriptor":
                    continue
                if not child.is_named:
                    operator += child.type
                else:
                    targets.append(child)
            if not targets:
                blockers.append("a redirection without a target")
                continue
            target, rest = targets[0], targets[1:]
            extra.extend(rest)
            self.expansions(target, context)
            target_text = self.text(target)
            if operator in (">&", "<&") and _SAFE_FD_TARGET.match(target_text):
                continue
            if operator.startswith("<") and operator not in ("<>",):
                if target.type in _SUBSTITUTIONS:
                    blockers.append("a process substitution")
                continue
            if target_text == "/dev/null" and target.type == "word":
                continue
            blockers.append(f"output is redirected to {target_text}")
        return tuple(blockers), extra

    # Substitutions ----------------------------------------------------------------------

    def substitution(self, node: tree_sitter.Node, context: tuple[str, ...]) -> None:
        reason = "it runs inside a command substitution"
        if node.type == "process_substitution":
            reason = "it runs inside a process substitution"
        for child in node.named_children:
            self.statement(child, (*context, reason))

    def expansions(self, node: tree_sitter.Node, context: tuple[str, ...]) -> bool:
        """Walk a word for substitutions (their commands become parts); True if any."""
        found = False
        stack = [node]
        while stack:
            current = stack.pop()
            if current.type in _SUBSTITUTIONS:
                self.substitution(current, context)
                found = True
                continue
            stack.extend(current.named_children)
        return found

    # Simple commands --------------------------------------------------------------------

    def command(
        self,
        node: tree_sitter.Node,
        context: tuple[str, ...],
        redirect_blockers: tuple[str, ...],
        extra: list[tree_sitter.Node] | None = None,
    ) -> None:
        blockers: list[str] = [*context, *redirect_blockers]
        words: list[tree_sitter.Node] = []
        redirects: list[tree_sitter.Node] = []
        assigned = False
        for child in node.named_children:
            if child.type == "variable_assignment":
                assigned = True
                if self.expansions(child, context):
                    blockers.append("an assignment runs a substitution")
            elif child.type == "command_name":
                words.extend(child.named_children)
            elif child.type in _REDIRECTS:
                redirects.append(child)
            elif child.type in {"subscript", "comment"}:
                continue
            else:
                words.append(child)
        words.extend(extra or ())
        more, extra_words = self.redirects(redirects, context)
        blockers.extend(more)
        words.extend(extra_words)
        if assigned:
            blockers.append("a leading variable assignment")
        for word in words:
            if self.expansions(word, context):
                blockers.append("a command substitution or process substitution")
        written = [self.text(w) for w in words]
        values = [_unquote(self.source, w) for w in words]
        start = _strip_wrappers(values)
        written, values = written[start:], values[start:]
        if not written:
            if not assigned:
                blockers.append("no command")
            self.parts.append(
                SimpleCommand(self.text(node), (), (), tuple(blockers) or ("no command",))
            )
            return
        first_node = words[start]
        if first_node.type != "word" or not _LITERAL_NAME.match(written[0]):
            blockers.append("the command name is not a plain word")
        deny_values = values[_strip_transparent(values) :]
        blockers.extend(self.runs_other(deny_values, context))
        self.parts.append(
            SimpleCommand(self.text(node), tuple(written), tuple(deny_values), tuple(blockers))
        )

    def runs_other(self, values: list[str], context: tuple[str, ...]) -> list[str]:
        """Blockers for commands that run a command given as their arguments; that
        command is added as a part of its own (deny rules see it)."""
        if not values:
            return []
        name = values[0].rsplit("/", 1)[-1]
        if name in _EVALS:
            inner = " ".join(values[1:])
            self.inner(inner, (*context, f"it runs through {name}"))
            return [f"{name} runs its arguments as shell"]
        if name in _SHELLS:
            for index, value in enumerate(values[1:], 1):
                if value.startswith("-") and not value.startswith("--") and "c" in value:
                    if index + 1 < len(values):
                        self.inner(values[index + 1], (*context, f"it runs through {name} -c"))
                    return [f"{name} -c runs a string as shell"]
            return []
        if name == "xargs":
            inner_at = _xargs_command(values)
            if inner_at is not None:
                self.argv(values[inner_at:], (*context, "it runs through xargs"))
            return ["xargs runs a command built from its input"]
        if name == "find":
            found = False
            for index, value in enumerate(values):
                if value in _FIND_EXEC:
                    found = True
                    end = index + 1
                    while end < len(values) and values[end] not in (";", "+", "\\;"):
                        end += 1
                    self.argv(values[index + 1 : end], (*context, f"it runs through find {value}"))
            if found:
                return ["find -exec runs a command"]
        return []

    def inner(self, command: str, context: tuple[str, ...]) -> None:
        parsed = parse_command(command)
        for part in parsed.parts:
            self.parts.append(
                SimpleCommand(part.source, part.words, part.values, (*context, *part.blockers))
            )
        if parsed.problems:
            self.parts.append(SimpleCommand(command, (), (), (*context, *parsed.problems)))

    def argv(self, values: list[str], context: tuple[str, ...]) -> None:
        if values:
            start = _strip_wrappers(values)
            values = values[start:]
            values = values[_strip_transparent(values) :]
            self.parts.append(
                SimpleCommand(" ".join(values), tuple(values), tuple(values), context)
            )


_LITERAL_NAME = re.compile(r"^[A-Za-z0-9_./+@%:,=-][A-Za-z0-9_./+@%:,=~-]*$")
_TIMEOUT_DURATION = re.compile(r"^[0-9.]+[smhd]?$")


def _strip_wrappers(values: list[str]) -> int:
    """Index of the first word past the wrappers (``timeout 5 nice -n 2 npm test`` → ``npm``)."""
    index = 0
    while index < len(values):
        name = values[index]
        takes = _WRAPPERS.get(name)
        if takes is None:
            return index
        index += 1
        while index < len(values) and values[index].startswith("-") and values[index] != "-":
            option = values[index]
            index += 1
            if option == "--":
                break
            if option in takes and index < len(values):
                index += 1
        if name == "timeout" and index < len(values) and _TIMEOUT_DURATION.match(values[index]):
            index += 1
        if name == "nice" and index < len(values) and re.match(r"^-?[0-9]+$", values[index]):
            index += 1
    return index


def _strip_transparent(values: list[str]) -> int:
    index = 0
    while index < len(values):
        name = values[index].rsplit("/", 1)[-1]
        if name not in _TRANSPARENT:
            break
        index += 1
        while index < len(values) and (
            values[index].startswith("-") or (name == "env" and "=" in values[index])
        ):
            index += 1
        index += _strip_wrappers(values[index:])
    return index


def _xargs_command(values: list[str]) -> int | None:
    takes = {"-a", "-d", "-E", "-I", "-L", "-n", "-P", "-s", "--delimiter", "--max-args"}
    index = 1
    while index < len(values) and values[index].startswith("-"):
        option = values[index]
        index += 1
        if option == "--":
            break
        if option in takes:
            index += 1
    return index if index < len(values) else None


def _unquote(source: bytes, node: tree_sitter.Node) -> str:
    """The word with shell quoting removed (expansions kept as written)."""
    kind = node.type
    if kind == "raw_string":
        return _text(source, node)[1:-1]
    if kind == "string":
        out: list[str] = []
        for child in node.children:
            if child.type == '"':
                continue
            if child.type == "string_content":
                out.append(re.sub(r'\\([$`"\\\n])', r"\1", _text(source, child)))
            else:
                out.append(_text(source, child))
        return "".join(out)
    if kind == "concatenation":
        return "".join(_unquote(source, child) for child in node.children)
    if kind == "word":
        return re.sub(r"\\(.)", r"\1", _text(source, node), flags=re.DOTALL)
    return _text(source, node)
