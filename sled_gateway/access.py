"""The ``--access`` file: who has which role on which projects, quorums, and people's Matrix ids.

A TOML file (read with :mod:`tomllib`)::

    [[grant]]
    who = "alice@example.test"     # a person's id (email, or "ISSUER|SUB"), or "group:NAME"
    role = "approver"              # viewer | approver | admin
    projects = ["web-*"]           # project globs; absent means every project

    [[quorum]]
    rule = "Bash(git push *)"      # Claude Code's rule grammar (protocol.rules)
    approvals = 2                  # from that many different people
    projects = ["*"]

    [[person]]
    id = "alice@example.test"
    matrix = "@alice:example.test" # her Matrix replies are her votes
    groups = ["web"]               # groups for her person tokens (an ID token brings its own)

:func:`load_access` reads and checks it whole: any problem is an
:class:`AccessError` whose message is ``FILE:LINE: reason`` (the command
exits 2 with it). :class:`Access` is the :class:`~sled_gateway.people.Grants`
the gateway turns people into principals with.

Project globs are :func:`fnmatch.fnmatchcase` patterns (``*``, ``?``,
``[...]``), case-sensitive, over the whole project name. Not
:mod:`protocol.globs`: those are gitignore *path* patterns (``*`` stops at
``/``, a pattern covers what is under a directory, trailing spaces are
dropped), and a project name is one word, where those rules would only
surprise. ``fnmatch`` compiles a pattern to a regular expression that does not
backtrack on ``*`` (each star's match is taken once), and project names are short.

A role on ``*`` (or with no ``projects``) holds on every project; a role on
other globs holds only on the projects they match.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import JSON
from protocol.rules import PermissionRule, RuleSet, RuleSyntaxError, parse_rule
from sled_gateway.people import Person
from sled_gateway.principal import Channel, Principal, Role

_MAX_GLOB = 200
_MAX_APPROVALS = 20
_GRANT_KEYS = frozenset({"who", "role", "projects"})
_QUORUM_KEYS = frozenset({"rule", "approvals", "projects"})
_PERSON_KEYS = frozenset({"id", "matrix", "groups"})
_MATRIX_ID = re.compile(r"@[^:\s]+:\S+")


class AccessError(ValueError):
    """The access file cannot be used; the message is ``FILE:LINE: reason``."""


@dataclass(frozen=True, slots=True)
class ProjectGlobs:
    """A grant's or quorum's project globs; called with a project name: does one match?"""

    patterns: tuple[str, ...]

    @property
    def everything(self) -> bool:
        return "*" in self.patterns

    def __call__(self, project: str) -> bool:
        return any(fnmatch.fnmatchcase(project, p) for p in self.patterns)


EVERY_PROJECT = ProjectGlobs(("*",))


@dataclass(frozen=True, slots=True)
class Grant:
    who: str
    role: Role
    projects: ProjectGlobs
    line: int = 0


@dataclass(frozen=True, slots=True)
class Quorum:
    rule: str
    approvals: int
    projects: ProjectGlobs
    line: int = 0


@dataclass(frozen=True, slots=True)
class PersonEntry:
    id: str
    matrix: str | None = None
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Access:
    """The grants, quorums and people of one access file (or none: ``Access()``)."""

    grants: tuple[Grant, ...] = ()
    quorums: tuple[Quorum, ...] = ()
    people: tuple[PersonEntry, ...] = ()
    source: str = ""
    _quorum_sets: tuple[tuple[Quorum, RuleSet], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._quorum_sets and self.quorums:
            sets = tuple(
                (q, RuleSet([(i, parse_rule(q.rule), "deny")])) for i, q in enumerate(self.quorums)
            )
            object.__setattr__(self, "_quorum_sets", sets)

    # -- people → principals --------------------------------------------------------

    def principal_for(self, person: Person, channel: Channel) -> Principal:
        """The principal ``person`` acts as through ``channel``: the roles the grants
        naming them (their id, ``ISSUER|SUB``, or one of their groups) give them."""
        names = {person.id, f"{person.issuer}|{person.sub}"}
        names.update(f"group:{g}" for g in person.groups)
        everywhere: set[Role] = set()
        scoped: list[tuple[Role, ProjectGlobs]] = []
        for grant in self.grants:
            if grant.who not in names:
                continue
            if grant.projects.everything:
                everywhere.add(grant.role)
            else:
                scoped.append((grant.role, grant.projects))
        return Principal(person.id, channel, frozenset(everywhere), tuple(scoped), person=person.id)

    def person(self, person_id: str) -> Person:
        """The person a token names (``email`` or ``ISSUER|SUB``), with the groups the
        ``[[person]]`` table gives them."""
        groups: frozenset[str] = frozenset()
        for entry in self.people:
            if entry.id == person_id:
                groups = entry.groups
        issuer, bar, sub = person_id.partition("|")
        if bar:
            return Person(issuer, sub, groups=groups)
        return Person("", person_id, email=person_id, groups=groups)

    def person_for_matrix(self, user_id: str) -> str | None:
        """The person id a Matrix user id is mapped to, if any."""
        for entry in self.people:
            if entry.matrix == user_id:
                return entry.id
        return None

    def knows(self, person_id: str) -> bool:
        """Whether the file names this person (a grant, or a ``[[person]]`` table)."""
        return any(g.who == person_id for g in self.grants) or any(
            p.id == person_id for p in self.people
        )

    # -- quorums ------------------------------------------------------------------

    def approvals_needed(self, project: str, tool_name: str, tool_input: JSON) -> int:
        """How many different people must approve this request (1 without a quorum).

        A quorum rule matches as a deny rule would (any part of a compound command),
        so wrapping a risky command in another does not escape its quorum.
        """
        needed = 1
        for quorum, rules in self._quorum_sets:
            if quorum.approvals <= needed or not quorum.projects(project):
                continue
            try:
                verdict = rules.evaluate(tool_name, tool_input)
            except Exception:  # an input the matcher cannot read: ask for the most
                verdict = None
            if verdict is None or verdict.action == "deny":
                needed = quorum.approvals
        return needed


# -- reading the file ---------------------------------------------------------------


def load_access(path: str | Path) -> Access:
    """Read and check an access file; :class:`AccessError` (``FILE:LINE: reason``)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise AccessError(f"{name}:0: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AccessError(f"{name}:{line}: not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # "Expected ... (at line 3, column 7)": the reason, then the position.
        message = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)$", message)
        line = int(m.group(1)) if m else 0
        reason = message[: m.start()].strip() if m else message
        raise AccessError(f"{name}:{line}: not TOML: {reason}") from None
    return parse_access(data, text, name)


