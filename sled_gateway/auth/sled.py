"""Sled tokens: who may open the uplink WebSocket, and which project it may claim."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.authentication import AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection

from sled_gateway.auth import Authenticated, authenticated
from sled_gateway.auth.operator import same_token
from sled_gateway.principal import Principal


class SledTokenBackend(AuthenticationBackend):
    """``?token=`` → a sled principal whose ``who`` is the one project it may claim, or
    ``""`` (the shared token, or no tokens configured at all: ``--no-auth``)."""

    def __init__(self, shared_token: str | None, sled_tokens: Mapping[str, str]) -> None:
        # As bytes once, for constant-time compares.
        self._shared = shared_token.encode("utf-8") if shared_token is not None else None
        self._tokens = [(p, t.encode("utf-8")) for p, t in sled_tokens.items()]
        self.projects = frozenset(sled_tokens)

    @property
    def open(self) -> bool:
        """No token configured: any sled is admitted (``--no-auth``)."""
        return self._shared is None and not self._tokens

    async def authenticate(self, conn: HTTPConnection) -> Authenticated | None:
        if self.open:
            return authenticated(Principal.sled(None))
        token = conn.query_params.get("token")
        if token is None:
            return None
        # Every token is compared, so the time does not tell which one matched.
        match: str | None = None
        for project, expected in self._tokens:
            if same_token(token, expected):
                match = project
        if match is not None:
            return authenticated(Principal.sled(match))
        if self._shared is not None and same_token(token, self._shared):
            return authenticated(Principal.sled(None))
        raise AuthenticationError("wrong sled token")
