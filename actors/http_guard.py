"""Deadlines and connection caps for both HTTP servers (the ingress, the gateway).

Both serve HTTP with uvicorn's h11 protocol, and uvicorn bounds neither how
long a request may take to arrive nor how many connections one client holds.
This module is the one place that extends uvicorn's protocol for that, shared
by ``actors/ingress.py`` and ``sled_gateway/`` (through
``sled_gateway/uvicorn_adapter.py``): it lives in ``actors/`` because the
gateway may import the uplink's modules but never the other way round.
``tests/test_uvicorn_adapter.py`` checks each uvicorn internal named below on
the installed uvicorn; ``pyproject.toml`` pins uvicorn to the minor release
those tests passed with.

What :class:`GuardedH11Protocol` adds, per connection:

1. A **header-read deadline**. uvicorn's ``timeout_keep_alive`` closes a
   connection that stays idle *after* a response; a fresh connection that never
   sends a request, or sends half a request line and stops (slowloris), is never
   timed out, and ``h11_max_incomplete_event_size`` bounds the size of a request
   head, not the time it may take. uvicorn has no option for it (its issue #157
   has listed ``--timeout-request-start`` as planned since 2018), and an ASGI
   middleware cannot help: the app is called only once the head is complete.
   So a connection whose next request head is not complete within
   ``header_timeout`` seconds of the connection opening or of the previous
   response ending is closed.

2. A **deadline for the whole request**, body included, whatever the handler
   does. A handler that never reads the body, or answers before reading it,
   leaves uvicorn reading it for ever: one byte every few seconds holds the
   connection. So the request (head and body) must be fully received within
   ``request_timeout`` seconds of the same start; past it the client gets a
   ``408`` with a JSON error if no answer has begun (else the connection is
   just closed), and the handler sees the client gone. Once the body is in,
   the handler may take as long as it needs (a permission request waits for a
   person); a connection upgraded to a WebSocket leaves both deadlines.

3. A **per-client cap** (``max_per_client``): the connections of one remote
   address still *receiving* a request (waiting for its head, or its body) are
   counted. When a new one takes a client over its cap, that client's
   connections are counted again ``client_grace`` seconds later (a burst of
   real requests has sent them by then) and its oldest still receiving beyond
   the cap are closed. A client can then hold at most that many slow
   connections, and it is the one that loses them. Connections whose request is in (a caller
   waiting for a decision) and WebSockets (sleds) are not counted: they cost a
   request that was sent at once, and the ingress holds thousands of waiting
   callers from 127.0.0.1.

4. A **total cap that evicts instead of refusing** (``max_connections``).
   uvicorn's ``limit_concurrency`` answers ``503`` to a new *request* once that
   many connections are open, idle ones included, so a few hundred idle sockets
   make every legitimate request fail for as long as the attacker keeps them
   open. Here a new connection beyond the cap closes the oldest connections
   that have not yet sent a complete request head; only when every connection
   is busy is the newcomer itself closed. A WebSocket counts toward the cap but
   is never evicted by it.

5. **The client's address behind a load balancer** (``trusted_proxies``). A
   connection from a peer in that list must begin with a PROXY protocol v2
   header (:mod:`protocol.proxy_header`): the address it names is the client
   for the per-client cap, and for uvicorn's ``scope["client"]`` (HTTP and
   WebSocket alike, so the logs name the real client), and, when it says the
   client used TLS, ``https`` for the scope's scheme. The header is read
   before any HTTP, so the caps hold per client from the first byte on; the
   client cap of such a connection is enforced once the header is in (the
   header-read deadline and the total cap cover the wait). A header that does
   not parse, or its absence, closes that connection with one log line. From
   any other peer nothing is read: a header there is a malformed request (400).
6. A **disconnect callback** in each request's scope
   (``scope["extensions"]["sled.on_disconnect"]``): a handler that waits for
   something other than its client (the ingress's permission requests wait
   for a person) hears at once that the client left, without a task of its
   own blocked in ``receive`` for the whole wait.

And :class:`EarlyAnswerClose`, an ASGI wrapper: an answer given before the
request body was read to its end carries ``Connection: close``; the rest of
the body is read and discarded, within bounds, before the connection closes
(closing with unread data makes the kernel reset the connection, and the
client, still writing, would never see the answer).

What the protocol relies on, and why no public hook exists:

- ``uvicorn.protocols.http.h11_impl.H11Protocol``: uvicorn's h11 protocol class,
  not exported by the ``uvicorn`` package. ``uvicorn.Config(http=...)`` accepts a
  protocol *class* (its annotation says ``type[asyncio.Protocol]``; the docs list
  only the names ``"h11"``, ``"httptools"`` ...), and ``Server.startup`` builds one
  per connection with keyword arguments ``config``, ``server_state``,
  ``app_state`` and ``_loop``, which the subclass passes through untouched. Only
  the protocol sees a connection before its request head is complete, so a
  subclass is the only place for these limits.
- ``H11Protocol.loop``: the event loop uvicorn runs the connection in, where the
  deadlines' timers are set.
- ``H11Protocol.conn``: the connection's ``h11.Connection``. Its (public h11)
  ``their_state`` is ``h11.IDLE`` exactly while the head of the current request
  has not been fully received, and ``h11.SEND_BODY`` while its body is still
  arriving; uvicorn exposes neither anywhere else.
- ``H11Protocol.on_response_complete()``: called with no arguments when a
  response has been sent; the moment a keep-alive connection starts waiting for
  its next head, so the deadline is re-armed there. ASGI has no event for it
  that a server-level hook could see.
- ``H11Protocol.cycle``: the current request's ``RequestResponseCycle``; its
  ``scope`` is the dict its handler is called with (the disconnect extension is
  added to it before the handler's task first runs); its
  ``response_started`` says whether an answer has begun (so a ``408`` may still
  be sent), and setting its ``disconnected`` and its ``message_event`` is what
  uvicorn's own ``connection_lost`` does to tell the handler the client is
  gone (its ``receive`` then returns ``http.disconnect``, its ``send`` drops
  what it is given).

- ``uvicorn.protocols.utils.get_remote_addr(transport)``, which every uvicorn
  protocol calls in ``connection_made`` to fill ``scope["client"]``: it asks the
  transport for ``"socket"`` first and falls back to ``"peername"``. A WebSocket
  protocol is made (and reads it) inside the HTTP protocol's upgrade, from the
  transport the HTTP protocol holds; so that transport (:class:`CoalescedWrites`)
  answers ``"socket"`` with ``None`` and ``"peername"`` with the client a trusted
  proxy named. ``H11Protocol.client`` is the same value for HTTP requests, set
  once the header is in.
- ``uvicorn.protocols.utils.is_ssl(transport)``, which those protocols call in
  ``connection_made`` for ``scope["scheme"]``: true when the transport's
  ``"sslcontext"`` is. When the header says the client reached the proxy over
  TLS, the wrapper answers it with ``True`` (uvicorn only tests it), and
  ``H11Protocol.scheme`` becomes ``"https"``: cookies are then ``Secure`` and
  sign-in's redirect URI ``https://``, as behind no proxy.

The rest is public: ``asyncio.Protocol``'s ``connection_made``,
``data_received`` and ``connection_lost`` (which the subclass extends), the
asyncio transport (``is_closing``, ``close``, ``write``, ``get_protocol``,
``get_extra_info``), and h11's states and events. The connections counted
toward the caps are tracked here, by transport, rather than read from
uvicorn's server state: a WebSocket upgrade keeps the transport and swaps its
protocol, so ``transport.get_protocol()`` tells an upgraded connection from one
still speaking HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar

import h11
from loguru import logger
from uvicorn.protocols.http.h11_impl import H11Protocol

from protocol import RemoteProtocolError, dumps
from protocol.proxy_header import parse_proxy_v2
from protocol.web import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The ASGI scope extension through which a handler hears at once that its client
#: went away: ``scope["extensions"][DISCONNECT_EXTENSION](callback)``.
DISCONNECT_EXTENSION = "sled.on_disconnect"

#: After an early answer, at most this much of the unread body is read and
#: discarded, for at most this long (the request deadline may end it sooner).
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 5.0


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus the deadlines and caps of the module docstring.

    Make a class with :func:`guarded_protocol` to set the limits: uvicorn
    builds protocols from a class, with its own constructor arguments, and the
    connections one server holds are counted per class.
    """

    header_timeout: ClassVar[float] = 10.0
    request_timeout: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 200
    max_per_client: ClassVar[int] = 32
    client_grace: ClassVar[float] = 0.5
    log_actor: ClassVar[str] = "http"
    # Peers whose connections begin with a PROXY protocol v2 header naming the client.
    trusted_proxies: ClassVar[tuple[IPNetwork, ...]] = ()
    # transport → the guarded protocol serving it (None once upgraded to a
    # WebSocket, so the spent HTTP protocol can be freed), oldest first; shared by
    # every connection of one server (one class per server, see guarded_protocol).
    open_transports: ClassVar[dict[asyncio.Transport, GuardedH11Protocol | None]] = {}
    # The protocols still speaking HTTP (not upgraded, not lost), oldest first: what the
    # caps look through, so a new connection costs the HTTP connections open, not every
    # sled's WebSocket (5,000 sleds made each connect scan 5,000 transports).
    http_protocols: ClassVar[dict[GuardedH11Protocol, None]] = {}
    # An upgraded transport's end is seen by its WebSocket protocol, not by the guard: a
    # timer sweeps the closed ones while any upgraded one is listed, so a fleet that has
    # left is not kept (its transports and sockets) until the next connections come.
    upgraded_sweep_interval: ClassVar[float] = 1.0
    upgraded_sweep: ClassVar[list[asyncio.TimerHandle]] = []
    # client address → the pending recount of its connections (one at a time).
    client_checks: ClassVar[dict[str, asyncio.TimerHandle]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_transport: asyncio.Transport | None = None
        self._guard_timer: asyncio.TimerHandle | None = None
        # When the current request began (connection opened / last response
        # ended), and which deadline the timer is for: "head", "body" or None.
        self._guard_start = 0.0
        self._guard_phase: str | None = None
        self._guard_client = "?"
        # The PROXY header read so far, while one is awaited (a trusted peer's
        # connection); None once it is in, or when none is expected.
        self._guard_proxy_header: bytearray | None = None
        self._guard_proxy_refused = False
        self._guard_proxy_peer: str | None = None  # the proxy, when a header named the client
        # The current request's cycle, and what its handler asked to be told if
        # its client goes away (see _guard_offer_disconnect).
        self._guard_cycle: Any = None
        self._guard_on_gone: list[Callable[[], None]] = []

    # -- state --------------------------------------------------------------------

    def _guard_http(self) -> bool:
        transport = self._guard_transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_protocol() is self  # not upgraded to a WebSocket
        )

    @property
    def awaiting_head(self) -> bool:
        """True while no complete request head has arrived for the current cycle."""
        return self._guard_http() and self.conn.their_state is h11.IDLE

    @property
    def awaiting_body(self) -> bool:
        """True while the current request's head is in and its body is still arriving."""
        return self._guard_http() and self.conn.their_state is h11.SEND_BODY

    @property
    def receiving(self) -> bool:
        """True while the current request (head or body) is not fully received."""
        return self._guard_http() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    # -- the deadlines ------------------------------------------------------------

    def _guard_arm_head(self) -> None:
        self._guard_start = self.loop.time()  # uvicorn's loop: no get_running_loop (a getpid)
        self._guard_phase = "head"
        self._guard_set_timer(self._guard_start + min(self.header_timeout, self.request_timeout))

    def _guard_arm_body(self) -> None:
        self._guard_phase = "body"
        self._guard_set_timer(self._guard_start + self.request_timeout)

    def _guard_deadline(self) -> float | None:
        """When the current phase's deadline passes (None: no deadline runs)."""
        if self._guard_phase == "head":
            return self._guard_start + min(self.header_timeout, self.request_timeout)
        if self._guard_phase == "body":
            return self._guard_start + self.request_timeout
        return None

    def _guard_set_timer(self, deadline: float) -> None:
        # A timer that fires no later than the deadline is kept: when it fires it
        # checks the deadline of the phase then current, and waits on for the
        # rest. A keep-alive connection re-arms the head deadline at every
        # response; keeping the timer spares a timer made and cancelled each time.
        timer = self._guard_timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._guard_timer = self.loop.call_at(deadline, self._guard_expired)

    def _guard_stop_timer(self) -> None:
        """No deadline runs, and no timer holds this protocol (closed or upgraded)."""
        self._guard_phase = None
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _guard_follow(self) -> None:
        """Keep the deadline on what the connection's state calls for."""
        state = self.conn.their_state if self._guard_http() else None
        if state is h11.IDLE:  # awaiting_head
            if self._guard_phase != "head":
                self._guard_arm_head()
        elif state is h11.SEND_BODY:  # awaiting_body
            if self._guard_phase != "body":
                self._guard_arm_body()
        else:
            self._guard_phase = None  # the request is in, or the connection is a WebSocket

    def _guard_close(self) -> None:
        self._guard_stop_timer()
        if self._guard_transport is not None:
            self._guard_transport.close()

    def _guard_peer(self) -> str:
        peer = self._guard_transport.get_extra_info("peername") if self._guard_transport else None
        shown = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        if self._guard_proxy_peer is not None and self.client is not None:
            return f"{self.client[0]}:{self.client[1]} (via {shown})"
        return shown

    def _guard_expired(self) -> None:
        self._guard_timer = None
        deadline = self._guard_deadline()
        if deadline is None:
            return  # the request came in meanwhile: no deadline runs
        if self.loop.time() < deadline:  # re-armed since this timer was set
            self._guard_timer = self.loop.call_at(deadline, self._guard_expired)
            return
        phase, self._guard_phase = self._guard_phase, None
        log = logger.bind(actor=self.log_actor)
        if phase == "head" and self.awaiting_head:
            log.debug(
                "closed a connection from {}: no complete request head within {} s",
                self._guard_peer(),
                min(self.header_timeout, self.request_timeout),
            )
            self._guard_close()
        elif phase == "body" and self.awaiting_body:
            log.debug(
                "cut a request from {}: not fully received within {} s",
                self._guard_peer(),
                self.request_timeout,
            )
            self._guard_timeout_answer()

    def _guard_timeout_answer(self) -> None:
        """408 if no answer has begun, then close; the handler sees the client gone."""
        cycle = self.cycle
        transport = self._guard_transport
        assert transport is not None
        if cycle is not None and not cycle.response_started:
            cycle.response_started = True  # nothing else may start one now
            payload = dumps(
                error_body(f"request not fully received within {self.request_timeout:g} s")
            ).encode("utf-8")
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ]
            with contextlib.suppress(h11.LocalProtocolError):
                transport.write(self.conn.send(h11.Response(status_code=408, headers=headers)))
                transport.write(self.conn.send(h11.Data(data=payload)) or b"")
                transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self._guard_close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn writes a response's head and its body in two writes, so two
        # system calls and two TCP segments the client wakes up for; through
        # this they leave together. The guard itself acts on the real transport.
        super().connection_made(CoalescedWrites(transport))
        self._guard_transport = transport
        peer = transport.get_extra_info("peername")
        self._guard_client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self.trusted_proxies and _in_networks(self._guard_client, self.trusted_proxies):
            self._guard_proxy_header = bytearray()
        self.open_transports[transport] = self
        self.http_protocols[self] = None
        self._guard_arm_head()
        if self._guard_proxy_header is None:  # else once the header names the client
            self._guard_enforce_client_cap()
        self._guard_enforce_cap()

    def _guard_read_proxy_header(self, data: bytes) -> bytes | None:
        """Take ``data`` toward the PROXY header; what follows it once it is in, else None."""
        buffer = self._guard_proxy_header
        assert buffer is not None
        buffer += data
        try:
            header = parse_proxy_v2(buffer)
        except RemoteProtocolError as exc:
            self._guard_proxy_refused = True
            logger.bind(actor=self.log_actor).warning(
                "closed a connection from trusted proxy {}: bad PROXY protocol header ({})",
                self._guard_peer(),
                exc.detail,
            )
            self._guard_close()
            return None
        if header is None:
            return None
        self._guard_proxy_header = None
        if header.source is not None:
            self._guard_proxy_peer = self._guard_client
            self._guard_client = header.source[0]
            self.client = header.source
            if isinstance(self.transport, CoalescedWrites):
                self.transport.peer = header.source
        if header.tls:
            self.scheme = "https"
            if isinstance(self.transport, CoalescedWrites):
                self.transport.proxied_tls = True
        self._guard_enforce_client_cap()
        return bytes(buffer[header.length :])

    def _guard_receiving_of(self, client: str) -> list[GuardedH11Protocol]:
        return [p for p in self.http_protocols if p._guard_client == client and p.receiving]

    def _guard_enforce_client_cap(self) -> None:
        client = self._guard_client
        if client in self.client_checks:
            return
        if len(self._guard_receiving_of(client)) > self.max_per_client:
            loop = asyncio.get_running_loop()
            self.client_checks[client] = loop.call_later(
                self.client_grace, self._guard_recount, client
            )

    def _guard_recount(self, client: str) -> None:
        self.client_checks.pop(client, None)
        receiving = self._guard_receiving_of(client)
        over = len(receiving) - self.max_per_client
        if over <= 0:
            return
        for victim in receiving[:over]:
            victim._guard_close()
        logger.bind(actor=self.log_actor).debug(
            "{} had more than {} connections receiving a request: closed its oldest {}",
            client,
            self.max_per_client,
            over,
        )

    def _guard_enforce_cap(self) -> None:
        # Transports already closed (or told to close) no longer count: drop them. An
        # HTTP one leaves the list when it is lost; an upgraded one is dropped by the
        # upgraded sweep's timer (its WebSocket protocol, not this one, sees it lost),
        # which bounds the closed ones kept. A sweep looks at every transport listed, so
        # a connection runs one only when the count matters: over the cap.
        transports = self.open_transports
        if len(transports) > self.max_connections:
            for closed in [t for t in transports if t.is_closing()]:
                del transports[closed]
        over = len(transports) - self.max_connections
        if over <= 0:
            return
        idle = [p for p in self.http_protocols if p is not self and p.awaiting_head]
        for victim in idle[:over]:
            victim._guard_close()
            over -= 1
        log = logger.bind(actor=self.log_actor)
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
        if self._guard_proxy_refused:
            return
        if self._guard_proxy_header is not None:
            rest = self._guard_read_proxy_header(data)
            if not rest:
                return
            data = rest
        super().data_received(data)
        if self.cycle is not self._guard_cycle:
            self._guard_offer_disconnect()
        self._guard_follow()
        self._guard_release_if_upgraded()

    def _guard_offer_disconnect(self) -> None:
        """Give a new request's handler ``scope["extensions"][DISCONNECT_EXTENSION]``.

        ``on_disconnect(callback)``: ``callback()`` runs once, in the loop, the
        moment the client is found gone before the response completed (when
        uvicorn's ``receive`` would start returning ``http.disconnect``). A
        handler that waits for something else (a permission request waits for
        a person) then needs no task of its own blocked in ``receive``.
        """
        cycle = self.cycle
        if cycle is None or cycle is self._guard_cycle:
            return
        self._guard_cycle = cycle
        self._guard_on_gone = []
        extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})
        extensions[DISCONNECT_EXTENSION] = self._guard_on_gone.append

    def on_response_complete(self) -> None:
        # Answered: a client leaving now is no news to the handler, and what it
        # registered (its task, its decision) is not kept for the idle connection.
        self._guard_on_gone.clear()
        if isinstance(self.transport, CoalescedWrites):
            self.transport.response_complete()
        super().on_response_complete()  # may serve a pipelined request, even an upgrade
        if self.cycle is not self._guard_cycle:
            self._guard_offer_disconnect()
        state = self.conn.their_state if self._guard_http() else None
        if state is h11.SEND_BODY:  # awaiting_body
            # Answered before the body was in: h11 cannot start the next request
            # until it is, and reading it to the end is what a slow client wants.
            self._guard_close()
        elif state is h11.IDLE:  # awaiting_head
            self._guard_arm_head()  # the next request on this keep-alive connection
        else:
            self._guard_follow()
        self._guard_release_if_upgraded()

    def _guard_release_if_upgraded(self) -> None:
        transport = self._guard_transport
        if transport is not None and transport.get_protocol() is not self:
            # A WebSocket now: the transport still counts toward the cap, but this
            # spent HTTP protocol is not kept alive for the socket's lifetime.
            # Its frames are written whole and at once: nothing to hold for.
            if isinstance(self.transport, CoalescedWrites):
                self.transport.pass_through()
            self._guard_stop_timer()
            self.open_transports[transport] = None
            self.http_protocols.pop(self, None)
            self._guard_arm_upgraded_sweep()

    def _guard_arm_upgraded_sweep(self) -> None:
        if self.upgraded_sweep:
            return
        cls = type(self)

        def sweep() -> None:
            cls.upgraded_sweep.clear()
            transports = cls.open_transports
            for closed in [t for t, p in transports.items() if p is None and t.is_closing()]:
                del transports[closed]
            if any(p is None for p in transports.values()):
                cls.upgraded_sweep.append(
                    asyncio.get_running_loop().call_later(cls.upgraded_sweep_interval, sweep)
                )

        loop = asyncio.get_running_loop()
        self.upgraded_sweep.append(loop.call_later(self.upgraded_sweep_interval, sweep))

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_stop_timer()
        if self._guard_transport is not None:
            self.open_transports.pop(self._guard_transport, None)
        self.http_protocols.pop(self, None)
        super().connection_lost(exc)
        # uvicorn marked the cycle disconnected (also after a 408, see
        # _guard_timeout_answer) unless its response had completed.
        cycle = self.cycle
        if cycle is not None and cycle is self._guard_cycle and cycle.disconnected:
            on_gone, self._guard_on_gone = self._guard_on_gone, []
            for callback in on_gone:
                try:
                    callback()
                except Exception:  # one handler's bug must not keep the others from hearing
                    logger.bind(actor=self.log_actor).exception("a disconnect callback failed")


