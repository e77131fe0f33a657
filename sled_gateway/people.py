"""People: who signs in (OpenID Connect) or holds a person API token, and the seam to their roles.

A :class:`Person` is what an identity provider vouches for: their issuer and
``sub`` (the identity), a name or email to show, and the groups of the ID
token's ``groups`` claim. A person acts on the gateway as a
:class:`~sled_gateway.principal.Principal` whose roles come from a
:class:`Grants` source: the ``--access`` file, or, without one,
:class:`NoGrants` (a signed-in person with no grant may do nothing; the
operator token stays the bootstrap admin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sled_gateway.principal import Channel, Principal


@dataclass(frozen=True, slots=True)
class Person:
    """One person, as their identity provider (or an admin, for a token) names them."""

    issuer: str
    sub: str
    email: str | None = None
    name: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def id(self) -> str:
        """How the access file and the audit name them: the email, else ``ISSUER|SUB``."""
        return self.email or f"{self.issuer}|{self.sub}"

    @property
    def display(self) -> str:
        """What the console shows: the name, else the id."""
        return self.name or self.id


class Grants(Protocol):
    """Where a person's roles come from (the ``--access`` file)."""

    def principal_for(self, person: Person, channel: Channel) -> Principal:
        """The principal ``person`` acts as through ``channel``."""
        ...


class NoGrants:
    """No access file: people may sign in, and may do nothing until one grants them a role."""

    def principal_for(self, person: Person, channel: Channel) -> Principal:
        return Principal(person.id, channel, frozenset(), person=person.id)


__all__ = ["Grants", "NoGrants", "Person"]
