"""Every message the actors exchange, as frozen dataclasses.

pykka never copies messages, so they are immutable. Messages about a
connection carry its ``session`` number: a late message from an old session
is recognised and cannot touch the new one.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from actors.sink import FrameSink
from protocol import JSON, Envelope, Outcome, Reason

T_contra = TypeVar("T_contra", contravariant=True)


class Settable(Protocol[T_contra]):
    """What the registry needs of a caller's future: a concurrent.futures or
    an asyncio one (the latter only when it lives in the uplink's own loop)."""

    def done(self) -> bool: ...

    def set_result(self, result: T_contra, /) -> None: ...


# ── lifecycle (system → supervisor) ─────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Start:
    """Begin connecting (or report ``disabled``)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Close the session with ``close_code`` and stop reconnecting."""

    close_code: int = 1001
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True, slots=True)
class Reconnect:
    """SIGHUP: end a back-off wait now (ignored at any other time)."""


@dataclass(frozen=True, slots=True)
class BackoffElapsed:
    token: int


@dataclass(frozen=True, slots=True)
class StatusTick:
    """Time to log the periodic snapshot of every actor."""


# ── session lifecycle ───────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class SessionUp:
    """connection → supervisor: connected, identity sent."""

    session: int
    sink: FrameSink


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """connection → supervisor: the session is over (or never came up)."""

    session: int
    reason: str
    up_for: float | None = None  # seconds it was up; None if it never came up
    auth_failed: bool = False  # handshake refused with 401/403
    clean: bool = False  # closed with a normal close handshake
    # The gateway's close 1012/1013 said "retry_after=<s>": wait up to s, not the back-off.
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """supervisor → session users (registry, heartbeat, MCP proxy, extensions).

    ``sink`` sends frames on this session straight to its socket, from any
    thread; it is the only way out.
    """

    session: int
    sink: FrameSink


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """supervisor → session users: ``session`` is gone; fail closed what it carried."""

    session: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """supervisor → connection: close the WebSocket with this code."""

    code: int = 1000
    reason: str = ""


# ── frames ──────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class EnvelopeIn:
    """router → handler: a parsed frame of the handler's kind.

    ``sink`` answers on the session the frame came on (and drops the answer
    if that session has ended by then).
    """

    session: int
    envelope: Envelope
    sink: FrameSink


# ── permissions ─────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Submit:
    """edge → registry: decide this request; the answer goes into ``future``."""

    request_id: str
    tool_name: str
    tool_input: JSON
    future: Settable[Outcome]  # a concurrent or (in the uplink's loop) asyncio future
    submitted_at: float  # time.monotonic(); the timeout counts from here
    frame_text: str | None = None  # the perm_request, already serialized by the edge


@dataclass(frozen=True, slots=True)
class Abandon:
    """edge → registry: the caller of ``request_id`` went away; deny it (``caller_gone``)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Sweep:
    """registry timer: deny what has outlived the permission timeout."""


@dataclass(frozen=True, slots=True)
class DenyAll:
    """Deny every undecided request; with ``close``, deny all later ones too."""

    reason: Reason
    close: bool = False
    done: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)


# ── heartbeat ─────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Tick:
    session: int
    generation: int


# ── supervision and inspection ──────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """actor → supervisor: ``role`` crashed (``session`` for a connection)."""

    role: str
    error: str
    session: int | None = None


@dataclass(frozen=True, slots=True)
class InjectFault:
    """Test hook: the receiving actor raises inside its handler."""

    note: str = "injected fault"


@dataclass(frozen=True, slots=True)
class GetSnapshot:
    """Ask an actor for its state dict (edges only, with a timeout)."""
