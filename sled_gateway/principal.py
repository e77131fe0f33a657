"""Who acts on the gateway: a :class:`Principal` (who, through which channel, with which roles).

Every decision and every rule change carries one. The approvals service
checks its roles (:meth:`Principal.has`) in one place; the audit log keeps
the short label :attr:`Principal.by` ("console", "api", "matrix:@op:host",
"rule:3", ...), the same words the console, the API and the audit rows show.

Roles rank: an ``admin`` may do everything an ``approver`` may, who may do
everything a ``viewer`` may. Every authenticated operator (the token or a
console session) is an admin; the terminal, ``--auto``, rules and the Matrix
users on the bot's allow list are approvers; a viewer may only look.

A person (:mod:`sled_gateway.people`) gets roles from the ``--access`` file
(:mod:`sled_gateway.access`): a role on every project goes into ``roles``, a
role on some projects into ``scoped`` with the project globs it holds on, and
``has(role, project)`` asks about one project.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Role(enum.StrEnum):
    VIEWER = "viewer"
    APPROVER = "approver"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.APPROVER: 1, Role.ADMIN: 2}


class Channel(enum.StrEnum):
    """Through what a principal reached the gateway."""

    CONSOLE = "console"  # the web console's session cookie
    API = "api"  # Authorization: Bearer <operator token>
    TERMINAL = "terminal"  # --interactive
    MATRIX = "matrix"  # the Matrix bot's room
    AUTO = "auto"  # --auto
    RULE = "rule"  # an always-allow or deny rule
    GATEWAY = "gateway"  # the gateway's own answers (malformed, over a limit, withdrawn)
    LIBRARY = "library"  # a program embedding Gateway
    SLED = "sled"  # a sled's uplink token


@dataclass(frozen=True, slots=True)
class Principal:
    """One actor. ``who`` names it within its channel (a Matrix user id, ``rule:3``, ...)."""

    who: str
    channel: Channel
    roles: frozenset[Role] = frozenset()
    #: Roles held on some projects only: (role, does this project match the grant's globs).
    scoped: tuple[tuple[Role, Callable[[str], bool]], ...] = ()
    #: The person's id (``alice@example.test``) when a person acts, else None.
    person: str | None = None

    def has(self, role: Role, project: str | None = None) -> bool:
        """Whether a role reaches ``role`` (an admin is also an approver) on every project,
        or, with ``project``, on that project."""
        need = _RANK[role]
        if any(_RANK[r] >= need for r in self.roles):
            return True
        if project is None:
            return False
        return any(_RANK[r] >= need and matches(project) for r, matches in self.scoped)

    def has_somewhere(self, role: Role) -> bool:
        """Whether ``role`` is reached on at least one project (e.g. to list what it may see)."""
        need = _RANK[role]
        return any(_RANK[r] >= need for r in self.roles) or any(
            _RANK[r] >= need for r, _ in self.scoped
        )

    @property
    def everywhere(self) -> bool:
        """Whether it may view every project (nothing it reads needs filtering)."""
        return self.has(Role.VIEWER)

    @property
    def by(self) -> str:
        """The audit log's ``by``: the person, the channel, or the rule / gateway reason,
        or matrix:<user>."""
        if self.person is not None:
            return self.person
        if self.channel is Channel.MATRIX:
            return f"matrix:{self.who}"
        if self.channel in (Channel.RULE, Channel.GATEWAY, Channel.LIBRARY):
            return self.who
        return self.channel.value

    # -- the actors there are ---------------------------------------------------

    @classmethod
    def operator(cls, channel: Channel) -> Principal:
        """The holder of the operator token (the API) or of a console session it opened."""
        return cls("operator", channel, frozenset({Role.ADMIN}))

    @classmethod
    def terminal(cls) -> Principal:
        return cls("terminal", Channel.TERMINAL, frozenset({Role.APPROVER}))

    @classmethod
    def auto(cls) -> Principal:
        return cls("auto", Channel.AUTO, frozenset({Role.APPROVER}))

    @classmethod
    def rule(cls, label: str) -> Principal:
        """A rule, labelled as its audit rows name it (``rule:<id>``)."""
        return cls(label, Channel.RULE, frozenset({Role.APPROVER}))

    @classmethod
    def gateway(cls, reason: str) -> Principal:
        """The gateway itself: ``invalid``, ``limit`` or ``sled_disconnected``."""
        return cls(reason, Channel.GATEWAY)

    @classmethod
    def matrix(cls, user_id: str, *, approver: bool) -> Principal:
        """A Matrix user; ``approver`` if on the bot's allow list."""
        return cls(user_id, Channel.MATRIX, frozenset({Role.APPROVER}) if approver else frozenset())

    @classmethod
    def sled(cls, project: str | None) -> Principal:
        """A sled admitted by its token: ``who`` is the one project it may claim, or ``""``
        (the shared token, or ``--no-auth``) for any project without a token of its own."""
        return cls(project or "", Channel.SLED)

    @classmethod
    def from_by(cls, by: str) -> Principal:
        """The principal a library caller names with a ``by`` label (``Gateway.decide(by=...)``).

        The embedding program holds the gateway itself, so it acts as an approver
        under whatever label it gives.
        """
        approver = frozenset({Role.APPROVER})
        if by.startswith("matrix:"):
            return cls(by.removeprefix("matrix:"), Channel.MATRIX, approver)
        for channel in (Channel.CONSOLE, Channel.API, Channel.TERMINAL, Channel.AUTO):
            if by == channel.value:
                return cls(by, channel, approver)
        return cls(by, Channel.LIBRARY, approver)


def as_principal(by: str | Principal) -> Principal:
    """``by`` itself, or the principal a library caller's label names (see ``from_by``)."""
    return by if isinstance(by, Principal) else Principal.from_by(by)
