"""The value rules both commands and both configs share, as pure functions.

Each takes the option's name and a value (the text of the command line, or
the typed value a library caller passed) and returns the value to use, or
raises :class:`ConfigError` naming the option and the bad value. The uplink
and the gateway, their argument parsers and their config objects all call
these, so one value gets one answer and one wording everywhere.

Every message reads ``expected <what>, not <the value>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from protocol.exceptions import ConfigError
from protocol.web import ascii_digits

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Longest suffix first, so "64mib" is not read as "64mi" + "b".
_BYTE_UNITS = (("kib", KiB), ("mib", MiB), ("gib", GiB), ("k", KiB), ("m", MiB), ("g", GiB))

#: The words that turn an optional listener off (``--listen off``).
NO_LISTEN = ("", "off", "none")


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def positive_number(option: str, value: float | str, unit: str = "seconds") -> float:
    """``value`` as a finite number > 0 (a duration, by default), else ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ConfigError(
            option, f"expected a number of {unit} greater than 0, not {_shown(value)}"
        )
    return number


def positive_seconds(option: str, value: float | str) -> float:
    """``value`` as a duration: finite seconds > 0 (fractions allowed)."""
    return positive_number(option, value, "seconds")


def at_least_one(option: str, value: float | str) -> float:
    """``value`` as a finite number >= 1 (a multiplier)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 1:
        raise ConfigError(option, f"expected a number of at least 1, not {_shown(value)}")
    return number


def positive_int(option: str, value: int | str) -> int:
    """``value`` as a whole number >= 1, else ConfigError."""
    number = 0
    try:
        if isinstance(value, str):
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and float(value).is_integer():
            number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(option, f"expected a whole number of at least 1, not {_shown(value)}")
    return number


def byte_size(option: str, value: int | str) -> int:
    """A byte count >= 1: a whole number, or one with a KiB/MiB/GiB (K/M/G) suffix."""
    if isinstance(value, str):
        text, factor = value.strip().lower(), 1
        for suffix, size in _BYTE_UNITS:
            if text.endswith(suffix):
                text, factor = text[: -len(suffix)].strip(), size
                break
        number = int(text) * factor if ascii_digits(text) else 0
    else:
        number = value if isinstance(value, int) and not isinstance(value, bool) else 0
    if number < 1:
        raise ConfigError(
            option,
            f"expected a byte count of at least 1 (e.g. 65536 or 64MiB), not {_shown(value)}",
        )
    return number


def format_bytes(count: int) -> str:
    """``count`` the way :func:`byte_size` reads it back, as short as exact: ``64MiB``."""
    for suffix, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if count % size == 0:
            return f"{count // size}{suffix}"
    return str(count)


def parse_listen(option: str, value: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); an IPv6 address goes in brackets, ``[::1]:PORT``.

    Port 0 asks the system for a free port. Brackets are required for IPv6
    because ``::1:80`` could be either ``[::1]:80`` or ``[::1:80]`` with no port.
    """
    host, sep, port_text = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bracketed = True
    else:
        bracketed = False
    if (
        not sep
        or not host
        or not ascii_digits(port_text)
        or int(port_text) > 65535
        or (":" in host) != bracketed
        or any(c in host for c in "[]/ @?#")
    ):
        raise ConfigError(
            option,
            f"expected HOST:PORT (an IPv6 address in brackets, e.g. [::1]:8080), not {value!r}",
        )
    return host, int(port_text)


def non_empty(option: str, value: str) -> str:
    """``value`` unless it is empty or only blanks."""
    if not value.strip():
        raise ConfigError(option, "expected a value, not an empty one")
    return value


def host_name(option: str, value: str) -> str:
    """A host name or address (what a Host header may carry), no path or spaces."""
    if not value or value != value.strip() or any(c in value for c in "/ @?#"):
        raise ConfigError(option, f"expected a host name or address, not {value!r}")
    return value


def name_list(option: str, value: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated names (or a sequence of them) → a tuple, blanks dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(option, f"expected comma-separated names, not {value!r}")
        if item.strip():
            names.append(item.strip())
    return tuple(names)


def one_of(option: str, value: str, choices: Iterable[str]) -> str:
    """``value`` upper-cased, if it is one of ``choices`` (upper-case words)."""
    allowed = tuple(choices)
    if value.upper() not in allowed:
        raise ConfigError(option, f"expected one of {', '.join(allowed)}, not {value!r}")
    return value.upper()
