"""Console sessions: the cookie a browser gets by opening ``/?token=<operator token>``,
or by signing in with OpenID Connect (:mod:`sled_gateway.auth.oidc`).

The cookie holds a random session id, not the operator token: a cookie leaks
more easily than a header (browsers send it to every port of the host name),
and a leaked session is one that ends with the gateway process, expires, and
is not the credential the API and the MCP relay accept.

A session opened with the operator token acts as the operator; one opened by
a sign-in remembers the :class:`~sled_gateway.people.Person` and acts with
the roles the :class:`~sled_gateway.people.Grants` give them, looked up on
every request (a changed access file applies at once). Each login makes a
new session id and ends the one the browser brought (no session fixation).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, NamedTuple

from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import RedirectResponse, Response

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.people import Grants, NoGrants, Person
from sled_gateway.principal import Channel, Principal

SESSION_TTL = 24 * 3600.0  # a console session lasts a day, or until the gateway stops
MAX_SESSIONS = 1000  # the oldest go first beyond: the cap bounds memory
#: Sessions one person may hold at once (their oldest ends beyond): anyone with an
#: account at the identity provider can sign in, and must not be able to push every
#: other session (the operator's included) out of MAX_SESSIONS by signing in again
#: and again.
MAX_SESSIONS_PER_PERSON = 10


class Session(NamedTuple):
    expiry: float  # time.monotonic()
    person: Person | None  # None: opened with the operator token


class Sessions:
    """Console sessions: random ids, stored hashed, expiring, bounded in number."""

    def __init__(
        self,
        ttl: float = SESSION_TTL,
        limit: int = MAX_SESSIONS,
        per_person: int = MAX_SESSIONS_PER_PERSON,
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.per_person = per_person
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # sha256(id) → session

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()

    def create(self, person: Person | None = None) -> str:
        if person is not None:
            theirs = [k for k, s in self._sessions.items() if s.person == person]  # oldest first
            for key in theirs[: max(0, len(theirs) - self.per_person + 1)]:
                del self._sessions[key]
        session_id = secrets.token_urlsafe(32)
        self._sessions[self._key(session_id)] = Session(time.monotonic() + self.ttl, person)
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return session_id

    def get(self, session_id: str) -> Session | None:
        """The live session of this id, or None (unknown, ended or expired)."""
        key = self._key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expiry < time.monotonic():
            del self._sessions[key]
            return None
        return session

    def valid(self, session_id: str) -> bool:
        return self.get(session_id) is not None

    def end(self, session_id: str) -> bool:
        """End a session (logout, or a new login in the same browser); whether it was live."""
        return self._sessions.pop(self._key(session_id), None) is not None


def cookie_name(scope: Mapping[str, Any]) -> str:
    # Per port: two gateways on one host name must not overwrite each other.
    server = scope.get("server") or (None, None)
    return f"sled_gateway_{server[1] or 0}"


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
        session = None if session_id is None else self.sessions.get(session_id)
        if session is None:
            return None
        if session.person is None:
            return authenticated(self._principal)
        principal = self.grants.principal_for(session.person, Channel.CONSOLE)
        return authenticated(principal, session.person)

    def start(self, response: Response, conn: HTTPConnection, person: Person | None) -> None:
        """Put a NEW session's cookie on ``response`` and end the one ``conn`` brought:
        whatever id a browser had before a login (planted by someone else, or its own
        last one) is never the one it has after."""
        try:
            previous = session_cookie(conn)
        except AuthenticationError:
            previous = None
        if previous is not None:
            self.sessions.end(previous)
        response.set_cookie(
            cookie_name(conn.scope),
            self.sessions.create(person),
            max_age=int(self.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=conn.scope.get("scheme") == "https",
        )

    def end(self, conn: HTTPConnection, response: Response) -> bool:
        """Logout: end the request's session and clear its cookie; whether one was live."""
        try:
            session_id = session_cookie(conn)
        except AuthenticationError:
            session_id = None
        ended = session_id is not None and self.sessions.end(session_id)
        response.delete_cookie(
            cookie_name(conn.scope),
            path="/",
            httponly=True,
            samesite="strict",
            secure=conn.scope.get("scheme") == "https",
        )
        return ended

    def login(self, scope: Mapping[str, Any]) -> RedirectResponse:
        """The answer to a right ``/?token=``: a new operator session's cookie, and back
        to ``/``."""
        response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        self.start(response, HTTPConnection({"type": "http", "headers": [], **scope}), None)
        return response
