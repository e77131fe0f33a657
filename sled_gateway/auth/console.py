"""Console sessions: the cookie a browser gets by opening ``/?token=<operator token>``,
or by signing in with OpenID Connect (:mod:`sled_gateway.auth.oidc`).

The cookie holds a random session id, not the operator token: a cookie leaks
more easily than a header (browsers send it to every port of the host name),
and a leaked session is one that ends at logout, expires, and is not the
credential the API and the MCP relay accept.

Sessions live in the store (only the SHA-256 of each id), so that replicas on
one database are one gateway to a browser: a session opened on one is valid
on every other, survives a restart, and a logout anywhere ends it everywhere
(at once where the bus carries the word, within :data:`SESSION_CACHE_S`
otherwise). A session from another gateway's database is unknown here.

A session opened with the operator token acts as the operator; one opened by
a sign-in remembers the :class:`~sled_gateway.people.Person` and acts with
the roles the :class:`~sled_gateway.people.Grants` give them, looked up on
every request (a changed access file applies at once). Each login makes a
new session id and ends the one the browser brought (no session fixation).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, NamedTuple

from loguru import logger
from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.bus import Bus, Message
from sled_gateway.people import Grants, NoGrants, Person
from sled_gateway.principal import Channel, Principal
from sled_gateway.store import Store, StoreError, make_store

log = logger.bind(actor="gateway")

SESSION_TTL = 24 * 3600.0  # a console session lasts a day, or until logout
MAX_SESSIONS = 1000  # the oldest go first beyond: the cap bounds the table
#: Sessions one person may hold at once (their oldest ends beyond): anyone with an
#: account at the identity provider can sign in, and must not be able to push every
#: other session (the operator's included) out of MAX_SESSIONS by signing in again
#: and again.
MAX_SESSIONS_PER_PERSON = 10
#: How long a replica answers from what it last read of a session before reading the
#: database again. A logout or a session pushed out on another replica takes effect
#: here within this bound even when the bus lost the message that says so (with the
#: message, at once); an expiry takes effect exactly, since it is checked each time.
SESSION_CACHE_S = 1.0
#: Sessions (and unknown ids) a replica remembers at once; the least recently used go.
MAX_CACHED = 10_000
#: The bus subject on which a replica says which sessions ended (hashed ids only).
SESSIONS_SUBJECT = "gateway.sessions"


class Session(NamedTuple):
    expiry: float  # time.time(): replicas share the wall clock, not a monotonic one
    person: Person | None  # None: opened with the operator token


def _person_json(person: Person) -> str:
    return json.dumps(
        {
            "issuer": person.issuer,
            "sub": person.sub,
            "email": person.email,
            "name": person.name,
            "groups": sorted(person.groups),
        },
        separators=(",", ":"),
    )


def _person_from_json(text: str) -> Person:
    data = json.loads(text)
    return Person(
        issuer=data["issuer"],
        sub=data["sub"],
        email=data.get("email"),
        name=data.get("name"),
        groups=frozenset(data.get("groups") or ()),
    )


class Sessions:
    """Console sessions in the store: random ids, kept hashed, expiring, bounded in number.

    Every replica on one database sees every session; each keeps what it read for
    :data:`SESSION_CACHE_S` at most, and forgets at once a session another replica
    says (on the bus) has ended.
    """

    def __init__(
        self,
        store: Store | None = None,
        bus: Bus | None = None,
        *,
        ttl: float = SESSION_TTL,
        limit: int = MAX_SESSIONS,
        per_person: int = MAX_SESSIONS_PER_PERSON,
        cache_seconds: float = SESSION_CACHE_S,
    ) -> None:
        # No store: one of its own in memory (a gateway always passes its store).
        self.store: Store = store if store is not None else make_store().open()
        self.bus = bus
        self.ttl = ttl
        self.limit = limit
        self.per_person = per_person
        self.cache_seconds = cache_seconds
        # sha256(id) → (when read, time.monotonic(); the session, or None: unknown)
        self._cache: OrderedDict[str, tuple[float, Session | None]] = OrderedDict()

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()

    def _remember(self, key: str, session: Session | None) -> None:
        self._cache[key] = (time.monotonic(), session)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop what this replica read of these hashed ids (they ended elsewhere)."""
        for key in keys:
            self._cache.pop(key, None)

    def forget_all(self) -> None:
        """Read every session afresh (the bus was away: its messages may be lost)."""
        self._cache.clear()

    def on_bus_message(self, message: Message) -> None:
        """A replica's ``{"ended": [hashed ids]}`` on :data:`SESSIONS_SUBJECT`."""
        ended = message.get("ended")
        if isinstance(ended, list):
            self.forget(k for k in ended if isinstance(k, str))

    async def create(self, person: Person | None = None) -> str:
        """A new session's id (StoreError if it could not be committed)."""
        session_id = secrets.token_urlsafe(32)
        key = self._key(session_id)
        expiry = time.time() + self.ttl
        await self.store.add_console_session(
            key,
            None if person is None else person.id,
            None if person is None else _person_json(person),
            expiry,
            per_person=self.per_person,
            limit=self.limit,
        )
        if person is not None:
            # Their oldest may have been pushed out: read theirs again on next use here
            # (other replicas within SESSION_CACHE_S).
            self.forget([k for k, (_, s) in self._cache.items() if s and s.person == person])
        self._remember(key, Session(expiry, person))
        return session_id

    async def get(self, session_id: str) -> Session | None:
        """The live session of this id, or None (unknown, ended or expired);
        StoreError when the database cannot say."""
        key = self._key(session_id)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            session = cached[1]
        else:
            row = await self.store.console_session(key)
            session = None
            if row is not None:
                try:
                    person = None if row.person is None else _person_from_json(row.person)
                except (ValueError, KeyError, TypeError):
                    log.exception("console session row with an unreadable person; refused")
                else:
                    session = Session(row.expires_at, person)
            self._remember(key, session)
        if session is not None and session.expiry <= time.time():
            return None
        return session

    async def valid(self, session_id: str) -> bool:
        return await self.get(session_id) is not None

    async def end(self, session_id: str) -> bool:
        """End a session everywhere (logout, or a new login in the same browser); whether
        it was live. The other replicas hear it on the bus, or read it within
        :data:`SESSION_CACHE_S`."""
        key = self._key(session_id)
        self.forget([key])
        ended = await self.store.end_console_session(key)
        self._remember(key, None)
        if self.bus is not None:
            self.bus.publish(SESSIONS_SUBJECT, {"ended": [key]})
        return ended


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def addressed_port(scope: Mapping[str, Any]) -> int:
    """The port the browser addressed: the ``Host`` header's (its scheme's default when it
    names none), else the listening socket's. Behind a load balancer that is the balancer's
    port, the same for every replica, so a cookie set by one is read by all."""
    for name, value in scope.get("headers") or ():
        if name == b"host":
            host = value.decode("latin-1")
            _, colon, port = host.rpartition(":")
            if colon and port.isdigit() and not host.endswith("]"):
                return int(port)
            return _DEFAULT_PORTS.get(str(scope.get("scheme", "http")), 80)
    server = scope.get("server") or (None, None)
    return int(server[1] or 0)