def parse_access(data: Mapping[str, Any], text: str = "", name: str = "<access>") -> Access:
    """An access file's parsed TOML → :class:`Access`; ``text`` locates the problems."""
    where = _Locator(text, name)
    unknown = set(data) - {"grant", "quorum", "person"}
    if unknown:
        key = sorted(unknown)[0]
        raise AccessError(
            f"{where.key_line(key)}: unknown table {key!r} (expected grant, quorum, person)"
        )
    grants = tuple(
        _grant(t, where.table("grant", i)) for i, t in enumerate(_tables(data, "grant", where))
    )
    quorums = tuple(
        _quorum(t, where.table("quorum", i)) for i, t in enumerate(_tables(data, "quorum", where))
    )
    people = []
    seen: dict[str, str] = {}
    for i, t in enumerate(_tables(data, "person", where)):
        entry = _person(t, where.table("person", i))
        if entry.matrix is not None and entry.matrix in seen:
            raise AccessError(
                f"{where.table('person', i).at('matrix')}: {entry.matrix} is already "
                f"{seen[entry.matrix]}'s Matrix id"
            )
        if entry.matrix is not None:
            seen[entry.matrix] = entry.id
        people.append(entry)
    return Access(grants, quorums, tuple(people), source=name)


def _tables(data: Mapping[str, Any], key: str, where: _Locator) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise AccessError(f"{where.key_line(key)}: {key} must be tables: [[{key}]]")
    return value


class _Locator:
    """Finds the line of a table (``[[grant]]``, the n-th one) and of a key in it."""

    def __init__(self, text: str, name: str) -> None:
        self.lines = text.splitlines()
        self.name = name

    def key_line(self, key: str) -> str:
        pattern = re.compile(rf"^\s*(\[+\s*{re.escape(key)}\s*\]+|{re.escape(key)}\s*=)")
        for n, line in enumerate(self.lines, 1):
            if pattern.match(line):
                return f"{self.name}:{n}"
        return f"{self.name}:0"

    def table(self, key: str, index: int) -> _Table:
        header = re.compile(rf"^\s*\[\[\s*{re.escape(key)}\s*\]\]")
        found = [n for n, line in enumerate(self.lines, 1) if header.match(line)]
        if index < len(found):
            start = found[index]
            end = len(self.lines) + 1
            for n in range(start + 1, len(self.lines) + 1):
                if self.lines[n - 1].lstrip().startswith("["):
                    end = n
                    break
            return _Table(self, start, end)
        line = int(self.key_line(key).rsplit(":", 1)[1])
        return _Table(self, line, line + 1)


