"""The gateway's request guard: Host allowlist, operator authentication, CSRF, headers.

One ASGI wrapper around the whole application, so that a route added later
is protected from birth instead of by remembering a decorator. In order, for
every request:

0. A ``Host``, ``Origin`` or ``Authorization`` header sent more than once
   gets ``400``: the first one would win here, and whatever reads the other
   (a proxy, a browser) could see another request than the one checked.
1. **Host allowlist** (everything, the sled WebSocket and ``/healthz``
   included): a ``Host`` that is not an allowed name gets ``421`` before any
   routing. A DNS-rebinding page (``evil.example`` resolving to 127.0.0.1)
   sends its own name as ``Host``, so it never reaches a route.
2. **Public paths**: ``GET /healthz``, ``GET /readyz`` and the sled uplink path (whose own
   route checks the sled's token) pass without an operator credential. A
   WebSocket on any other path needs the operator credential, and is answered
   ``404`` (not ``401``) without it: a sled configured with a wrong path then
   learns that the *path* is wrong. The sled uplink's endpoint is called from here
   (``socket_endpoints``), after these checks, rather than through the router.
3. **Operator authentication**, by the backends of :mod:`sled_gateway.auth`:
   ``Authorization: Bearer <token>`` (API and MCP clients; the principal's
   channel is ``api``; a person API token acts as its person) or the session
   cookie set by ``GET /?token=<token>`` (the console; ``console``). The
   principal goes into ``scope["user"]``.
   Without one: ``401`` with a JSON error, or for ``GET /`` a short HTML page
   that says to open the URL with the token. A cookie request that a browser
   marks as coming from another site (``Sec-Fetch-Site``) is refused: cookies
   are not port-scoped, so any page on another local port is "same site".
   A principal without even the ``viewer`` role (a person signed in whom no
   grant names) gets ``403`` with ``"needs": "viewer"`` everywhere but the
   console page, ``GET /api/me`` and ``POST /logout``: they may see who they
   are and sign out, and nothing else.
4. **CSRF**, for every state-changing method (POST, PUT, PATCH, DELETE):
   ``Content-Type: application/json`` or ``415`` (a no-JavaScript form or a
   ``no-cors`` fetch cannot send it), and an ``Origin``, when sent, that is
   this gateway's own origin or an allowed ``host:port``, else ``403``. A
   request on the console's cookie must send one: browsers send ``Origin`` on
   every POST and DELETE a page makes (the console's own fetches included), so
   one without it is not the console's (an old browser's form post, a client
   replaying the cookie), and it gets ``403``. A bearer token is never sent on
   its own, so API clients need no ``Origin``.

Every HTTP response also gets ``X-Frame-Options: DENY``, CSP
``frame-ancestors 'none'``, ``nosniff``, ``Referrer-Policy: no-referrer`` and
``Cross-Origin-Resource-Policy: same-origin``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loguru import logger
from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse
from starlette.websockets import WebSocket

from protocol import printable
from protocol.web import LOOPBACK_HOSTS, is_json_content_type, listen_host_entry, split_host
from sled_gateway.auth import PrincipalUser
from sled_gateway.auth.console import ConsoleSessionBackend
from sled_gateway.auth.operator import BearerTokenBackend, same_token
from sled_gateway.http.errors import error
from sled_gateway.principal import Channel, Principal, Role

log = logger.bind(actor="gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: What a principal with no role may still ask: the page, who they are, and to leave.
ROLELESS = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/api/me"), ("POST", "/logout")})

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
<code>SLED_GATEWAY_OPERATOR_TOKEN</code>.</p>{sign_in}
</body></html>
"""
_SIGN_IN = '<p>Or <a href="/login">sign in</a> with your identity provider.</p>'


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


#: Headers a check reads: sent twice, which one counts is ambiguous (a proxy or
#: a browser may read another than the guard), so the request is refused.
SINGLE_HEADERS = (b"host", b"origin", b"authorization")


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers, lower-case names; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or []:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _repeated(scope: Scope) -> str | None:
    """The first of :data:`SINGLE_HEADERS` the request sends more than once, if any."""
    seen: set[bytes] = set()
    for name, _ in scope.get("headers") or []:
        lowered = bytes(name).lower()
        if lowered in SINGLE_HEADERS:
            if lowered in seen:
                return lowered.decode("latin-1").title()
            seen.add(lowered)
    return None


