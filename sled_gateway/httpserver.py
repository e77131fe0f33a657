"""uvicorn's HTTP/1.1 protocol with a header-read deadline and a connection cap.

What uvicorn (0.3x to 0.5x) gives, and why it is not enough on its own:

- ``timeout_keep_alive`` closes a connection that stays idle *after* a
  response. A fresh connection that never sends a request, or sends half a
  request line and stops (slowloris), is never timed out.
- ``limit_concurrency`` answers ``503`` to a new *request* once the number of
  open connections (idle ones included) reaches the limit. So a few hundred
  idle sockets make every legitimate request fail for as long as the
  attacker keeps them open: the cap itself starves the server.
- ``h11_max_incomplete_event_size`` bounds the size of a request head (16 KiB),
  not the time it may take.

So this protocol adds:

- a **header-read deadline**: from the moment a connection opens, or a
  keep-alive connection finishes a response, the next request head must be
  complete within ``header_timeout`` seconds, or the connection is closed;
- a **connection cap that evicts instead of refusing**: when a new connection
  would exceed ``max_connections``, the oldest connections that have not yet
  sent a complete request head are closed to make room. A client that sends
  its request at once (every real one) is past that stage within a round
  trip, so idle sockets cannot crowd it out; only when every connection is
  busy is the newcomer itself closed.

The WebSocket protocol uvicorn switches to after an upgrade counts toward the
cap (a sled's socket is a connection), but is never evicted by it.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import h11
from loguru import logger
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logger.bind(actor="gateway")

_order = itertools.count()


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus a header-read deadline and an evicting connection cap.

    Subclass it with :func:`guarded_protocol` to set the two limits: uvicorn
    builds protocols from a class, with its own constructor arguments.
    """

    header_timeout: float = 10.0
    max_connections: int = 200

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._order = next(_order)

    # -- state --------------------------------------------------------------------

    @property
    def awaiting_head(self) -> bool:
        """True while no complete request head has arrived for the current cycle."""
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.awaiting_head:
            client = self.client or ("?", 0)
            log.debug(
                "closed a connection from {}:{}: no complete request head within {} s",
                client[0],
                client[1],
                self.header_timeout,
            )
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        # Connections already told to close linger in the set until their
        # connection_lost: they no longer count.
        live = [c for c in self.connections if not _closing(c)]
        over = len(live) - self.max_connections
        if over <= 0:
            return
        idle = sorted(
            (
                c
                for c in live
                if isinstance(c, GuardedH11Protocol) and c is not self and c.awaiting_head
            ),
            key=lambda c: c._order,
        )
        for victim in idle[:over]:
            victim._disarm()
            victim.transport.close()
            over -= 1
        if over > 0:  # every other connection is busy: this one waits outside
            log.warning(
                "connection cap ({}) reached with every connection busy; "
                "closed a new connection from {}",
                self.max_connections,
                self.client[0] if self.client else "?",
            )
            self._disarm()
            self.transport.close()
        else:
            log.debug("connection cap ({}) reached: closed idle connections", self.max_connections)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and not self.awaiting_head:
            self._disarm()  # the head is in (or the connection became a WebSocket)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.awaiting_head:
            self._arm()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _closing(protocol: object) -> bool:
    transport = getattr(protocol, "transport", None)
    return transport is None or bool(transport.is_closing())


def guarded_protocol(*, header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
