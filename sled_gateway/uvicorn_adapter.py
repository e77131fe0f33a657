"""Everything the gateway needs from uvicorn beyond its documented API, in one place.

uvicorn documents ``uvicorn.Config`` (its settings), ``uvicorn.Server(config)``
with ``run()`` and ``serve()``, and ``uvicorn.run``. The gateway needs more than
that API gives, so this module is the one place in ``sled_gateway/`` allowed to
reach further (``tests/test_architecture.py`` enforces it), and
``tests/test_uvicorn_adapter.py`` checks that each name it relies on still
exists, with the signature relied on, on the installed uvicorn.
``pyproject.toml`` pins uvicorn to the minor release those tests passed with.

1. **Deadlines and connection caps** (a header-read deadline, a deadline for
   the whole request, a per-client cap and an evicting total cap):
   :class:`GuardedH11Protocol`, :func:`guarded_protocol` and
   :class:`EarlyAnswerClose`, re-exported here from ``actors/http_guard.py``,
   which the uplink's ingress uses too (its docstring names the uvicorn
   internals they rely on, and why).

2. **Knowing when the server accepts connections, and asking it to stop**, from
   another thread (:class:`NotifyingServer`).

3. **A sled's idle connection costing less memory** (:class:`LeanWebSocketProtocol`,
   passed as ``uvicorn.Config(ws=...)``, which takes a class as well as a name).

4. **Reads without a fresh 256 KiB block each** (:class:`ReadsIntoOneBuffer`, mixed
   into both protocols by :func:`reading_into_one_buffer`): asyncio's socket
   transport reads a ``Protocol``'s data with ``recv(256 KiB)``, a new bytes object
   of that size each time; above the mmap threshold the gateway fixes at 128 KiB
   (:mod:`sled_gateway.memory`), glibc maps it, shrinks it with ``mremap`` and unmaps
   it when freed, three system calls and a page fault a read. A protocol that is an
   ``asyncio.BufferedProtocol`` (public asyncio API) is read with ``recv_into`` a
   buffer it gives instead; this one hands uvicorn's ``data_received`` a copy of just
   the bytes that came. The buffer is one a thread (a gateway's loop runs on one), so
   an idle sled costs no memory for it. uvicorn's upgrade to a WebSocket calls
   ``transport.set_protocol``, which asyncio uses to choose how to read from then on.
   uvloop (the gateway's loop where it is installed) reads into the same buffer through
   the same API; the fresh 256 KiB blocks the mixin avoids are asyncio's.

What :class:`NotifyingServer` relies on, and why no public hook exists:

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

What :class:`LeanWebSocketProtocol` relies on, and why: a gateway holds thousands of
idle sled sockets, and uvicorn's websockets-sansio protocol gives each one an
``asyncio.Queue`` and an ``asyncio.Event``: four ``collections.deque`` of 624 bytes
each, about 4 KiB a connection that holds, at most, a message or two. And it keeps
the handshake's request and response for as long as the socket lives, though nothing
reads them once the handshake is sent (and websockets' parser generator keeps the
request in its suspended frame whatever uvicorn does: its headers are emptied).

- ``WebSocketsSansIOProtocol`` (``uvicorn.protocols.websockets.websockets_sansio_impl``):
  ``__init__`` sets ``self.queue`` (used only through ``put_nowait``, ``get`` and
  ``empty``) and ``self.writable`` (``set``, ``clear``, ``wait``); the subclass puts
  :class:`LeanQueue` and :class:`LeanEvent` there, which keep those methods'
  behaviour (FIFO; a waiter cancelled after its wake-up passes it on).
- ``self.request`` and ``self.response`` are read only while ``handshake_complete``
  is false (``handle_connect`` and the accept in ``send``); the subclass drops them
  once ``send`` has completed the handshake, and empties the request's ``headers``
  (websockets' ``Headers.clear``): websockets reads them only to make its answer
  (``ServerProtocol.accept``), and the scope keeps its own copy for the app.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from actors.http_guard import EarlyAnswerClose, GuardedH11Protocol, guarded_protocol

__all__ = [
    "EarlyAnswerClose",
    "GuardedH11Protocol",
    "LeanEvent",
    "LeanQueue",
    "LeanWebSocketProtocol",
    "NotifyingServer",
    "ReadsIntoOneBuffer",
    "guarded_protocol",
    "reading_into_one_buffer",
]


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


class LeanQueue:
    """What uvicorn's WebSocket protocol uses of ``asyncio.Queue`` (unbounded, FIFO):
    ``put_nowait``, ``get`` and ``empty``, in two lists instead of four deques.

    Meant for the few items a connection queues (uvicorn pauses reading once a
    message waits), so taking from the front of a list costs nothing worth a deque.
    """

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_next()

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                elif self._items:
                    # Woken, then cancelled before it took the item: the next waiter may.
                    self._wake_next()
                raise
        return self._items.pop(0)


class LeanEvent:
    """What uvicorn's WebSocket protocol uses of ``asyncio.Event`` (``set``, ``clear``,
    ``wait``, ``is_set``), with its waiters' list made only while someone waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with less memory per idle connection
    (see the module docstring: what it replaces, and what of uvicorn it relies on)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent()  # type: ignore[assignment]
        self.writable.set()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "request", None) is not None:
            # Read only until the handshake is sent: the headers need not live as long
            # as the socket does. websockets' parser keeps the request object itself.
            self.request.headers.clear()
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]


#: The most one read from a socket takes (below glibc's mmap threshold, see the module doc).
READ_SIZE = 64 * 1024


class _ReadBuffer(threading.local):
    """One read buffer a thread: its bytes are copied out before the next read on the
    same thread can begin (``recv_into`` and ``buffer_updated`` run in one callback),
    and each gateway in a process (tests run several) reads on its own loop thread."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_read_buffer = _ReadBuffer()


class ReadsIntoOneBuffer(asyncio.BufferedProtocol):
    """Mixin for a ``data_received`` protocol: asyncio reads into the thread's one
    buffer, and ``data_received`` gets the bytes that came (see the module docstring)."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_read_buffer.view[:nbytes]))  # type: ignore[attr-defined]


def reading_into_one_buffer(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``protocol``'s subclass that reads through :class:`ReadsIntoOneBuffer`. The class
    attributes stay the parent's (the guarded protocol's connection counts live there)."""
    return type(protocol.__name__, (ReadsIntoOneBuffer, protocol), {})
