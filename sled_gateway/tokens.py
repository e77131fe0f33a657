"""Person API tokens: an admin makes one for a person; whoever sends it acts as that person.

A token is ``sgp_`` and 32 random bytes (URL-safe base64). The prefix tells a
person token from the operator token without a lookup, and lets secret
scanners recognise a leaked one. Only the SHA-256 of the whole token is
stored: the secret carries 256 bits of chance, so no guess list or GPU can
walk back from the hash, and a slow password hash (bcrypt, Argon2) would only
add milliseconds to every request; a fast, deterministic hash is also what
lets the token be found by an index on each request.

A token's row is read from the database at most once a second
(:data:`RECHECK_S`) per token; in between, the copy in memory answers, which
keeps the check off the store's writer thread (it was a quarter of a
decision's round trip). The expiry is checked on every request, and a
revocation through this gateway drops the copy at once, so both hold from
the next request on; a revocation through another replica sharing the
database holds here within :data:`RECHECK_S`. The person's roles come from the ``--access`` file as
it is now (:class:`~sled_gateway.people.Grants`), not as it was when the
token was made.

Making, listing and revoking need the admin role on every project
(:meth:`~sled_gateway.approvals.Approvals.authorize`); making and revoking
are audited (``token_created``, ``token_revoked``, ``req_id`` ``token:<id>``)
in the transaction that does them.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict

from loguru import logger

from protocol import printable
from sled_gateway.access import Access
from sled_gateway.approvals import Approvals
from sled_gateway.people import Grants, Person
from sled_gateway.principal import Channel, Principal, Role
from sled_gateway.records import iso
from sled_gateway.store import AuditEntry, PersonToken, Store, UnknownToken

log = logger.bind(actor="gateway")

PREFIX = "sgp_"
#: How long a token's row read from the database answers for it before it is read again.
RECHECK_S = 1.0
#: Tokens whose rows are kept in memory at once (the least recently read go first).
CACHE_SIZE = 10_000
DEFAULT_TTL = 30 * 86400.0
MAX_TTL = 366 * 86400.0
#: The audit's ``tool_name`` and decisions of token rows.
AUDIT_TOOL = "person_token"
CREATED, REVOKED = "token_created", "token_revoked"


def secret_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def person_of(grants: Grants, person_id: str) -> Person:
    """The person a token names, with the groups the access file gives them."""
    if isinstance(grants, Access):
        return grants.person(person_id)
    issuer, bar, sub = person_id.partition("|")
    return Person(issuer, sub) if bar else Person("", person_id, email=person_id)


class PersonTokens:
    """Make, list, revoke and check person tokens, over the store."""

    def __init__(self, store: Store, grants: Grants) -> None:
        self.store = store
        self.grants = grants
        # sha256 → (the row, when it was read: monotonic)
        self._recent: OrderedDict[str, tuple[PersonToken, float]] = OrderedDict()

    def _entry(
        self, decision: str, token: PersonToken, principal: Principal, now: float
    ) -> AuditEntry:
        return AuditEntry(
            "",
            None,
            f"token:{token.id}",
            AUDIT_TOOL,
            {"person": token.person, "expires_at": iso(token.expires_at)},
            decision,
            principal.by,
            None,
            now,
            now,
            who=principal.who,
            channel=principal.channel.value,
        )

    async def create(
        self, person: str, expires_in: float, principal: Principal
    ) -> tuple[PersonToken, str]:
        """A new token for ``person`` and its secret (shown once, never stored)."""
        Approvals.authorize(principal, Role.ADMIN, "make person tokens")
        secret = PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        draft = PersonToken(0, person, secret_sha256(secret), now, principal.by, now + expires_in)
        token = await self.store.add_token(draft, self._entry(CREATED, draft, principal, now))
        log.info(
            "person token {} for {} made by {} (expires {})",
            token.id,
            printable(person, 200),
            principal.by,
            iso(token.expires_at),
        )
        return token, secret

    async def list(self, principal: Principal, include_revoked: bool) -> list[PersonToken]:
        Approvals.authorize(principal, Role.ADMIN, "list person tokens")
        return await self.store.tokens(include_revoked=include_revoked)

    async def revoke(self, token_id: int, principal: Principal) -> PersonToken:
        """:class:`~sled_gateway.store.UnknownToken`, :class:`~sled_gateway.store.TokenRevoked`."""
        Approvals.authorize(principal, Role.ADMIN, "revoke person tokens")
        now = time.time()
        known = [t for t in await self.store.tokens(include_revoked=True) if t.id == token_id]
        if not known:
            raise UnknownToken(f"no token {token_id}")
        token = await self.store.revoke_token(
            token_id, principal.by, self._entry(REVOKED, known[0], principal, now)
        )
        for digest in [d for d, (t, _) in self._recent.items() if t.id == token_id]:
            del self._recent[digest]
        log.info("person token {} of {} revoked by {}", token.id, token.person, principal.by)
        return token

    async def principal_for(self, presented: str) -> Principal | None:
        """The principal a presented token acts as; None unless it is an active person token."""
        if not presented.startswith(PREFIX):
            return None
        digest = secret_sha256(presented)
        now = time.monotonic()
        known = self._recent.get(digest)
        if known is not None and now - known[1] < RECHECK_S:
            token: PersonToken | None = known[0]
        else:
            token = await self.store.token_by_hash(digest)
            if token is None:
                self._recent.pop(digest, None)
                return None
            self._recent[digest] = (token, now)
            self._recent.move_to_end(digest)
            while len(self._recent) > CACHE_SIZE:
                self._recent.popitem(last=False)
        assert token is not None
        if not token.active(time.time()):
            log.warning(
                "person token {} of {} refused: {}",
                token.id,
                printable(token.person, 200),
                "revoked" if token.revoked_at is not None else "expired",
            )
            return None
        return self.grants.principal_for(person_of(self.grants, token.person), Channel.API)


__all__ = ["PREFIX", "PersonTokens", "person_of", "secret_sha256"]
