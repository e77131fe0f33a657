"""Who is asking: Starlette authentication backends that each yield a :class:`Principal`.

- :class:`~sled_gateway.auth.operator.BearerTokenBackend`: ``Authorization:
  Bearer <operator token>`` (API and MCP clients), channel ``api``;
- :class:`~sled_gateway.auth.console.ConsoleSessionBackend`: the console's
  session cookie, channel ``console`` (and the ``/?token=`` login that sets it);
- :class:`~sled_gateway.auth.sled.SledTokenBackend`: a sled's ``?token=`` on
  the uplink WebSocket, channel ``sled``.

A backend answers ``None`` when its credential is absent and raises
``AuthenticationError`` when it is present but wrong. The request guard
(:mod:`sled_gateway.http.guard`) runs the operator backends and stores the
result the Starlette way (``scope["user"]``, ``scope["auth"]``); a handler
gets the principal with :func:`principal_of`.
"""

from __future__ import annotations

from starlette.authentication import AuthCredentials, BaseUser
from starlette.requests import HTTPConnection

from sled_gateway.people import Person
from sled_gateway.principal import Principal


class PrincipalUser(BaseUser):
    """Starlette's ``request.user``, carrying the :class:`Principal` (and the
    :class:`Person`, for a signed-in person)."""

    def __init__(self, principal: Principal, person: Person | None = None) -> None:
        self.principal = principal
        self.person = person

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.principal.by

    @property
    def identity(self) -> str:
        return self.principal.who


Authenticated = tuple[AuthCredentials, PrincipalUser]


def authenticated(principal: Principal, person: Person | None = None) -> Authenticated:
    """What a backend returns for ``principal`` (its roles as Starlette scopes)."""
    return (
        AuthCredentials(sorted(r.value for r in principal.roles)),
        PrincipalUser(principal, person),
    )


def principal_of(conn: HTTPConnection) -> Principal:
    """The principal the guard established for this request (every routed one has one)."""
    user = conn.scope.get("user")
    if isinstance(user, PrincipalUser):
        return user.principal
    raise LookupError("this request was not authenticated by the request guard")


__all__ = ["Authenticated", "PrincipalUser", "authenticated", "principal_of"]
