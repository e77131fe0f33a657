"""What happened in the gateway, as events, and the synchronous dispatcher that spreads them.

The approvals service and the hub publish; the read model
(:class:`sled_gateway.state.GatewayState`) and the transports (terminal,
Matrix) subscribe. Handlers run at once, on the publisher's thread (the
gateway's event loop), in the order they subscribed: keep them quick, and
hand anything slow to a queue of your own. A handler that raises is logged
and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loguru import logger

from protocol import JSON
from sled_gateway.records import DecisionRecord, PendingPermission

log = logger.bind(actor="gateway")


@dataclass(frozen=True, slots=True)
class PermissionRequested:
    """A ``perm_request`` is now pending, waiting for a decider."""

    item: PendingPermission


@dataclass(frozen=True, slots=True)
class PermissionVoted:
    """A vote toward a pending request's quorum counted; ``item`` carries the approvals so far."""

    item: PendingPermission


@dataclass(frozen=True, slots=True)
class PermissionDecided:
    """A request got its one decision (recorded in the audit log first when it could be).

    ``was_pending``: a decider answered it while it was pending; False for the
    answers given at once (a rule, ``--auto``, the gateway's own denials).
    """

    record: DecisionRecord
    was_pending: bool = True


@dataclass(frozen=True, slots=True)
class PermissionWithdrawn:
    """A pending request ended without a decision: its sled disconnected."""

    item: PendingPermission
    record: DecisionRecord


@dataclass(frozen=True, slots=True)
class FleetPermissionRequested:
    """Another replica's sled's request is pending (read from the shared store).

    Apart from :class:`PermissionRequested` so the read model, which already holds
    it, does not take it for one of this replica's own; the transports follow both.
    """

    item: PendingPermission


@dataclass(frozen=True, slots=True)
class FleetPermissionEnded:
    """Another replica's request left the shared store's pending rows: ``record`` is
    its outcome as the store has it (decided, or withdrawn)."""

    item: PendingPermission
    record: DecisionRecord


@dataclass(frozen=True, slots=True)
class SledUp:
    """A session identified itself as ``project``'s sled."""

    session: int
    project: str
    remote: str
    info: dict[str, JSON]


@dataclass(frozen=True, slots=True)
class SledHeartbeat:
    """A sled's session sent a heartbeat."""

    session: int
    project: str


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A frame arrived on a session (``dropped``: malformed, early or of an unknown kind)."""

    session: int
    project: str | None
    dropped: bool


@dataclass(frozen=True, slots=True)
class SledDown:
    """A sled's session ended (``project`` None if it never identified)."""

    session: int
    project: str | None
    close_code: int | None
    #: The gateway ended it (stopping): the sled did not choose to leave.
    by_gateway: bool = False

    @property
    def said_goodbye(self) -> bool:
        """The sled itself closed normally (1000, 1001: it stopped); any other end (a
        drain's 1012, the gateway stopping, a lost connection, a missed heartbeat)
        means it is reconnecting."""
        return self.close_code in (1000, 1001) and not self.by_gateway


@dataclass(frozen=True, slots=True)
class RulesChanged:
    """A rule was made or revoked; ``rule`` is a :class:`sled_gateway.store.Rule`."""

    rule: Any
    revoked: bool


E = TypeVar("E")


class Events:
    """A tiny synchronous publish/subscribe of event objects, by their class."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = {}

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> Callable[[], None]:
        """Call ``handler(event)`` for each published ``kind``; returns the unsubscribe."""
        handlers = self._handlers.setdefault(kind, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    def publish(self, event: object) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception:
                log.exception("{} handler failed", type(event).__name__)
