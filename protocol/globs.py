"""Anchored gitignore-style path patterns, matched in time linear in the path.

Pure. The semantics are gitignore's (as ``pathspec``'s ``gitignore`` patterns
implement them, which the tests check this module against): ``*`` and ``?``
stay within one path component, ``[…]`` is a character class, ``**`` as a
whole component is any number of components, ``a/**`` is everything inside
``a``, a backslash escapes, unescaped trailing spaces are dropped, and a
pattern that names a directory covers everything under it.

Why not ``pathspec`` itself: it compiles a pattern to one regular expression,
and a rule such as ``Read(//a*a*a*a*b)`` then backtracks polynomially on a
long path from the agent (minutes on 4,000 characters). Here every ``*`` is
matched by leftmost search of the fixed-length pieces around it, which never
backtracks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STAR = None  # a "**" component: any number of components


@dataclass(frozen=True, slots=True)
class _Component:
    """One component pattern: fixed-length pieces around each ``*``."""

    pieces: tuple[tuple[re.Pattern[str], int], ...]
    literal: str | None  # the whole component when it holds no wildcard

    def matches(self, name: str) -> bool:
        if self.literal is not None:
            return name == self.literal
        return _pieces_match(self.pieces, name)


def _pieces_match(pieces: tuple[tuple[re.Pattern[str], int], ...], name: str) -> bool:
    if len(pieces) == 1:
        regex, size = pieces[0]
        return len(name) == size and regex.fullmatch(name) is not None
    (first, first_size), (last, last_size) = pieces[0], pieces[-1]
    end = len(name) - last_size
    if end < first_size:
        return False
    if first.match(name) is None or last.fullmatch(name, end) is None:
        return False
    position = first_size
    for regex, size in pieces[1:-1]:
        found = regex.search(name, position, end)
        if found is None:
            return False
        position = found.start() + size
    return True


_Element = _Component | None


@dataclass(frozen=True, slots=True)
class PathGlob:
    """A compiled pattern; the ``matches`` methods take an absolute, normalised path.

    ``matches`` is pathspec's reading (a pattern ending in a bare ``*``, like
    ``/tmp/*``, names the entries of ``/tmp``, not what is below them), used
    for allow rules; ``covers`` adds git's effective one (everything under a
    matched directory is matched too), used for deny and ask rules.
    """

    elements: tuple[_Element, ...]
    broad: tuple[_Element, ...]

    def matches(self, path: str) -> bool:
        names = [n for n in path.split("/") if n]
        return _elements_match(self.elements, names)

    def covers(self, path: str) -> bool:
        names = [n for n in path.split("/") if n]
        return _elements_match(self.broad, names)


def _elements_match(elements: tuple[_Element, ...], names: list[str]) -> bool:
    """``elements`` joined by ``**`` gaps: the same leftmost search, over components."""
    groups: list[list[_Component]] = [[]]
    for element in elements:
        if element is None:
            groups.append([])
        else:
            groups[-1].append(element)
    if len(groups) == 1:
        return len(names) == len(groups[0]) and _group_at(groups[0], names, 0)
    first, last = groups[0], groups[-1]
    end = len(names) - len(last)
    if end < len(first) or not _group_at(first, names, 0) or not _group_at(last, names, end):
        return False
    position = len(first)
    for group in groups[1:-1]:
        while position + len(group) <= end and not _group_at(group, names, position):
            position += 1
        if position + len(group) > end:
            return False
        position += len(group)
    return True


def _group_at(group: list[_Component], names: list[str], at: int) -> bool:
    return all(component.matches(names[at + i]) for i, component in enumerate(group))


def compile_glob(pattern: str) -> PathGlob:
    """Compile an absolute gitignore pattern (``/home/u/**/*.py``); ValueError if empty."""
    pattern = _strip_trailing_spaces(pattern)
    directory_only = pattern.endswith("/")
    names: list[str] = []
    for name in pattern.split("/"):
        if name and not (name == "**" and names[-1:] == ["**"]):
            names.append(name)
    if not names:
        raise ValueError("the pattern names no path")
    elements: list[_Element] = []
    for index, name in enumerate(names):
        if name == "**":
            if index == len(names) - 1:
                # "a/**": everything inside a (one component at least); "/**/"
                # alone: everything inside some directory.
                elements.append(_component("*"))
                if directory_only and len(names) == 1:
                    elements.append(_component("*"))
            if not elements or elements[-1] is not _STAR:
                elements.append(_STAR)
            continue
        elements.append(_component(name))
    if elements[-1] is _STAR:
        return PathGlob(tuple(elements), tuple(elements))
    if directory_only:
        # "tmp/" names a directory: what is inside it, not a file "tmp".
        elements.append(_component("*"))
    broad = (*elements, _STAR)
    if names[-1] == "*" and not directory_only:
        return PathGlob(tuple(elements), broad)
    # A pattern naming a directory covers everything under it.
    return PathGlob(broad, broad)


def _strip_trailing_spaces(pattern: str) -> str:
    stripped = pattern.rstrip(" ")
    if stripped != pattern and stripped.endswith("\\"):
        # "\ " keeps one space.
        slashes = len(stripped) - len(stripped.rstrip("\\"))
        if slashes % 2 == 1:
            return stripped + " "
    return stripped


def _component(name: str) -> _Component:
    pieces: list[tuple[re.Pattern[str], int]] = []
    current: list[str] = []
    size = 0
    wildcard = False
    index = 0
    while index < len(name):
        char = name[index]
        if char == "\\" and index + 1 < len(name):
            current.append(re.escape(name[index + 1]))
            size += 1
            index += 2
            continue
        if char == "*":
            wildcard = True
            pieces.append((re.compile("".join(current), re.DOTALL), size))
            current, size = [], 0
            index += 1
            continue
        if char == "?":
            wildcard = True
            current.append("[^/]")
            size += 1
            index += 1
            continue
        if char == "[":
            close = _class_end(name, index)
            if close is not None:
                wildcard = True
                current.append(_class(name[index + 1 : close]))
                size += 1
                index = close + 1
                continue
        current.append(re.escape(char))
        size += 1
        index += 1
    pieces.append((re.compile("".join(current), re.DOTALL), size))
    literal = None if wildcard else _unescape(name)
    return _Component(tuple(pieces), literal)


def _class_end(name: str, start: int) -> int | None:
    """Index of the "]" closing the class opened at ``start``, or None."""
    index = start + 1
    if index < len(name) and name[index] in "!^":
        index += 1
    if index < len(name) and name[index] == "]":
        index += 1
    while index < len(name):
        if name[index] == "\\" and index + 1 < len(name):
            index += 2
            continue
        if name[index] == "]":
            return index
        index += 1
    return None


def _class(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\" and index + 1 < len(body):
            out.append(re.escape(body[index + 1]))
            index += 2
            continue
        if char == "-" and out and index + 1 < len(body):
            out.append("-")
            index += 1
            continue
        out.append(re.escape(char))
        index += 1
    inner = "".join(out) or r"\x00"
    # A class never matches "/" (components hold none anyway).
    return f"[^/{inner}]" if negate else f"(?!/)[{inner}]"


def _unescape(name: str) -> str:
    return re.sub(r"\\(.)", r"\1", name)
