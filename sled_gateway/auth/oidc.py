"""Sign-in with OpenID Connect: ``GET /login``, ``GET /auth/callback``, ``POST /logout``.

The code flow with PKCE (S256), run by Authlib's Starlette client: discovery
and the signing keys come from the issuer; ``state`` and ``nonce`` are made
and checked by Authlib, and so is the ID token (signature, ``iss``, ``aud``,
``exp``, ``nonce``). Nothing here validates a token by hand.

Where the flow's state lives: in a server-side, single-use store (Authlib's
``cache``, kept in the gateway's database so that any replica can end a login
another started), with a marker in a short-lived, signed cookie of the browser
that started the login (Starlette's ``SessionMiddleware``, only on these two
paths, its key made once per database and shared by the replicas). A
callback is accepted once, and only in that browser: a replayed callback
finds no state, and an attacker's callback URL opened in a victim's
browser (login CSRF) finds no marker.

A successful callback opens a NEW console session that remembers the
:class:`~sled_gateway.people.Person` (the browser's previous session, if any,
is ended), and answers with a page that moves on to ``/``: the console cookie
is ``SameSite=Strict``, which a browser withholds on the redirects of a login
that started at the provider's site.

``GET /login`` is public, so starting sign-ins is limited per client (a token
bucket and a share of the logins in flight, :mod:`sled_gateway.auth.login_limits`:
``429`` with ``Retry-After``), and a full table of logins in flight refuses new
ones (``503``) rather than forgetting one someone else started: a flood of
``/login`` cannot fail a person's sign-in halfway.

The provider unreachable (or answering nonsense) → ``503`` saying so, never a
``500``; people already signed in are not affected (their sessions are the
gateway's own).
"""

from __future__ import annotations

import html
import secrets
import time
from contextvars import ContextVar
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.base_client.errors import MismatchingStateError
from authlib.integrations.starlette_client import OAuth
from joserfc.errors import JoseError
from loguru import logger
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol import printable
from sled_gateway.auth.console import ConsoleSessionBackend, addressed_port
from sled_gateway.auth.login_limits import (
    LOG_WINDOW,
    MAX_LOGINS,
    LoginLimiter,
    Refusal,
    client_key,
)
from sled_gateway.people import Person
from sled_gateway.store import ClientLoginsFull, LoginsFull, Store, StoreError

log = logger.bind(actor="gateway")

# Authlib's HTTP client is httpx2 where installed, else httpx: a provider that
# cannot be reached raises either one's HTTPError (or, for a document that is
# not JSON, a ValueError).
try:
    import httpx2

    HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx2.HTTPError)
except ImportError:  # pragma: no cover (Authlib falls back to httpx)
    HTTP_ERRORS = (httpx.HTTPError,)
_METADATA_ERRORS: tuple[type[Exception], ...] = (*HTTP_ERRORS, ValueError)

LOGIN_PATH = "/login"
CALLBACK_PATH = "/auth/callback"
LOGOUT_PATH = "/logout"
ME_PATH = "/api/me"
#: How long a started login may take at the provider before its state is forgotten.
LOGIN_TTL = 600
#: ``Retry-After`` of a refusal because the logins in flight are at MAX_LOGINS.
FULL_RETRY_AFTER = 60
#: The provider's answers (discovery, keys, token) must come within this.
PROVIDER_TIMEOUT = 10.0
#: The login state cookie's name (then ``_<port>``): a signed marker of the logins
#: this browser started.
STATE_COOKIE = "sled_gateway_oidc"
#: A login re-reads the discovery document when it is older than this: a provider
#: that went down is said so at /login, and anonymous /login requests cannot make
#: the gateway fetch it more often than this.
DISCOVERY_TTL = 5.0
#: The setting (in the store) holding the key that signs the login state cookie.
STATE_KEY_SETTING = "oidc_state_cookie_key"
_MAX_CLAIM = 500


#: The client starting the sign-in this task is serving (``login_limits.client_key``):
#: Authlib's cache interface has no room for it, and a login's row records it.
_STARTED_BY: ContextVar[str | None] = ContextVar("sled_login_started_by", default=None)


