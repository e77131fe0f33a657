"""The gateway's front door: Host allowlist, operator authentication, CSRF, headers.

One ASGI wrapper around the whole application, so that a route added later
is protected from birth instead of by remembering a decorator. In order, for
every request:

1. **Host allowlist** (everything, the sled WebSocket and ``/healthz``
   included): a ``Host`` that is not an allowed name gets ``421`` before any
   routing. A DNS-rebinding page (``evil.example`` resolving to 127.0.0.1)
   sends its own name as ``Host``, so it never reaches a route.
2. **Public paths**: ``GET /healthz`` and the sled uplink path (whose own
   route checks the sled's token) pass without an operator credential. A
   WebSocket on any other path needs the operator credential, and is answered
   ``404`` (not ``401``) without it: a sled configured with a wrong path then
   learns that the *path* is wrong.
3. **Operator authentication**: ``Authorization: Bearer <token>`` (API and
   MCP clients; the decision is recorded ``by="api"``) or the session cookie
   set by ``GET /?token=<token>`` (the console; ``by="console"``). Without
   one: ``401`` with a JSON error, or for ``GET /`` a short HTML page that
   says to open the URL with the token. A cookie request that a browser marks
   as coming from another site (``Sec-Fetch-Site``) is refused: cookies are
   not port-scoped, so any page on another local port is "same site".
4. **CSRF**, for every state-changing method (POST, PUT, PATCH, DELETE):
   ``Content-Type: application/json`` or ``415`` (a no-JavaScript form or a
   ``no-cors`` fetch cannot send it), and an ``Origin``, when sent, that is
   this gateway's own origin or an allowed ``host:port``, else ``403``.

Every HTTP response also gets ``X-Frame-Options: DENY``, CSP
``frame-ancestors 'none'``, ``nosniff``, ``Referrer-Policy: no-referrer`` and
``Cross-Origin-Resource-Policy: same-origin``.

The cookie holds a random session id, not the operator token: a cookie leaks
more easily than a header (browsers send it to every port of the host name),
and a leaked session is one that ends with the gateway process, expires, and
is not the credential the API and the MCP relay accept.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loguru import logger
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse

from protocol import printable
from protocol.web import (
    LOOPBACK_HOSTS,
    error_body,
    is_json_content_type,
    listen_host_entry,
    split_host,
)

log = logger.bind(actor="gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key where the wrapper records who is asking: "api" or "console".
PRINCIPAL_KEY = "sled_gateway.by"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SESSION_TTL = 24 * 3600.0  # a console session lasts a day, or until the gateway stops
MAX_SESSIONS = 1000  # only token holders can create them; the cap bounds memory anyway

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
FRAME_CSP = (b"content-security-policy", b"frame-ancestors 'none'")

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sled gateway: token needed</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>Sled gateway</h1>
<p>{why}</p>
<p>Open the console with the URL the gateway printed when it started:
<code>http://HOST:PORT/?token=&lt;operator token&gt;</code>.
The token is the one given with <code>--operator-token</code> or
<code>SLED_GATEWAY_OPERATOR_TOKEN</code>.</p>
</body></html>
"""


