"""The gateway's parts, composed: which object owns which.

::

    RequestGuard (http/guard.py)          Host allowlist, operator auth, CSRF, headers
      └─ Routes (http/routes.py)          REST handlers, console page
           ├─ Hub (hub.py)                sled WebSockets; serves sled.<project>.mcp on the bus
           ├─ Relay (relay.py)            POST /sleds/{project}/mcp → bus request
           └─ Approvals (approvals.py)    the one door for decisions; audit before answer
    Events (events.py)  →  GatewayState (state.py), the read model, and the transports
    LocalBus (bus/local.py)               in-process request/reply and publish/subscribe

Why ASGI and not ``websockets.asyncio.server.serve``: websockets' HTTP parser
refuses requests with a body ("unsupported request body"), so the REST and
MCP POSTs cannot share its port. uvicorn runs the WebSocket side on the
websockets library's own sans-I/O ``ServerProtocol`` (``ws="websockets-sansio"``),
and the ASGI *denial response* extension lets the hub answer a bad token with
a real HTTP 401 before the upgrade.

Everything here runs on one event loop; :class:`sled_gateway.state.GatewayState`
is the only thing other threads touch.
"""

from __future__ import annotations

from collections.abc import Callable

from sled_gateway.approvals import Approvals, Forbidden, NotRecorded
from sled_gateway.auth.console import ConsoleSessionBackend
from sled_gateway.auth.operator import BearerTokenBackend
from sled_gateway.auth.sled import SledTokenBackend
from sled_gateway.bus import Bus
from sled_gateway.bus.local import LocalBus
from sled_gateway.config import GatewayConfig
from sled_gateway.events import Events, PermissionDecided, PermissionRequested, PermissionWithdrawn
from sled_gateway.http.console import SHELL_PATHS
from sled_gateway.http.guard import AllowedHosts, RequestGuard
from sled_gateway.http.routes import UPLINK_PATH, Routes
from sled_gateway.hub import Hub
from sled_gateway.records import DecisionRecord, PendingPermission
from sled_gateway.relay import Relay
from sled_gateway.state import GatewayState
from sled_gateway.store import Store, make_store

__all__ = ["UPLINK_PATH", "Forbidden", "GatewayApp", "NotRecorded"]


def _nats_bus(urls: str) -> Bus:
    # Imported here: nats-py is the optional `cluster` extra, needed only with --bus nats://.
    from sled_gateway.bus.nats import NatsBus

    return NatsBus(urls)


class GatewayApp:
    """One gateway process's parts, wired; ``asgi`` is what uvicorn serves."""

    def __init__(
        self,
        config: GatewayConfig,
        state: GatewayState,
        listen_host: str = "127.0.0.1",
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store if store is not None else make_store().open()
        self.events = Events()
        state.follow(self.events)
        self.bus: Bus = LocalBus() if config.bus == "local" else _nats_bus(config.bus)
        self.approvals = Approvals(
            self.store,
            state,
            self.events,
            auto=config.auto,
            max_pending_per_sled=config.max_pending_per_sled,
            max_input_bytes=config.max_input_bytes,
            max_pending_bytes_per_sled=config.max_pending_bytes_per_sled,
            max_pending_bytes=config.max_pending_bytes,
        )
        self.hub = Hub(
            config,
            state,
            events=self.events,
            approvals=self.approvals,
            bus=self.bus,
            sled_auth=SledTokenBackend(config.token, config.sled_tokens),
        )
        self.relay = Relay(config, state, self.bus)
        self.routes = Routes(
            config,
            state,
            store=self.store,
            approvals=self.approvals,
            hub=self.hub,
            relay=self.relay,
        )
        state.add_change_listener(self.routes.live.changed)
        self.allowed_hosts = AllowedHosts.default(listen_host, config.allowed_hosts)
        self.asgi = RequestGuard(
            self.routes.app,
            operator=BearerTokenBackend(config.operator_token),
            console=ConsoleSessionBackend(),
            allowed_hosts=self.allowed_hosts,
            public_websockets=(UPLINK_PATH,),
            public_http_paths=(UPLINK_PATH, *SHELL_PATHS),
        )

    def add_pending_listener(self, callback: Callable[[PendingPermission], None]) -> None:
        """Call ``callback(item)`` (on the loop thread; keep it quick) for each new request."""
        self.events.subscribe(PermissionRequested, lambda event: callback(event.item))

    def add_decision_listener(self, callback: Callable[[DecisionRecord], None]) -> None:
        """Call ``callback(record)`` (on the loop thread; keep it quick) for each decision
        of a pending request and each withdrawn one, so a transport can show the outcome
        wherever it asked."""

        def decided(event: PermissionDecided) -> None:
            if event.was_pending:
                callback(event.record)

        self.events.subscribe(PermissionDecided, decided)
        self.events.subscribe(PermissionWithdrawn, lambda event: callback(event.record))

    async def monitor(self) -> None:
        await self.hub.monitor()

    async def shutdown(self) -> None:
        self.routes.live.close_all()  # an open console must not hold the server's shutdown
        await self.hub.shutdown()
