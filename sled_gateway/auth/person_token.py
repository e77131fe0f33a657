"""Person API tokens as bearer credentials: ``Authorization: Bearer sgp_...`` → that person.

Only a value with the person-token prefix is looked up; anything else (the
operator token) is left to the next backend. A person token that is unknown,
revoked or expired is not a credential: the operator backend then refuses it
like any wrong bearer value (``401``).
"""

from __future__ import annotations

from starlette.authentication import AuthenticationBackend
from starlette.requests import HTTPConnection

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.tokens import PREFIX, PersonTokens


class PersonTokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <person token>`` → the person, channel ``api``."""

    def __init__(self, tokens: PersonTokens) -> None:
        self.tokens = tokens

    async def authenticate(self, conn: HTTPConnection) -> Authenticated | None:
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value.startswith(PREFIX):
            return None
        principal = await self.tokens.principal_for(value)
        return authenticated(principal) if principal is not None else None
