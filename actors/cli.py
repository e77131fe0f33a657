"""The argument parser both commands (``run_uplink.py``, ``run_gateway.py``) build on.

A usage error is one line on stderr and exit status 2, never argparse's usage
block, and never shows a secret: argparse echoes what it did not understand,
and a mistyped ``--upstream-gatway 'ws://h/?token=…'`` would print the token.
Every error reads ``PROG: error: argument --OPTION: PROBLEM``, whether
argparse found it, a value rule of :mod:`protocol.options` did, or a config
object's check did later (:meth:`OneLineParser.config_error`).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, TypeVar

from protocol import ConfigError, redact
from protocol.options import byte_size, format_bytes, one_of

EXIT_USAGE = 2
_UNRECOGNIZED = "unrecognized arguments: "

T = TypeVar("T")


def arg_type(option: str, rule: Callable[[str, Any], T]) -> Callable[[str], T]:
    """A ``rule(option, text)`` of :mod:`protocol.options` as an argparse ``type``."""

    def convert(text: str) -> T:
        try:
            return rule(option, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    convert.__name__ = rule.__name__  # argparse names it in a few messages
    return convert


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line, secret-free usage errors (exit 2).

    ``secret_options`` are options whose value is a secret, ``secret_env``
    the environment variables that hold one: their values are replaced by
    ``***`` wherever an error message would repeat them.
    """

    def __init__(
        self,
        *args: Any,
        secret_options: Iterable[str] = (),
        secret_env: Iterable[str] = (),
        **kwargs: Any,
    ) -> None:
        # Every option string, for "did you mean": kept here rather than read
        # from argparse's private action list (options added to an argument
        # group are not seen, so they get no suggestion). Set first: the
        # base class adds -h/--help.
        self.option_strings: list[str] = []
        super().__init__(*args, **kwargs)
        self.secret_options = tuple(secret_options)
        self.secret_env = tuple(secret_env)
        self._argv: list[str] = []

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.option_strings += action.option_strings
        return action

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {self._safe(message)}\n")

    def config_error(self, exc: ConfigError) -> NoReturn:
        """Exit 2 with ``exc`` in the same words as argparse's own errors."""
        self.error(f"argument {exc.option}: {exc.problem}")

    def _safe(self, message: str) -> str:
        if message.startswith(_UNRECOGNIZED):
            message = _UNRECOGNIZED + self._unrecognized(message[len(_UNRECOGNIZED) :])
        for secret in self._secrets():
            # Case-blind: a value may come back changed (--log-level upper-cases it).
            pattern = re.escape(secret)
            if len(secret) < 4:
                # A very short one (a demo's "--token x") only where it stands
                # alone: anywhere, it would garble every word holding an "x".
                pattern = rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])"
            message = re.sub(pattern, "***", message, flags=re.IGNORECASE)
        return redact(message)

    def _unrecognized(self, words: str) -> str:
        """Option names as typed (with a suggestion); every value as ``***``."""
        known = self.option_strings
        shown, hints = [], []
        for word in words.split(" "):
            name, eq, _ = word.partition("=")
            if not (name.startswith("--") and name[2:3].isalpha()) and len(name) != 2:
                shown.append("***")  # a value: it may be a secret
                continue
            shown.append(name + ("=***" if eq else ""))
            hints += difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
        return " ".join(shown) + hint

    def _secrets(self) -> list[str]:
        found = [os.environ[name] for name in self.secret_env if os.environ.get(name)]
        argv = self._argv
        for index, word in enumerate(argv):
            name, eq, value = word.partition("=")
            # A secret option, or an abbreviation argparse would accept for it.
            if len(name) > 2 and any(option.startswith(name) for option in self.secret_options):
                if eq:
                    found.append(value)
                elif index + 1 < len(argv):
                    found.append(argv[index + 1])
        # Longest first, so a secret containing another is replaced whole.
        return sorted({f for f in found if f}, key=len, reverse=True)


# ── options declared once ───────────────────────────────────────────────────