class StateStore:
    """Authlib's ``cache``: the logins in flight, each readable until deleted or expired.

    In the store, so that a login started on one replica ends on any other; bounded:
    beyond ``limit`` unexpired logins a new one is refused (``LoginsFull``), none is
    forgotten, and beyond ``per_client`` of them started by one client, counted over
    every replica, so is that client's (``ClientLoginsFull``). A store that cannot be
    reached fails the login (503).
    """

    def __init__(
        self, store: Store, limit: int = MAX_LOGINS, *, per_client: int | None = None
    ) -> None:
        self.store = store
        self.limit = limit
        self.per_client = per_client

    async def get(self, key: str) -> str | None:
        return await self.store.login_state(key)

    async def set(self, key: str, value: str, expires_in: float | None = None) -> None:
        # Authlib asks for an hour; the state cookie the callback needs lives LOGIN_TTL,
        # and a row kept longer would only hold a place in the bounded table.
        await self.store.set_login_state(
            key,
            value,
            min(expires_in or LOGIN_TTL, LOGIN_TTL),
            limit=self.limit,
            client=_STARTED_BY.get(),
            per_client=self.per_client,
        )

    async def delete(self, key: str) -> None:
        await self.store.delete_login_state(key)


def _text(value: Any) -> str | None:
    return printable(value, _MAX_CLAIM) if isinstance(value, str) and value else None


def person_from_claims(claims: dict[str, Any]) -> Person:
    """The person an ID token (already validated by Authlib) names.

    The email counts only when the provider says it verified it
    (``email_verified``): the access file grants roles by email, and a
    provider that lets anyone type any address must not hand them someone
    else's roles; without it the person is ``ISSUER|SUB``.
    """
    groups = claims.get("groups")
    return Person(
        issuer=str(claims["iss"]),
        sub=str(claims["sub"]),
        email=_text(claims.get("email")) if claims.get("email_verified") is True else None,
        name=_text(claims.get("name")),
        groups=frozenset(
            g for g in (groups if isinstance(groups, list) else []) if isinstance(g, str) and g
        ),
    )


def _wants_html(conn: HTTPConnection) -> bool:
    return "text/html" in conn.headers.get("accept", "")


def answer(
    conn: HTTPConnection, status: int, message: str, *, retry_after: int | None = None
) -> Response:
    """A refusal or failure: a short page for a browser, JSON for anything else."""
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if _wants_html(conn):
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            "<title>Sled gateway: sign-in</title></head>"
            '<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto">'
            f'<h1>Sign-in</h1><p role="alert">{html.escape(message)}</p>'
            '<p><a href="/login">Try again</a></p></body></html>'
        )
        return HTMLResponse(page, status, headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)


class _PerPortSessions:
    """Starlette's ``SessionMiddleware`` around the sign-in routes, with the cookie
    named per port as the console's is: two gateways on one host name must not
    overwrite each other's logins in flight. (An ASGI app, not a function, so that
    ``Route`` hands it the raw scope.)

    The key that signs the cookie is made once per database and read from it
    (:data:`STATE_KEY_SETTING`), so that every replica accepts the cookie of a login
    another started; it is read at the first sign-in, and never logged."""

    def __init__(self, app: ASGIApp, *, store: Store) -> None:
        self.app = app
        self.store = store
        self._secret_key: str | None = None
        self._by_port: dict[int, SessionMiddleware] = {}

    async def _key(self) -> str:
        if self._secret_key is None:
            self._secret_key = await self.store.setting(
                STATE_KEY_SETTING, lambda: secrets.token_urlsafe(32)
            )
        return self._secret_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            secret_key = await self._key()
        except StoreError as exc:
            log.warning("sign-in: the state key cannot be read: {}", exc)
            await answer(HTTPConnection(scope), 503, "the gateway cannot sign anyone in now")(
                scope, receive, send
            )
            return
        port = addressed_port(scope)
        middleware = self._by_port.get(port)
        if middleware is None:
            middleware = self._by_port[port] = SessionMiddleware(
                self.app,
                secret_key=secret_key,
                session_cookie=f"{STATE_COOKIE}_{port}",
                max_age=LOGIN_TTL,
                path="/",
                # Lax: the callback is a top-level navigation from the provider's site.
                same_site="lax",
            )
        await middleware(scope, receive, send)


class ProviderUnavailable(Exception):
    """The provider could not be reached, or its discovery document is not usable."""