class CoalescedWrites(asyncio.Transport):
    """A transport that sends a response's head together with its body.

    uvicorn writes the head on ``http.response.start`` and the body on
    ``http.response.body``: two system calls, two TCP segments the client
    wakes up for. A head that declares a ``Content-Length`` is held until the
    next write (the body: both leave in one call, at once) or the end of the
    response (no body). Nothing else is held: an interim ``1xx`` (a client
    waits for ``100 Continue`` before it sends), a streamed (chunked) head, an
    upgraded connection's frames. ``close`` and ``write_eof`` flush first;
    ``abort`` drops what is held, as it drops the transport's own buffer.
    Everything else goes to the real transport.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._held: bytes | None = None
        self._holding = True  # until the connection is upgraded
        #: The client a trusted proxy's PROXY header named (None: the socket's peer).
        self.peer: tuple[str, int] | None = None
        #: The trusted proxy's header said the client reached it over TLS.
        self.proxied_tls = False

    def pass_through(self) -> None:
        """From now on write at once (a WebSocket took the connection over)."""
        self.flush()
        self._holding = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._held is not None:  # the body after its head: one call
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held + bytes(data))
            return
        if self._holding and _held_head(data):
            self._held = bytes(data)
            return
        self._transport.write(data)

    def response_complete(self) -> None:
        """The response ended: a head without a body goes now."""
        self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.peer is not None:
            # uvicorn reads the client from "socket" first, then "peername" (module docstring).
            if name == "peername":
                return self.peer
            if name == "socket":
                return default
        if self.proxied_tls and name == "sslcontext":
            return True  # uvicorn's is_ssl() only tests it (module docstring)
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


def _held_head(data: bytes | bytearray | memoryview) -> bool:
    """A final response head with a Content-Length (h11 writes a head whole, in one call)."""
    head = bytes(data[:4096]).lower()
    return (
        head.startswith(b"http/1.1 ")
        and not head.startswith(b"http/1.1 1")
        and head.endswith(b"\r\n\r\n")
        and b"\r\ncontent-length:" in head
    )


def _in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer of a dual-stack socket
    return any(ip in network for network in networks)


def guarded_protocol(
    *,
    header_timeout: float,
    max_connections: int,
    request_timeout: float | None = None,
    max_per_client: int | None = None,
    trusted_proxies: tuple[IPNetwork, ...] = (),
    log_actor: str = "http",
) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits, for ``uvicorn.Config(http=...)``.

    ``request_timeout`` defaults to three times ``header_timeout``;
    ``max_per_client`` to no per-client cap beyond ``max_connections``;
    ``trusted_proxies`` to none (no PROXY header is read). Use one class per
    server: the caps count the connections of its class.
    """
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "request_timeout": 3 * header_timeout if request_timeout is None else request_timeout,
            "max_connections": max_connections,
            "max_per_client": max_connections if max_per_client is None else max_per_client,
            "trusted_proxies": tuple(trusted_proxies),
            "log_actor": log_actor,
            "open_transports": {},
            "http_protocols": {},
            "upgraded_sweep": [],
            "client_checks": {},
        },
    )


class EarlyAnswerClose:
    """ASGI wrapper: an answer given before the request body was read to its end
    carries ``Connection: close``, and the rest of the body is drained (at most
    ``drain_bytes`` and ``drain_seconds``) before the answer ends and the
    server closes the connection."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        drain_bytes: int = DRAIN_MAX_BYTES,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.app = app
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not declares_body(scope):
            await self.app(scope, receive, send)
            return
        ended = False

        async def tracked_receive() -> Message:
            nonlocal ended
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                ended = True
            return message

        early = False

        async def guarded_send(message: Message) -> None:
            nonlocal early
            if message["type"] == "http.response.start" and not ended:
                early = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and early and not message.get("more_body"):
                await send({**message, "more_body": True})
                await drain(tracked_receive, lambda: ended, self.drain_bytes, self.drain_seconds)
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)


async def drain(
    receive: Receive, ended: Callable[[], bool], max_bytes: int, max_seconds: float
) -> None:
    """Read and discard what is left of a request body, within the bounds."""
    read = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):
            while not ended() and read <= max_bytes:
                read += len((await receive()).get("body", b""))


def declares_body(scope: Scope) -> bool:
    """Whether the request's head announces a body (a non-zero length or chunks)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return bool(value.strip() != b"0")
    return False
