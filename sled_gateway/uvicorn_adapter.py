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
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from actors.http_guard import EarlyAnswerClose, GuardedH11Protocol, guarded_protocol

__all__ = ["EarlyAnswerClose", "GuardedH11Protocol", "NotifyingServer", "guarded_protocol"]


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
