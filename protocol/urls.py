"""URLs and secrets: rendering text for humans without leaking a credential,
and putting the gateway token into the URL it travels in, where the original protocol puts it.

Pure functions of strings, no I/O: :func:`redact` is applied at every place
text leaves the process (log sinks, error messages, ``/status``).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

# A secret's value ends where a URL query value would, and also at the
# punctuation that usually surrounds a URL in prose or in a repr:
# "(gateway ws://h/api?token=abc)" keeps its ")".
_VALUE_END = "&#;\\s\"'`()\\[\\]<>{},|\\\\"
_SECRET = re.compile(
    r"(?i)((?:^|[?&;\s\"'`(\[<{,|])"
    r"(?:token|access_token|api_key|apikey|key|password|passwd|secret)=)"
    rf"[^{_VALUE_END}]*"
)
# scheme://userinfo@ : the userinfo may carry a password (or be a bare token).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/?#@\"`<>\[\]{}\\]+)@")
# An HTTP credential quoted in prose: "Authorization: Bearer abc".
_BEARER = re.compile(rf"(?i)\b(bearer\s+)[^{_VALUE_END}]+")


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _password = match.group(2).partition(":")
    # "user:secret@" keeps the user name; a bare "secret@" may be a token.
    return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"


def redact(text: str) -> str:
    """``text`` with every ``token=...`` value, URL password and bearer token as ``***``.

    Everything around a secret is kept as it was, so a message still reads.
    """
    # Every log line passes here: skip each pattern when its fixed part is absent.
    if "=" in text:
        text = _SECRET.sub(r"\1***", text)
    if "@" in text and "://" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "bearer" in text.lower():
        text = _BEARER.sub(r"\1***", text)
    return text


def with_token(url: str, token: str) -> str:
    """``url`` with its ``token`` query parameter set to ``token`` (added or
    replaced), percent-encoded so any character survives the trip."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="")))


def has_token(url: str) -> bool:
    """Whether ``url`` carries a non-empty ``token`` query parameter."""
    return any(k == "token" and v for k, v in parse_qsl(urlsplit(url).query))


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_text_token_host(url: str, token: str | None = None) -> str | None:
    """The host a token would reach unencrypted, or None.

    That is: ``url`` is ``ws://``, a token rides in it (or ``token`` is
    given), and its host is not loopback. The caller warns: anyone on the
    path can read the token.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "ws" or not parts.hostname:
        return None
    if not (token or has_token(url)):
        return None
    return None if is_loopback_host(parts.hostname) else parts.hostname
