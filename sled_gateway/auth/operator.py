"""The operator token as a bearer credential (API and MCP clients)."""

from __future__ import annotations

import hmac

from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.principal import Channel, Principal


def same_token(given: str, expected: bytes) -> bool:
    """Constant time, on bytes: ``compare_digest`` refuses non-ASCII str."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)


class BearerTokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <operator token>`` → the operator, channel ``api``."""

    def __init__(self, operator_token: str) -> None:
        if not operator_token:
            raise ValueError("the operator token must be a non-empty string")
        self.token = operator_token.encode("utf-8", "surrogatepass")
        self._principal = Principal.operator(Channel.API)

    async def authenticate(self, conn: HTTPConnection) -> Authenticated | None:
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        if not same_token(value.strip(), self.token):
            raise AuthenticationError("wrong operator token")
        return authenticated(self._principal)