class AllowedHosts:
    """The names (optionally ``name:port``) this gateway answers to."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()  # any port
        self.exact: set[tuple[str, int]] = set()  # only this port
        self.shown: list[str] = []
        for entry in entries:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"not a host name or host:port: {entry!r}")
            name, port = parsed
            if port is None:
                self.names.add(name)
            else:
                self.exact.add((name, port))
            self.shown.append(entry)

    @classmethod
    def default(cls, listen_host: str, extra: Iterable[str] | None = None) -> AllowedHosts:
        # The loopback names, the --listen host and the --allowed-host entries.
        entries: list[str] = list(LOOPBACK_HOSTS)
        listen_entry = listen_host_entry(listen_host)
        if listen_entry is not None:
            entries.append(listen_entry)
        if extra:
            entries.extend(extra)
        return cls(entries)

    def allows(self, host: str, port: int | None) -> bool:
        return host in self.names or (port is not None and (host, port) in self.exact)

    def allows_origin(self, host: str, port: int) -> bool:
        """An Origin other than our own: only an entry that names this exact port."""
        return (host, port) in self.exact


class Sessions:
    """Console sessions: random ids, stored hashed, expiring, bounded in number."""

    def __init__(self, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._expiry: OrderedDict[str, float] = OrderedDict()  # sha256(id) → monotonic expiry

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()

    def create(self) -> str:
        session_id = secrets.token_urlsafe(32)
        self._expiry[self._key(session_id)] = time.monotonic() + self.ttl
        while len(self._expiry) > self.limit:
            self._expiry.popitem(last=False)
        return session_id

    def valid(self, session_id: str) -> bool:
        key = self._key(session_id)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._expiry[key]
            return False
        return True


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers, lower-case names; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or []:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _same_token(given: str, expected: bytes) -> bool:
    # Constant time, on bytes: compare_digest refuses non-ASCII str.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)


def json_error(
    status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """Every error answer of the gateway: ``{"error": message, **extra}`` with ``status``."""
    return JSONResponse(error_body(message, **extra), status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class _Verdict:
    by: str | None  # "api" | "console" | None (no valid credential)
    cross_site: bool = False


class SecurityMiddleware:
    """Wraps the gateway's ASGI app; see the module docstring for what it checks."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        operator_token: str,
        allowed_hosts: AllowedHosts,
        public_http: Iterable[tuple[str, str]] = (("GET", "/healthz"), ("HEAD", "/healthz")),
        public_websockets: Iterable[str] = (),
        public_http_paths: Iterable[str] = (),
    ) -> None:
        if not operator_token:
            raise ValueError("the operator token must be a non-empty string")
        self.app = app
        self._token = operator_token.encode("utf-8", "surrogatepass")
        self.allowed_hosts = allowed_hosts
        self.sessions = Sessions()
        self._public_http = frozenset(public_http)
        self._public_http_paths = frozenset(public_http_paths)
        self._public_ws = frozenset(public_websockets)

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def cookie_name(scope: Scope) -> str:
        # Per port: two gateways on one host name must not overwrite each other.
        server = scope.get("server") or (None, None)
        return f"sled_gateway_{server[1] or 0}"

    def _credential(self, scope: Scope, headers: dict[str, str]) -> _Verdict:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return _Verdict("api" if _same_token(value.strip(), self._token) else None)
        raw_cookie = headers.get("cookie")
        if raw_cookie:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw_cookie)
            except CookieError:
                return _Verdict(None)
            morsel = jar.get(self.cookie_name(scope))
            if morsel is not None and self.sessions.valid(morsel.value):
                site = headers.get("sec-fetch-site", "same-origin")
                return _Verdict("console", cross_site=site not in ("same-origin", "none"))
        return _Verdict(None)

    def _origin_ok(self, origin: str, host: tuple[str, int | None], scheme: str) -> bool:
        if origin == "null":
            return False
        try:
            parts = urlsplit(origin)
            o_port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        o_host = parts.hostname.lower().rstrip(".")
        default = 443 if parts.scheme == "https" else 80
        o_port = o_port if o_port is not None else default
        h_host, h_port = host
        # Our own origin: the same name and port the browser sent as Host (a
        # Host without a port is the default port of the page's scheme).
        if o_host == h_host and o_port == (h_port if h_port is not None else default):
            return True
        return self.allowed_hosts.allows_origin(o_host, o_port)

    # -- the ASGI entry point -----------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        send = self._with_headers(send)
        headers = _headers(scope)
        path = scope.get("path", "")
        host = split_host(headers.get("host", ""))
        if host is None or not self.allowed_hosts.allows(*host):
            client = scope.get("client") or ("?", 0)
            log.warning(
                "refused a request for {} with Host '{}' from {}:{} (not an allowed host)",
                printable(path, 200),
                printable(headers.get("host", ""), 200),
                client[0],
                client[1],
            )
            await json_error(421, "this Host is not served here (see --allowed-host)")(
                scope, receive, send
            )
            return

        if kind == "websocket":
            if path in self._public_ws:
                await self.app(scope, receive, send)
                return
            verdict = self._credential(scope, headers)
            if verdict.by is None or verdict.cross_site:
                await json_error(404, f"no WebSocket endpoint at {printable(path, 200)}")(
                    scope, receive, send
                )
                return
            scope[PRINCIPAL_KEY] = verdict.by
            await self.app(scope, receive, send)
            return

        method = scope.get("method", "GET")
        if (method, path) in self._public_http or (
            path in self._public_http_paths and method in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return

        if path == "/" and method in ("GET", "HEAD"):
            token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if token is not None:
                await self._login(scope, receive, send, token[0])
                return

        verdict = self._credential(scope, headers)
        if verdict.by is None:
            if path == "/" and method in ("GET", "HEAD"):
                page = _LOGIN_PAGE.format(why="This console needs the operator token.")
                await HTMLResponse(page, 401, headers={"Cache-Control": "no-store"})(
                    scope, receive, send
                )
            else:
                await json_error(
                    401,
                    "unauthorized: send Authorization: Bearer <operator token>",
                    headers={"WWW-Authenticate": 'Bearer realm="sled-gateway"'},
                )(scope, receive, send)
            return
        if verdict.cross_site and not (path == "/" and method in ("GET", "HEAD")):
            # The console's own fetches are same-origin; a page on another
            # port or site riding on the cookie is not.
            await json_error(403, "cross-site request refused")(scope, receive, send)
            return

        if method in UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not self._origin_ok(origin, host, scope.get("scheme", "")):
                log.warning(
                    "refused {} {} from Origin '{}' (not this gateway's origin)",
                    method,
                    printable(path, 200),
                    printable(origin, 200),
                )
                await json_error(403, "cross-origin request refused (Origin)")(scope, receive, send)
                return
            if not is_json_content_type(headers.get("content-type")):
                await json_error(415, "Content-Type must be application/json")(scope, receive, send)
                return

        scope[PRINCIPAL_KEY] = verdict.by
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        if not _same_token(token, self._token):
            client = scope.get("client") or ("?", 0)
            log.warning("console login with a wrong token from {}:{}", client[0], client[1])
            page = _LOGIN_PAGE.format(why="That token is not this gateway's operator token.")
            await HTMLResponse(page, 401, headers={"Cache-Control": "no-store"})(
                scope, receive, send
            )
            return
        response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            self.cookie_name(scope),
            self.sessions.create(),
            max_age=int(self.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
        await response(scope, receive, send)

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [h for h in SECURITY_HEADERS if h[0] not in present]
                if FRAME_CSP[0] not in present:
                    extra.append(FRAME_CSP)
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return wrapped