@dataclass(frozen=True, slots=True)
class _Table:
    locator: _Locator
    start: int
    end: int

    @property
    def here(self) -> str:
        return f"{self.locator.name}:{self.start}"

    def at(self, key: str) -> str:
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for n in range(self.start, min(self.end, len(self.locator.lines) + 1)):
            if pattern.match(self.locator.lines[n - 1]):
                return f"{self.locator.name}:{n}"
        return self.here


def _unknown_keys(table: Mapping[str, Any], known: frozenset[str], where: _Table) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise AccessError(
            f"{where.at(extra[0])}: unknown key {extra[0]!r} (expected {', '.join(sorted(known))})"
        )


def _globs(value: Any, where: _Table) -> ProjectGlobs:
    if value is None:
        return EVERY_PROJECT
    if not isinstance(value, list) or not value:
        raise AccessError(f"{where.at('projects')}: projects must be a non-empty list of globs")
    for glob in value:
        problem = _glob_problem(glob)
        if problem is not None:
            raise AccessError(f"{where.at('projects')}: invalid project glob {glob!r}: {problem}")
    return ProjectGlobs(tuple(value))


def _glob_problem(glob: Any) -> str | None:
    if not isinstance(glob, str) or not glob:
        return "a glob is a non-empty string"
    if len(glob) > _MAX_GLOB:
        return f"longer than {_MAX_GLOB} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in glob):
        return "control characters"
    # fnmatch reads an unclosed "[" as a literal; in a project glob it is a typo.
    opened = glob.find("[")
    if opened >= 0 and "]" not in glob[opened + 2 :]:
        return "an unclosed '['"
    return None


def _role(value: Any, where: _Table) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise AccessError(
            f"{where.at('role')}: unknown role {value!r} (viewer, approver or admin)"
        ) from None


def _grant(table: Mapping[str, Any], where: _Table) -> Grant:
    _unknown_keys(table, _GRANT_KEYS, where)
    who = table.get("who")
    if not isinstance(who, str) or not who.strip():
        raise AccessError(
            f"{where.at('who')}: who must be a person's id or group:NAME"
            if "who" in table
            else f"{where.here}: a grant needs who"
        )
    if who.startswith("group:") and not who[6:]:
        raise AccessError(f"{where.at('who')}: group: needs a group name")
    if "role" not in table:
        raise AccessError(f"{where.here}: a grant needs role")
    return Grant(
        who, _role(table["role"], where), _globs(table.get("projects"), where), where.start
    )


def _quorum(table: Mapping[str, Any], where: _Table) -> Quorum:
    _unknown_keys(table, _QUORUM_KEYS, where)
    text = table.get("rule")
    if not isinstance(text, str) or not text:
        raise AccessError(f"{where.at('rule')}: a quorum needs rule (a rule's text)")
    try:
        parsed: PermissionRule = parse_rule(text)
    except RuleSyntaxError as exc:
        raise AccessError(
            f"{where.at('rule')}: rule {text!r} does not parse: at position {exc.position}: "
            f"{exc.reason}"
        ) from None
    except ValueError as exc:
        raise AccessError(f"{where.at('rule')}: rule {text!r} does not parse: {exc}") from None
    approvals = table.get("approvals")
    if (
        not isinstance(approvals, int)
        or isinstance(approvals, bool)
        or not 1 <= approvals <= _MAX_APPROVALS
    ):
        raise AccessError(
            f"{where.at('approvals')}: approvals must be a whole number from 1 to {_MAX_APPROVALS}"
        )
    return Quorum(parsed.text, approvals, _globs(table.get("projects"), where), where.start)


def _person(table: Mapping[str, Any], where: _Table) -> PersonEntry:
    _unknown_keys(table, _PERSON_KEYS, where)
    pid = table.get("id")
    if not isinstance(pid, str) or not pid.strip() or pid.startswith("group:"):
        raise AccessError(f"{where.at('id')}: a person needs id (their email or ISSUER|SUB)")
    matrix = table.get("matrix")
    if matrix is not None and (not isinstance(matrix, str) or not _MATRIX_ID.fullmatch(matrix)):
        raise AccessError(
            f"{where.at('matrix')}: {matrix!r} is not a Matrix user id (@user:server)"
        )
    groups = table.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise AccessError(f"{where.at('groups')}: groups must be a list of group names")
    return PersonEntry(pid, matrix, frozenset(groups))


def grants_of(entries: Iterable[Grant]) -> Access:
    """An :class:`Access` of these grants only (tests and embedding programs)."""
    return Access(tuple(entries))


__all__ = [
    "EVERY_PROJECT",
    "Access",
    "AccessError",
    "Grant",
    "PersonEntry",
    "ProjectGlobs",
    "Quorum",
    "load_access",
    "parse_access",
]