class OidcLogin:
    """The sign-in routes, over one provider."""

    def __init__(
        self,
        console: ConsoleSessionBackend,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        store: Store,
        timeout: float = PROVIDER_TIMEOUT,
        limiter: LoginLimiter | None = None,
        max_logins: int = MAX_LOGINS,
    ) -> None:
        self.console = console
        self.issuer = issuer
        self.limiter = limiter if limiter is not None else LoginLimiter(ttl=LOGIN_TTL)
        self.states = StateStore(store, max_logins, per_client=self.limiter.in_flight)
        self._full_quiet_until = 0.0
        self._oauth = OAuth(cache=self.states)
        self.client = self._oauth.register(
            "sled",
            client_id=client_id,
            client_secret=client_secret,
            server_metadata_url=issuer.rstrip("/") + "/.well-known/openid-configuration",
            client_kwargs={
                "scope": "openid email profile groups",
                "code_challenge_method": "S256",
                "timeout": timeout,
                # A public client (no secret) names itself in the token request body.
                **({} if client_secret else {"token_endpoint_auth_method": "none"}),
            },
        )
        router = Router(
            routes=[
                Route(LOGIN_PATH, self._login, methods=["GET"]),
                Route(CALLBACK_PATH, self._callback, methods=["GET"]),
            ]
        )
        self._flow = _PerPortSessions(router, store=store)

    def routes(self) -> list[BaseRoute]:
        """``GET /login`` and ``GET /auth/callback`` (public: the guard lets them through)."""
        return [
            Route(LOGIN_PATH, self._flow, methods=["GET"]),
            Route(CALLBACK_PATH, self._flow, methods=["GET"]),
        ]

    async def _metadata(self, *, fresh: bool = False) -> None:
        """Load the provider's discovery document (again if ``fresh`` and it is older
        than :data:`DISCOVERY_TTL`: a login starts by reading it, so that a provider
        that is down is said so here, not after the redirect to it);
        ProviderUnavailable if it cannot."""
        loaded = self.client.server_metadata.get("_loaded_at")
        if fresh and (not isinstance(loaded, float) or time.time() - loaded > DISCOVERY_TTL):
            self.client.server_metadata.pop("_loaded_at", None)
        try:
            metadata = await self.client.load_server_metadata()
        except _METADATA_ERRORS as exc:
            self.client.server_metadata.pop("_loaded_at", None)
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from None
        # OpenID Connect Discovery 4.3: the document must name the issuer we asked.
        problem = None
        if str(metadata.get("issuer", "")).rstrip("/") != self.issuer.rstrip("/"):
            problem = f"its discovery document names the issuer {metadata.get('issuer')!r}"
        for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if problem is None and not isinstance(metadata.get(needed), str):
                problem = f"its discovery document has no {needed}"
        if problem is not None:
            self.client.server_metadata.clear()
            raise ProviderUnavailable(problem)

    def _redirect_uri(self, request: Request) -> str:
        # The Host passed the guard's allowlist; the provider also checks the
        # exact URI against the client's registration.
        return str(request.url.replace(path=CALLBACK_PATH, query="", fragment=""))

    async def _login(self, request: Request) -> Response:
        # Before anything else: a refused start costs no store write and no discovery.
        # (Counted now and given back if the provider could not be asked: requests in
        # flight at once must not all pass one check.)
        client = request.client.host if request.client else "?"
        refusal = self.limiter.start(client)
        if refusal is not None:
            return self._refused(request, client, refusal)
        # The column holds 64 characters; an address, or an IPv6 /64, is shorter.
        started_by = _STARTED_BY.set(client_key(client)[:64])
        try:
            await self._metadata(fresh=True)
            response: Response = await self.client.authorize_redirect(
                request, self._redirect_uri(request)
            )
        except ClientLoginsFull as exc:
            return self._refused(
                request, client, self.limiter.hold(client, exc.retry_after, str(exc))
            )
        except LoginsFull as exc:
            now = time.monotonic()
            if now >= self._full_quiet_until:
                self._full_quiet_until = now + LOG_WINDOW
                log.warning(
                    "sign-in: new logins refused: {} (not logged again for {:g} s)",
                    exc,
                    LOG_WINDOW,
                )
            return answer(
                request,
                503,
                "too many sign-ins are in progress; try again in a minute",
                retry_after=FULL_RETRY_AFTER,
            )
        except StoreError as exc:
            log.warning("sign-in: the login could not be stored: {}", exc)
            return answer(request, 503, "the gateway cannot sign anyone in now; try again")
        except ProviderUnavailable as exc:
            self.limiter.refund(client)
            log.warning("sign-in: the identity provider is unavailable: {}", printable(str(exc)))
            return answer(
                request,
                503,
                f"the identity provider ({self.issuer}) cannot be reached now; try again later",
            )
        finally:
            _STARTED_BY.reset(started_by)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _refused(self, request: Request, client: str, refusal: Refusal) -> Response:
        if refusal.log:
            log.warning(
                "sign-in: {} starts too many ({}); refused for {} s, not logged again for {:g} s",
                printable(client, 100),
                refusal.why,
                refusal.retry_after,
                LOG_WINDOW,
            )
        return answer(
            request,
            429,
            "too many sign-ins started from this address; try again later",
            retry_after=refusal.retry_after,
        )

    async def _callback(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        if "error" in request.query_params:
            # The person cancelled, or the provider refused them; nothing to exchange.
            why = printable(request.query_params["error"], 100)
            log.info("sign-in ended at the provider: {}", why)
            return answer(request, 400, f"sign-in ended at the identity provider: {why}")
        state = request.query_params.get("state", "")
        if not state or f"_state_{self.client.name}_{state}" not in request.session:
            # Authlib (>= 1.6) checks this marker too; the binding of a callback to the
            # browser that started the login (login CSRF) must not hang on its version.
            log.warning("sign-in refused from {}: no login in this browser has that state", client)
            return answer(
                request, 400, "sign-in refused: this login was not started in this browser"
            )
        try:
            await self._metadata()
            token = await self.client.authorize_access_token(request)
        except ProviderUnavailable as exc:
            log.warning("sign-in: the identity provider is unavailable: {}", printable(str(exc)))
            return answer(request, 503, "the identity provider cannot be reached now")
        except MismatchingStateError:
            log.warning("sign-in refused from {}: no login in this browser has that state", client)
            return answer(
                request, 400, "sign-in refused: this login was not started in this browser"
            )
        except HTTP_ERRORS as exc:
            log.warning("sign-in: the identity provider failed: {!r}", exc)
            return answer(request, 503, "the identity provider cannot be reached now")
        except (AuthlibBaseError, JoseError, ValueError, KeyError, TypeError) as exc:
            # The provider refused the code (used, expired), or the ID token did not
            # pass (signature, issuer, audience, expiry, nonce).
            log.warning("sign-in refused from {}: {!r}", client, exc)
            return answer(
                request, 401, "sign-in refused: the identity provider's answer is not valid"
            )
        claims = token.get("userinfo")
        if not claims:
            log.warning("sign-in refused from {}: no ID token in the provider's answer", client)
            return answer(request, 401, "sign-in refused: the provider sent no ID token")
        person = person_from_claims(dict(claims))
        log.info("signed in: {} ({})", printable(person.display, 200), printable(person.id, 300))
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="refresh" content="0;url=/">'
            "<title>Sled gateway: signed in</title></head><body>"
            f'<p>Signed in as {html.escape(person.display)}. <a href="/">Open the console</a>.</p>'
            "</body></html>"
        )
        response = HTMLResponse(page, headers={"Cache-Control": "no-store"})
        try:
            await self.console.start(response, request, person)
        except StoreError as exc:
            log.warning("sign-in: the session could not be stored: {}", exc)
            return answer(request, 503, "the gateway cannot open a session now; try again")
        return response


