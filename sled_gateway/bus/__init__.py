"""The gateway's message bus: publish/subscribe, and request/reply to "whoever holds X".

Subjects are dot-separated strings (``sled.<project>.mcp``); messages are
JSON-able dicts, so that an implementation over the network (NATS: subjects,
request/reply, queue groups) only adds ``json.dumps``/``loads`` at its edge.
:mod:`sled_gateway.bus.local` is the in-process implementation, where a
request is a direct call of the holder's handler.

Subjects used today:

``sled.<project>.mcp``
    request ``{"body": <JSON-RPC text>}``; the hub holding that sled replies
    ``{"payload": <the sled's answer or null>}`` or ``{"error": <word>}``
    with the word one of :data:`SLED_GONE`, :data:`NOT_SENT`, :data:`STOPPING`,
    :data:`TOO_LARGE`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

#: A message: what ``json.dumps`` accepts at the top level as an object.
Message = dict[str, Any]
Handler = Callable[[Message], None]
#: A server's answer to a request; ``None`` sends no reply at all, for a server that
#: knows another process serves the subject now (a sled moved to another replica):
#: any reply from here, even "not sent", could reach the requester before that
#: server's real answer, and it takes the first.
Responder = Callable[[Message], Awaitable[Message | None]]


class StopServing(Protocol):
    """What :meth:`Bus.serve` returns: stop that server of the subject."""

    def __call__(self, *, quiet: bool = False) -> None:
        """Stop serving (a no-op once a newer server took over). ``quiet``: another
        process serves the subject now, so a request still routed here is left to it,
        unanswered, rather than answered :data:`NOT_SENT`."""


#: Error words a sled's holder replies with on ``sled.<project>.mcp``.
SLED_GONE = "sled_gone"  # the session ended before the sled answered
NOT_SENT = "not_sent"  # the session ended before the request could be sent
STOPPING = "stopping"  # the gateway is shutting down
TOO_LARGE = "too_large"  # the answer is larger than a network bus carries


class MessageTooLarge(ValueError):
    """The request is larger than the bus carries (NATS's ``max_payload``)."""


class NoResponders(LookupError):
    """Nobody serves the subject a request was sent to."""


class BusError(RuntimeError):
    """A network bus cannot be opened (its server unreachable): the gateway does not start."""


class BusUnavailable(NoResponders):
    """A network bus is not connected (NATS down or reconnecting): nobody can be asked now."""


def escape_token(text: str) -> str:
    """``text`` as one subject token in ``[A-Za-z0-9_-]``, injectively: each UTF-8 byte
    outside ``[A-Za-z0-9_]`` becomes ``-XX`` (hex, so ``-`` is ``-2D``); ``""`` is ``-``."""
    if not text:
        return "-"
    return "".join(chr(b) if b in _PLAIN else f"-{b:02X}" for b in text.encode("utf-8"))


_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def sled_subject(project: str, what: str) -> str:
    """``sled.<project>.<what>``, the project escaped (:func:`escape_token`): a project
    name may hold dots, spaces, ``*`` or ``>``, which a network bus would read as
    separators or wildcards."""
    return f"sled.{escape_token(project)}.{what}"


class Bus(Protocol):
    def open(self) -> None:
        """Connect (a network bus) before the hub serves any sled; idempotent."""

    def close(self) -> None:
        """Stop every subscription and server; later requests get :class:`NoResponders`."""

    def publish(self, subject: str, message: Message) -> None:
        """Deliver ``message`` to every subscriber of ``subject`` (none is fine)."""

    def subscribe(self, subject: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for each message published to ``subject``; returns
        the unsubscribe."""

    async def request(self, subject: str, message: Message, timeout: float) -> Message:
        """The reply of whoever serves ``subject``: :class:`NoResponders` if nobody does,
        ``TimeoutError`` after ``timeout`` seconds."""

    def serve(self, subject: str, responder: Responder) -> StopServing:
        """Answer requests to ``subject`` (one server per subject; the newest wins);
        returns the call that stops serving. A responder's ``None`` is no reply: on a
        network bus the requester hears another server's; on one process's bus, nobody
        else serves it (:class:`NoResponders`)."""

    @property
    def connected(self) -> bool:
        """True while what is published here reaches the other processes subscribed (a
        network bus, connected). Always False for the in-process bus, which reaches no
        other process: replicas on a shared database that use it learn of each other's
        changes only by reading the database."""

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` each time a network bus is connected again after a loss
        (messages may have been lost meanwhile: re-read the database); returns the
        removal. Never called on the in-process bus."""


__all__ = [
    "NOT_SENT",
    "SLED_GONE",
    "STOPPING",
    "TOO_LARGE",
    "Bus",
    "BusError",
    "BusUnavailable",
    "Handler",
    "Message",
    "MessageTooLarge",
    "NoResponders",
    "Responder",
    "StopServing",
    "escape_token",
    "sled_subject",
]
