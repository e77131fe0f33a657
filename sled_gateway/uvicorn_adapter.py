"""Everything the gateway needs from uvicorn beyond its documented API, in one place.

uvicorn documents ``uvicorn.Config`` (its settings), ``uvicorn.Server(config)``
with ``run()`` and ``serve()``, and ``uvicorn.run``. The gateway needs three
things that API does not give, so this module is the one place in
``sled_gateway/`` allowed to reach further (``tests/test_architecture.py``
enforces it), and ``tests/test_uvicorn_adapter.py`` checks that each name below
still exists, with the signature relied on, on the installed uvicorn.
``pyproject.toml`` pins uvicorn to the minor release those tests passed with.

1. A **header-read deadline**. uvicorn's ``timeout_keep_alive`` closes a
   connection that stays idle *after* a response; a fresh connection that never
   sends a request, or sends half a request line and stops (slowloris), is never
   timed out, and ``h11_max_incomplete_event_size`` bounds the size of a request
   head, not the time it may take. uvicorn has no option for it (its issue #157
   has listed ``--timeout-request-start`` as planned since 2018), and an ASGI
   middleware cannot help: the app is called only once the head is complete.
   So :class:`GuardedH11Protocol` closes a connection whose next request head is
   not complete within ``header_timeout`` seconds of the connection opening or
   of the previous response ending.

2. A **connection cap that evicts instead of refusing**. ``limit_concurrency``
   answers ``503`` to a new *request* once that many connections are open, idle
   ones included, so a few hundred idle sockets make every legitimate request
   fail for as long as the attacker keeps them open. When a new connection would
   exceed ``max_connections``, :class:`GuardedH11Protocol` closes the oldest
   connections that have not yet sent a complete request head. A client that
   sends its request at once (every real one) is past that stage within a round
   trip, so idle sockets cannot crowd it out; only when every connection is busy
   is the newcomer itself closed. A connection upgraded to a WebSocket (a sled)
   counts toward the cap but is never evicted by it.

3. **Knowing when the server accepts connections, and asking it to stop**, from
   another thread (:class:`NotifyingServer`).

What each relies on, and why no public hook exists:

- ``uvicorn.protocols.http.h11_impl.H11Protocol``: uvicorn's h11 protocol class,
  not exported by the ``uvicorn`` package. ``uvicorn.Config(http=...)`` accepts a
  protocol *class* (its annotation says ``type[asyncio.Protocol]``; the docs list
  only the names ``"h11"``, ``"httptools"`` ...), and ``Server.startup`` builds one
  per connection with keyword arguments ``config``, ``server_state``,
  ``app_state`` and ``_loop``, which the subclass passes through untouched. Only
  the protocol sees a connection before its request head is complete, so a
  subclass is the only place for both limits.
- ``H11Protocol.conn``: the connection's ``h11.Connection``. Its (public h11)
  ``their_state`` is ``h11.IDLE`` exactly while the head of the current request
  has not been fully received; uvicorn exposes that state nowhere else.
- ``H11Protocol.on_response_complete()``: called with no arguments when a
  response has been sent; the moment a keep-alive connection starts waiting for
  its next head, so the deadline is re-armed there. ASGI has no event for it
  that a server-level hook could see.
- ``uvicorn.Server.startup(sockets=None)``: a coroutine method, public by name but
  undocumented, that returns once the listening sockets accept connections.
  Extending it is how :class:`NotifyingServer` reports "started" without polling
  (``Server.started`` is undocumented too).
- ``uvicorn.Server.should_exit``: the undocumented flag ``Server.serve`` polls to
  begin a graceful shutdown (what uvicorn's own signal handler sets); set by
  :meth:`NotifyingServer.request_exit`.
- ``uvicorn.Server.servers``: the undocumented list of the ``asyncio.Server``
  objects ``startup`` made. Closing them stops new connections while open ones
  carry on, which uvicorn offers only as part of its whole shutdown (that closes
  WebSockets with 1012, where a stopping gateway tells its sleds 1001);
  :meth:`NotifyingServer.stop_accepting` does it.

The rest is public: ``asyncio.Protocol``'s ``connection_made``,
``data_received`` and ``connection_lost`` (which the subclass extends), the
asyncio transport (``is_closing``, ``close``, ``get_protocol``,
``get_extra_info``), and h11's states. The connections counted toward the cap
are tracked here, by transport, rather than read from uvicorn's server state:
a WebSocket upgrade keeps the transport and swaps its protocol, so
``transport.get_protocol()`` tells an upgraded connection from one still
waiting for a head.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn
from loguru import logger
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logger.bind(actor="gateway")


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus a header-read deadline and an evicting connection cap.

    Make a class with :func:`guarded_protocol` to set the two limits: uvicorn
    builds protocols from a class, with its own constructor arguments, and the
    connections one server holds are counted per class.
    """

    header_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 200
    # transport → the guarded protocol serving it (None once upgraded to a
    # WebSocket, so the spent HTTP protocol can be freed), oldest first; shared by
    # every connection of one server (one class per server, see guarded_protocol).
    open_transports: ClassVar[dict[asyncio.Transport, GuardedH11Protocol | None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_transport: asyncio.Transport | None = None
        self._guard_timer: asyncio.TimerHandle | None = None

    # -- state --------------------------------------------------------------------

    @property
    def awaiting_head(self) -> bool:
        """True while no complete request head has arrived for the current cycle."""
        transport = self._guard_transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_protocol() is self  # not upgraded to a WebSocket
            and self.conn.their_state is h11.IDLE
        )

    def _guard_arm(self) -> None:
        self._guard_disarm()
        loop = asyncio.get_running_loop()
        self._guard_timer = loop.call_later(self.header_timeout, self._guard_head_timeout)

    def _guard_disarm(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _guard_close(self) -> None:
        self._guard_disarm()
        if self._guard_transport is not None:
            self._guard_transport.close()

    def _guard_peer(self) -> str:
        peer = self._guard_transport.get_extra_info("peername") if self._guard_transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    def _guard_head_timeout(self) -> None:
        self._guard_timer = None
        if self.awaiting_head:
            log.debug(
                "closed a connection from {}: no complete request head within {} s",
                self._guard_peer(),
                self.header_timeout,
            )
            self._guard_close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard_transport = transport
        self.open_transports[transport] = self
        self._guard_arm()
        self._guard_enforce_cap()

    def _guard_enforce_cap(self) -> None:
        # Transports already closed (or told to close) no longer count: drop them.
        for closed in [t for t in self.open_transports if t.is_closing()]:
            del self.open_transports[closed]
        over = len(self.open_transports) - self.max_connections
        if over <= 0:
            return
        idle = [
            p
            for p in self.open_transports.values()
            if p is not None and p is not self and p.awaiting_head
        ]
        for victim in idle[:over]:
            victim._guard_close()
            over -= 1
        if over > 0:  # every other connection is busy: this one waits outside
            log.warning(
                "connection cap ({}) reached with every connection busy; "
                "closed a new connection from {}",
                self.max_connections,
                self._guard_peer(),
            )
            self._guard_close()
        else:
            log.debug("connection cap ({}) reached: closed idle connections", self.max_connections)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._guard_timer is not None and not self.awaiting_head:
            self._guard_disarm()  # the head is in (or the connection became a WebSocket)
        self._guard_release_if_upgraded()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may serve a pipelined request, even an upgrade
        if self.awaiting_head:
            self._guard_arm()  # the next request on this keep-alive connection
        self._guard_release_if_upgraded()

    def _guard_release_if_upgraded(self) -> None:
        transport = self._guard_transport
        if transport is not None and transport.get_protocol() is not self:
            # A WebSocket now: the transport still counts toward the cap, but this
            # spent HTTP protocol is not kept alive for the socket's lifetime.
            self.open_transports[transport] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_disarm()
        if self._guard_transport is not None:
            self.open_transports.pop(self._guard_transport, None)
        super().connection_lost(exc)


def guarded_protocol(*, header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits, for ``uvicorn.Config(http=...)``.

    Use one class per server: the cap counts the connections of its class.
    """
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "max_connections": max_connections,
            "open_transports": {},
        },
    )


class NotifyingServer(uvicorn.Server):
    """uvicorn.Server that calls ``on_started`` once it accepts connections.

    ``on_started`` runs on the server's event loop; :meth:`request_exit` may be
    called from any thread.
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()

    async def stop_accepting(self) -> None:
        """Close the listening sockets; connections already open carry on (so the
        sleds can be closed with 1001 before uvicorn's own 1012)."""
        for server in self.servers:
            server.close()

    def request_exit(self) -> None:
        """Begin a graceful shutdown: ``serve()`` returns once connections have finished."""
        self.should_exit = True