#: The metadata key of a dataclass field that the command line exposes.
OPTION = "option"


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: "No default of its own" (a field's factory computes it). Not dataclasses'
#: MISSING: a field defaulting to that would have no default at all.
NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True, slots=True)
class Option:
    """One command-line option: its name, help, value rule and defaults, in one place.

    ``rule(option, value)`` checks a value (the command line's text, or the
    typed value a library caller passed) and returns the value to use; it
    raises :class:`ConfigError`. ``default`` is the library's default
    (``NO_DEFAULT`` when a factory computes it); ``cli_default`` the command's,
    where it differs. ``env`` is read when the option is absent.
    """

    flag: str
    help: str
    rule: Callable[[str, Any], Any] | None = None
    metavar: str | None = None
    env: str | None = None
    default: Any = NO_DEFAULT
    cli_default: Any = NO_DEFAULT
    shown_default: str | None = None
    repeat: bool = False
    switch: bool = False
    secret: bool = False
    #: Repeatable, its values joined with this into one text (the variable holds
    #: them so joined); the command line's values replace the variable's.
    join: str | None = None

    @property
    def command_default(self) -> Any:
        return self.default if self.cli_default is NO_DEFAULT else self.cli_default

    def default_text(self) -> str:
        """The default as ``--help`` and the docs show it."""
        if self.shown_default is not None:
            return self.shown_default
        value = self.command_default
        if self.switch:
            return "off"
        if value is None or value == "":
            return "none"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, int) and self.rule is byte_size:
            return format_bytes(value)
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value)

    def help_text(self) -> str:
        """The help line: what it does, then its default and its variable."""
        tail = f"default: {self.default_text()}"
        if self.env:
            tail += f"; env: {self.env}"
        return f"{self.help} ({tail})"

    def add_to(self, parser: argparse.ArgumentParser, dest: str) -> None:
        """Add this option to ``parser``, storing its value as ``dest``."""
        env_value = os.environ.get(self.env) if self.env else None
        if env_value:
            default: Any = env_value  # text: argparse checks it with ``type``, naming the option
        elif self.command_default is NO_DEFAULT or self.repeat:
            default = argparse.SUPPRESS  # absent from the namespace: the field's default applies
        else:
            default = self.command_default
        kwargs: dict[str, Any] = {
            "dest": dest,
            "default": default,
            "help": self.help_text().replace("%", "%%"),
        }
        if self.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = self.metavar or "S"
            if self.rule is not None:
                kwargs["type"] = arg_type(self.flag, self.rule)
            if self.repeat:
                kwargs["action"] = "append"
            elif self.join is not None:
                kwargs["action"] = _Joined
                kwargs["const"] = self.join
        parser.add_argument(self.flag, **kwargs)


class _Joined(argparse.Action):
    """Each use adds its value to the text, joined with ``const``; the first one on
    the command line replaces the default (the environment's value)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen = f"_{self.dest}_given"
        if getattr(namespace, seen, False):
            values = f"{getattr(namespace, self.dest)}{self.const}{values}"
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, values)


def option(default: Any, flag: str, help: str, **spec: Any) -> Any:
    """A dataclass field whose value the command line sets with ``flag``."""
    factory = spec.pop("default_factory", None)
    meta = {OPTION: Option(flag, help, default=NO_DEFAULT if factory else default, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, list | dict | set):
        raise TypeError("a mutable default needs default_factory")
    return field(default=default, metadata=meta)


def library_only(default: Any, name: str, rule: Callable[[str, Any], Any]) -> Any:
    """A dataclass field with a value rule but no option (errors name the field)."""
    return field(default=default, metadata={OPTION: Option("", name, rule=rule, default=default)})


def field_options(cls: type) -> list[tuple[str, Option]]:
    """(field name, Option) for every field of dataclass ``cls`` the command line sets."""
    return [
        (f.name, f.metadata[OPTION])
        for f in fields(cls)
        if OPTION in f.metadata and f.metadata[OPTION].flag
    ]


def check_fields(obj: Any) -> None:
    """Apply each field's rule to its value (None means unset); ConfigError if one fails."""
    for f in fields(obj):
        spec = f.metadata.get(OPTION)
        value = getattr(obj, f.name)
        if spec is None or spec.rule is None or value is None:
            continue
        name = spec.flag or spec.help  # a library-only field: its name
        for item in value if spec.repeat else (value,):
            spec.rule(name, item)


#: loguru's levels, least severe first: what ``--log-level`` takes.
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def log_level(option: str, value: str) -> str:
    return one_of(option, value, LOG_LEVELS)


def any_path(option: str, value: str) -> str:
    """A path taken as given: the command that reads it says what is wrong with it."""
    return value


#: Both commands' ``--log-level``.
LOG_LEVEL_OPTION = Option(
    "--log-level",
    f"the least severe log lines shown: {', '.join(LOG_LEVELS)}",
    rule=log_level,
    metavar="LEVEL",
    default="INFO",
)
