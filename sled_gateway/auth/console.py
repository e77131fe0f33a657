"""Console sessions: the cookie a browser gets by opening ``/?token=<operator token>``.

The cookie holds a random session id, not the operator token: a cookie leaks
more easily than a header (browsers send it to every port of the host name),
and a leaked session is one that ends with the gateway process, expires, and
is not the credential the API and the MCP relay accept.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import RedirectResponse

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.principal import Channel, Principal

SESSION_TTL = 24 * 3600.0  # a console session lasts a day, or until the gateway stops
MAX_SESSIONS = 1000  # only token holders can create them; the cap bounds memory anyway


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


def cookie_name(scope: Mapping[str, Any]) -> str:
    # Per port: two gateways on one host name must not overwrite each other.
    server = scope.get("server") or (None, None)
    return f"sled_gateway_{server[1] or 0}"


class ConsoleSessionBackend(AuthenticationBackend):
    """The console's session cookie → the operator, channel ``console``."""

    def __init__(self, sessions: Sessions | None = None) -> None:
        self.sessions = sessions if sessions is not None else Sessions()
        self._principal = Principal.operator(Channel.CONSOLE)

    async def authenticate(self, conn: HTTPConnection) -> Authenticated | None:
        raw_cookie = conn.headers.get("cookie")
        if not raw_cookie:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw_cookie)
        except CookieError:
            raise AuthenticationError("unreadable cookie header") from None
        morsel = jar.get(cookie_name(conn.scope))
        if morsel is None or not self.sessions.valid(morsel.value):
            return None
        return authenticated(self._principal)

    def login(self, scope: Mapping[str, Any]) -> RedirectResponse:
        """The answer to a right ``/?token=``: a new session's cookie, and back to ``/``."""
        response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            cookie_name(scope),
            self.sessions.create(),
            max_age=int(self.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
        return response