async def logout(request: Request, console: ConsoleSessionBackend) -> Response:
    """``POST /logout``: end the request's console session (the guard has checked it is
    one, and the request's CSRF headers)."""
    response = JSONResponse({"ok": True}, headers={"Cache-Control": "no-store"})
    try:
        ended = await console.end(request, response)
    except StoreError as exc:
        log.warning("sign-out: the session could not be ended: {}", exc)
        return answer(request, 503, "the gateway cannot end the session now; try again")
    if ended:
        log.info("signed out: {}", printable(getattr(request.user, "identity", "?"), 300))
    return response


async def not_configured(request: Request) -> Response:
    """``/login`` and ``/auth/callback`` of a gateway without ``--oidc-issuer``."""
    return answer(request, 404, "sign-in is not configured on this gateway (--oidc-issuer)")


def me(request: Request, *, sign_in: bool) -> Response:
    """``GET /api/me``: who this request acts as, and whether people can sign in here."""
    user = request.scope.get("user")
    person: Person | None = getattr(user, "person", None)
    principal = getattr(user, "principal", None)
    body: dict[str, Any] = {
        "who": principal.who if principal is not None else None,
        "channel": principal.channel.value if principal is not None else None,
        # Roles on every project, and those held on some projects only (the access file's
        # project globs): the console shows what this person may do where.
        "roles": sorted(r.value for r in principal.roles) if principal is not None else [],
        "project_roles": sorted({r.value for r, _ in principal.scoped})
        if principal is not None
        else [],
        "person": None,
        "sign_in": sign_in,
    }
    if person is not None:
        body["person"] = {
            "id": person.id,
            "display": person.display,
            "name": person.name,
            "email": person.email,
            "issuer": person.issuer,
            "sub": person.sub,
            "groups": sorted(person.groups),
        }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


__all__ = [
    "CALLBACK_PATH",
    "LOGIN_PATH",
    "LOGIN_TTL",
    "LOGOUT_PATH",
    "ME_PATH",
    "STATE_COOKIE",
    "OidcLogin",
    "StateStore",
    "logout",
    "me",
    "not_configured",
    "person_from_claims",
]