class RequestGuard:
    """Wraps the gateway's ASGI app; see the module docstring for what it checks."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        operator: BearerTokenBackend,
        console: ConsoleSessionBackend,
        allowed_hosts: AllowedHosts,
        person_tokens: AuthenticationBackend | None = None,
        public_http: Iterable[tuple[str, str]] = (
            ("GET", "/healthz"),
            ("HEAD", "/healthz"),
            ("GET", "/readyz"),
            ("HEAD", "/readyz"),
        ),
        public_websockets: Iterable[str] = (),
        public_http_paths: Iterable[str] = (),
        sign_in: bool = False,
        socket_endpoints: Mapping[str, Callable[[WebSocket], Awaitable[None]]] | None = None,
    ) -> None:
        self.app = app
        # Public WebSocket paths answered here, past ``app``'s router and middleware
        # (which add nothing to a WebSocket: no HTTP error page, no exception handler
        # a socket endpoint relies on). A sled's socket lives for days, and every layer
        # it passes keeps a coroutine frame for as long: about 5 KiB a sled in all.
        self._socket_endpoints = dict(socket_endpoints or {})
        self.operator = operator
        self.console = console
        # Tried in order; the first that finds its credential decides. A person
        # token goes first: the operator backend refuses every other bearer value.
        self.backends: Sequence[AuthenticationBackend] = (
            *((person_tokens,) if person_tokens is not None else ()),
            operator,
            console,
        )
        self.allowed_hosts = allowed_hosts
        self._public_http = frozenset(public_http)
        self._public_http_paths = frozenset(public_http_paths)
        self._public_ws = frozenset(public_websockets)
        self._sign_in = _SIGN_IN if sign_in else ""  # the 401 page links to GET /login

    # -- helpers ------------------------------------------------------------------

    async def _authenticate(self, scope: Scope) -> PrincipalUser | None:
        conn = HTTPConnection(scope)
        for backend in self.backends:
            try:
                found = await backend.authenticate(conn)
            except AuthenticationError:
                return None
            if found is not None:
                credentials, user = found
                scope["auth"] = credentials
                scope["user"] = user
                assert isinstance(user, PrincipalUser)
                return user
        return None

    @staticmethod
    def _ambient(principal: Principal, headers: dict[str, str]) -> bool:
        """Whether the credential rode along on its own (a cookie, whoever's session it is),
        not an ``Authorization`` header, which a browser never sends unless a script sets it."""
        return principal.channel is Channel.CONSOLE or "authorization" not in headers

    @classmethod
    def _cross_site(cls, principal: Principal, headers: dict[str, str]) -> bool:
        if not cls._ambient(principal, headers):
            return False
        return headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")

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
        repeated = _repeated(scope)
        if repeated is not None:
            await error(400, f"more than one {repeated} header")(scope, receive, send)
            return
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
            await error(421, "this Host is not served here (see --allowed-host)")(
                scope, receive, send
            )
            return

        if kind == "websocket":
            # A WebSocket lives for days, and this frame with it: it need not keep the
            # headers (a sled's socket is most of a gateway's memory).
            if path in self._public_ws:
                del headers
                endpoint = self._socket_endpoints.get(path)
                if endpoint is not None:
                    await endpoint(WebSocket(scope, receive, send))
                else:
                    await self.app(scope, receive, send)
                return
            user = await self._authenticate(scope)
            if (
                user is None
                or self._cross_site(user.principal, headers)
                or not user.principal.has_somewhere(Role.VIEWER)
            ):
                await error(404, f"no WebSocket endpoint at {printable(path, 200)}")(
                    scope, receive, send
                )
                return
            del headers
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

        user = await self._authenticate(scope)
        if user is None:
            if path == "/" and method in ("GET", "HEAD"):
                page = _LOGIN_PAGE.format(
                    why="This console needs the operator token.", sign_in=self._sign_in
                )
                await HTMLResponse(page, 401, headers={"Cache-Control": "no-store"})(
                    scope, receive, send
                )
            else:
                await error(
                    401,
                    "unauthorized: send Authorization: Bearer <operator token>",
                    headers={"WWW-Authenticate": 'Bearer realm="sled-gateway"'},
                )(scope, receive, send)
            return
        if self._cross_site(user.principal, headers) and not (
            path == "/" and method in ("GET", "HEAD")
        ):
            # The console's own fetches are same-origin; a page on another
            # port or site riding on the cookie is not.
            await error(403, "cross-site request refused")(scope, receive, send)
            return
        if not user.principal.has_somewhere(Role.VIEWER) and (method, path) not in ROLELESS:
            await error(
                403,
                f"{printable(user.principal.who, 200)} has no role on this gateway",
                needs=Role.VIEWER.value,
            )(scope, receive, send)
            return

        if method in UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is None and self._ambient(user.principal, headers):
                log.warning(
                    "refused {} {} on the console cookie without Origin",
                    method,
                    printable(path, 200),
                )
                await error(403, "cross-origin request refused (a console request needs Origin)")(
                    scope, receive, send
                )
                return
            if origin is not None and not self._origin_ok(origin, host, scope.get("scheme", "")):
                log.warning(
                    "refused {} {} from Origin '{}' (not this gateway's origin)",
                    method,
                    printable(path, 200),
                    printable(origin, 200),
                )
                await error(403, "cross-origin request refused (Origin)")(scope, receive, send)
                return
            if not is_json_content_type(headers.get("content-type")):
                await error(415, "Content-Type must be application/json")(scope, receive, send)
                return

        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        if not same_token(token, self.operator.token):
            client = scope.get("client") or ("?", 0)
            log.warning("console login with a wrong token from {}:{}", client[0], client[1])
            page = _LOGIN_PAGE.format(
                why="That token is not this gateway's operator token.", sign_in=self._sign_in
            )
            await HTMLResponse(page, 401, headers={"Cache-Control": "no-store"})(
                scope, receive, send
            )
            return
        await (await self.console.login(scope))(scope, receive, send)

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
