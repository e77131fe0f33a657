"""What both HTTP servers (the uplink's ingress, the gateway) check of a request.

The ``Host`` grammar and the loopback names every server answers to (the
DNS-rebinding defence), what counts as a JSON body (the CSRF defence: a page
can send ``text/plain`` or a form anywhere without a CORS preflight, but not
JSON), and the body of an error answer. Sans-I/O: strings in, values out.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from protocol.envelope import JSON

#: Host names every server accepts, whatever else it is told to serve.
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "[::1]")
#: Listen addresses that mean "every interface": no name a client could send.
WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def split_host(text: str, *, bare_ipv6: bool = False) -> tuple[str, int | None] | None:
    """``host[:port]`` or ``[v6][:port]`` → (lower-case host, no brackets or final dot; port).

    None when ``text`` is not one: empty, a port that is not a number from 1
    to 65535, a bracketed part that is not an IPv6 address. An IPv6 address
    without brackets (``fd00::7``) is taken whole only with ``bare_ipv6``: it
    is no valid ``Host``, yet some clients of the ingress send one.
    """
    text = text.strip().lower()
    if not text:
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0 or not _is_ipv6(text[1:end]):
            return None
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            return None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, ""
        elif ":" in host:  # more than one colon: an IPv6 address without brackets
            return (text, None) if bare_ipv6 and _is_ipv6(text) else None
        elif not port_text:
            return None
        host = host.rstrip(".")
        if not host:
            return None
    if not port_text:
        return host, None
    if not ascii_digits(port_text) or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def host_name(authority: str) -> str:
    """The host of a ``Host`` header or an allowlist entry: ``[::1]:3002`` → ``::1``,
    ``Localhost.:80`` → ``localhost``, ``fd00::7`` → ``fd00::7``; ``""`` when malformed."""
    parsed = split_host(authority, bare_ipv6=True)
    return "" if parsed is None else parsed[0]


def listen_host_entry(host: str) -> str | None:
    """A listen address as an allowed ``Host`` entry (``::1`` → ``[::1]``); None for a wildcard."""
    if host in WILDCARD_HOSTS:
        return None
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_PLAIN_JSON: Final = frozenset({b"application/json", "application/json"})


def is_json_content_type(value: bytes | str | None) -> bool:
    """Whether a ``Content-Type`` says JSON: ``application/json``, any case, with no
    ``charset`` parameter or a UTF-8 one (JSON is UTF-8; a body declared in another
    charset would be read as something its sender did not mean)."""
    if value in _PLAIN_JSON:
        return True  # what nearly every client sends: skip the parse
    if value is None:
        return False
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    media, _, params = text.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, param_value = param.partition("=")
        if name.strip().lower() == "charset" and param_value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def error_body(message: str, **extra: JSON) -> dict[str, JSON]:
    """The JSON body of every error answer: ``{"error": message, ...}``."""
    return {"error": message, **extra}


def ascii_digits(text: str | bytes) -> bool:
    """Whether ``text`` is a non-empty run of the ASCII digits 0-9, and nothing else.

    ``str.isdigit`` also accepts ``²`` (which ``int`` refuses: a 500) and other
    scripts' digits such as ``\\u0661`` (which ``int`` reads as 1: another number
    than the one shown), so every number read from input is checked with this.
    """
    return bool(text) and text.isascii() and text.isdigit()
