"""The person API tokens' endpoints (:mod:`sled_gateway.tokens`).

=================================  ==================================================
``POST /api/tokens``               ``{"person": id, "expires_in": seconds}`` → ``201
                                   {"id", "token", "person", "expires_at"}`` (the
                                   secret is in this answer only)
``GET /api/tokens``                the tokens, without secrets (``?include_revoked=1``)
``DELETE /api/tokens/{id}``        revokes one: ``404`` unknown, ``409`` revoked already
=================================  ==================================================

Each needs the admin role on every project (``403`` with ``"needs": "admin"``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol.web import ascii_digits
from sled_gateway.approvals import Forbidden
from sled_gateway.auth import principal_of
from sled_gateway.http.errors import error, forbidden
from sled_gateway.records import iso
from sled_gateway.store import TokenRevoked, UnknownToken
from sled_gateway.tokens import DEFAULT_TTL, MAX_TTL, PersonTokens

_SHAPE = 'body must be JSON: {"person": "alice@example.test", "expires_in": seconds}'
_MAX_PERSON = 320  # an email address's longest

JsonBody = Callable[[Request, str], Awaitable[tuple[Any, Response | None]]]


class TokensApi:
    def __init__(self, tokens: PersonTokens, json_body: JsonBody) -> None:
        self.tokens = tokens
        self._json_body = json_body

    async def create(self, request: Request) -> Response:
        principal = principal_of(request)
        body, unreadable = await self._json_body(request, _SHAPE)
        if unreadable is not None:
            return unreadable
        if not isinstance(body, dict):
            return error(400, _SHAPE)
        unknown = set(body) - {"person", "expires_in"}
        person, expires_in = body.get("person"), body.get("expires_in", DEFAULT_TTL)
        if unknown:
            return error(400, f"unknown field(s) {sorted(unknown)[:10]}")
        if (
            not isinstance(person, str)
            or not person.strip()
            or len(person) > _MAX_PERSON
            or person.startswith("group:")
            or any(ord(c) < 32 or ord(c) == 127 for c in person)
            # A person's id always has one of these; a token for "operator" or "rule:3"
            # would make its holder's rows look like the operator's or a rule's.
            or ("@" not in person and "|" not in person)
        ):
            return error(
                400,
                "person must be a person's id: their email, or ISSUER|SUB (as the access "
                "file names them)",
            )
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not 0 < expires_in <= MAX_TTL
        ):
            return error(400, f"expires_in must be seconds, more than 0 and at most {MAX_TTL:g}")
        try:
            token, secret = await self.tokens.create(person, float(expires_in), principal)
        except Forbidden as exc:
            return forbidden(exc)
        return JSONResponse(
            {
                "id": token.id,
                "token": secret,
                "person": token.person,
                "expires_at": iso(token.expires_at),
            },
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )

    async def list(self, request: Request) -> Response:
        everything = request.query_params.get("include_revoked", "") in ("1", "true", "yes")
        try:
            tokens = await self.tokens.list(principal_of(request), everything)
        except Forbidden as exc:
            return forbidden(exc)
        return JSONResponse(
            {"tokens": [t.to_json() for t in tokens]}, headers={"Cache-Control": "no-store"}
        )

    async def revoke(self, request: Request) -> Response:
        text = request.path_params["token_id"]
        if not ascii_digits(text) or len(text) > 18:
            return error(400, f"a token id is a number, not {text[:40]!r}")
        try:
            token = await self.tokens.revoke(int(text), principal_of(request))
        except Forbidden as exc:
            return forbidden(exc)
        except UnknownToken as exc:
            return error(404, str(exc.args[0]))
        except TokenRevoked as exc:
            return error(409, str(exc), token=exc.token.to_json())
        return JSONResponse({"ok": True, "token": token.to_json()})