def cookie_name(scope: Mapping[str, Any]) -> str:
    # Per port: two gateways on one host name must not overwrite each other.
    return f"sled_gateway_{addressed_port(scope)}"


def session_cookie(conn: HTTPConnection) -> str | None:
    """The console session id the request carries, if any; AuthenticationError if the
    Cookie header does not parse."""
    raw_cookie = conn.headers.get("cookie")
    if not raw_cookie:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw_cookie)
    except CookieError:
        raise AuthenticationError("unreadable cookie header") from None
    morsel = jar.get(cookie_name(conn.scope))
    return None if morsel is None else morsel.value


class ConsoleSessionBackend(AuthenticationBackend):
    """The console's session cookie → the operator, or the signed-in person, channel
    ``console``."""

    def __init__(self, sessions: Sessions | None = None, grants: Grants | None = None) -> None:
        self.sessions = sessions if sessions is not None else Sessions()
        self.grants: Grants = grants if grants is not None else NoGrants()
        self._principal = Principal.operator(Channel.CONSOLE)

    async def authenticate(self, conn: HTTPConnection) -> Authenticated | None:
        session_id = session_cookie(conn)
        try:
            session = None if session_id is None else await self.sessions.get(session_id)
        except StoreError as exc:
            # Fail closed: a session the database cannot confirm opens nothing.
            log.warning("console session not checked (the store: {}); refused", exc)
            raise AuthenticationError("the store cannot check the session now") from None
        if session is None:
            return None
        if session.person is None:
            return authenticated(self._principal)
        principal = self.grants.principal_for(session.person, Channel.CONSOLE)
        return authenticated(principal, session.person)

    async def start(self, response: Response, conn: HTTPConnection, person: Person | None) -> None:
        """Put a NEW session's cookie on ``response`` and end the one ``conn`` brought:
        whatever id a browser had before a login (planted by someone else, or its own
        last one) is never the one it has after."""
        try:
            previous = session_cookie(conn)
        except AuthenticationError:
            previous = None
        if previous is not None:
            await self.sessions.end(previous)
        response.set_cookie(
            cookie_name(conn.scope),
            await self.sessions.create(person),
            max_age=int(self.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=conn.scope.get("scheme") == "https",
        )

    async def end(self, conn: HTTPConnection, response: Response) -> bool:
        """Logout: end the request's session and clear its cookie; whether one was live."""
        try:
            session_id = session_cookie(conn)
        except AuthenticationError:
            session_id = None
        ended = session_id is not None and await self.sessions.end(session_id)
        response.delete_cookie(
            cookie_name(conn.scope),
            path="/",
            httponly=True,
            samesite="strict",
            secure=conn.scope.get("scheme") == "https",
        )
        return ended

    async def login(self, scope: Mapping[str, Any]) -> Response:
        """The answer to a right ``/?token=``: a new operator session's cookie, and back
        to ``/``; ``503`` when the store cannot keep the session."""
        response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        try:
            await self.start(
                response, HTTPConnection({"type": "http", "headers": [], **scope}), None
            )
        except StoreError as exc:
            log.warning("console login: the session could not be stored: {}", exc)
            return PlainTextResponse(
                "The gateway cannot open a console session now (its database is unavailable); "
                "try again shortly.",
                503,
                headers={"Cache-Control": "no-store", "Retry-After": "5"},
            )
        return response
