"""The gateway's parts, composed: which object owns which.

::

    RequestGuard (http/guard.py)          Host allowlist, operator auth, CSRF, headers
      └─ Routes (http/routes.py)          REST handlers, console page (the decision POST
           │                              on a lean path past Starlette: http/lean.py)
           ├─ OidcLogin (auth/oidc.py)    GET /login, /auth/callback → a person's console session
           ├─ Hub (hub.py)                sled WebSockets; serves sled.<project>.mcp on the bus
           ├─ Relay (relay.py)            POST /sleds/{project}/mcp → bus request
           └─ Approvals (approvals.py)    the one door for decisions; audit before answer
    Events (events.py)  →  GatewayState (state.py), the read model, and the transports
    LocalBus (bus/local.py)               in-process request/reply and publish/subscribe
    Sharing (sharing.py)                  rules and console sessions changed by other replicas

Why ASGI and not ``websockets.asyncio.server.serve``: websockets' HTTP parser
refuses requests with a body ("unsupported request body"), so the REST and
MCP POSTs cannot share its port. uvicorn runs the WebSocket side on the
websockets library's own sans-I/O ``ServerProtocol`` (uvicorn's websockets-sansio
protocol, lightened per idle socket: ``LeanWebSocketProtocol`` in
:mod:`sled_gateway.uvicorn_adapter`), and the ASGI *denial response* extension lets
the hub answer a bad token with a real HTTP 401 before the upgrade.

Everything here runs on one event loop; :class:`sled_gateway.state.GatewayState`
is the only thing other threads touch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sled_gateway.approvals import Approvals, Forbidden, NotRecorded
from sled_gateway.auth.console import ConsoleSessionBackend, Sessions
from sled_gateway.auth.login_limits import LoginLimiter
from sled_gateway.auth.oidc import (
    CALLBACK_PATH,
    LOGIN_PATH,
    LOGIN_TTL,
    LOGOUT_PATH,
    ME_PATH,
    OidcLogin,
    logout,
    me,
    not_configured,
)
from sled_gateway.auth.operator import BearerTokenBackend
from sled_gateway.auth.person_token import PersonTokenBackend
from sled_gateway.auth.sled import SledTokenBackend
from sled_gateway.bus import Bus
from sled_gateway.bus.local import LocalBus
from sled_gateway.config import GatewayConfig, read_client_secret
from sled_gateway.events import (
    Events,
    FleetPermissionEnded,
    FleetPermissionRequested,
    PermissionDecided,
    PermissionRequested,
    PermissionWithdrawn,
)
from sled_gateway.http.console import SHELL_PATHS
from sled_gateway.http.guard import AllowedHosts, RequestGuard
from sled_gateway.http.routes import UPLINK_PATH, Routes
from sled_gateway.hub import Hub
from sled_gateway.people import Grants, NoGrants
from sled_gateway.records import DecisionRecord, PendingPermission
from sled_gateway.relay import Departures, Relay
from sled_gateway.replicas import Replicas
from sled_gateway.sharing import Sharing
from sled_gateway.state import GatewayState
from sled_gateway.store import Store, make_store
from sled_gateway.store.fleet import FleetStore
from sled_gateway.tokens import PersonTokens

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
        *,
        grants: Grants | None = None,
    ) -> None:
        """``grants``: where signed-in people's roles come from (without one, a person
        may sign in and do nothing; see :mod:`sled_gateway.people`)."""
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
            access=config.access,
        )
        self.hub = Hub(
            config,
            state,
            events=self.events,
            approvals=self.approvals,
            bus=self.bus,
            sled_auth=SledTokenBackend(config.token, config.sled_tokens),
        )
        #: This process among the replicas on a shared server database; None for the
        #: embedded default (one process, pending requests in memory only).
        self.replicas: Replicas | None = None
        if isinstance(self.store, FleetStore) and getattr(self.store, "shared", False):
            self.replicas = Replicas(
                self.store,
                self.bus,
                state,
                self.events,
                lease_seconds=config.lease_seconds,
                sweep_interval=config.sweep_interval,
            )
            self.approvals.replicas = self.replicas
        self.relay = Relay(
            config,
            state,
            self.bus,
            self.replicas.store.sled_left_at
            if self.replicas is not None
            else Departures(self.events).left_at,
        )
        #: Where people's roles come from (the --access file); OpenID Connect sign-in and
        #: person tokens turn a Person into a Principal through it.
        self.grants: Grants = (
            grants
            if grants is not None
            else config.access
            if config.access is not None
            else NoGrants()
        )
        self.tokens = PersonTokens(self.store, self.grants)
        self.sessions = Sessions(self.store, self.bus)
        self.console = ConsoleSessionBackend(self.sessions, grants=self.grants)
        #: Rules and console sessions changed by other replicas on the same database.
        self.sharing = Sharing(self.store, self.bus, self.events, self.sessions)
        self.oidc: OidcLogin | None = None
        if config.oidc_issuer is not None and config.oidc_client_id is not None:
            secret_file = config.oidc_client_secret_file
            self.oidc = OidcLogin(
                self.console,
                issuer=config.oidc_issuer,
                client_id=config.oidc_client_id,
                client_secret=read_client_secret(secret_file) if secret_file else None,
                store=self.store,
                limiter=LoginLimiter(rate=config.login_rate, ttl=LOGIN_TTL),
                max_logins=config.max_logins,
            )
        sign_in = self.oidc is not None

        async def _me(request: Request) -> Response:
            return me(request, sign_in=sign_in)

        async def _logout(request: Request) -> Response:
            return await logout(request, self.console)

        sign_in_routes = [
            *(
                self.oidc.routes()
                if self.oidc is not None
                else [
                    Route(LOGIN_PATH, not_configured, methods=["GET"]),
                    Route(CALLBACK_PATH, not_configured, methods=["GET"]),
                ]
            ),
            Route(LOGOUT_PATH, _logout, methods=["POST"]),
            Route(ME_PATH, _me, methods=["GET"]),
        ]
        self.routes = Routes(
            config,
            state,
            store=self.store,
            approvals=self.approvals,
            hub=self.hub,
            relay=self.relay,
            tokens=self.tokens,
            extra_routes=sign_in_routes,
        )
        state.add_change_listener(self.routes.live.changed)
        self.allowed_hosts = AllowedHosts.default(listen_host, config.allowed_hosts)
        self.asgi = RequestGuard(
            self.routes.asgi,
            operator=BearerTokenBackend(config.operator_token),
            console=self.console,
            allowed_hosts=self.allowed_hosts,
            person_tokens=PersonTokenBackend(self.tokens),
            public_websockets=(UPLINK_PATH,),
            socket_endpoints={UPLINK_PATH: self.hub.uplink},
            # The app's own files, and the sign-in's paths: a person has no credential yet there.
            public_http_paths=(UPLINK_PATH, *SHELL_PATHS, LOGIN_PATH, CALLBACK_PATH),
            sign_in=sign_in,
        )

    def add_pending_listener(self, callback: Callable[[PendingPermission], None]) -> None:
        """Call ``callback(item)`` (on the loop thread; keep it quick) for each new request."""
        self.events.subscribe(PermissionRequested, lambda event: callback(event.item))
        # With replicas, people see the whole fleet, not only this replica's sleds.
        self.events.subscribe(FleetPermissionRequested, lambda event: callback(event.item))

    def add_decision_listener(self, callback: Callable[[DecisionRecord], None]) -> None:
        """Call ``callback(record)`` (on the loop thread; keep it quick) for each decision
        of a pending request and each withdrawn one, so a transport can show the outcome
        wherever it asked."""

        def decided(event: PermissionDecided) -> None:
            if event.was_pending:
                callback(event.record)

        self.events.subscribe(PermissionDecided, decided)
        self.events.subscribe(PermissionWithdrawn, lambda event: callback(event.record))
        self.events.subscribe(FleetPermissionEnded, lambda event: callback(event.record))

    async def monitor(self) -> None:
        if self.replicas is not None:
            await self.replicas.start(self.hub)
        following = asyncio.get_running_loop().create_task(self.sharing.run())
        try:
            await self.hub.monitor()
        finally:
            following.cancel()

    async def shutdown(self) -> None:
        if self.replicas is not None:
            self.replicas.stop()
        self.routes.live.close_all()  # an open console must not hold the server's shutdown
        await self.hub.shutdown()
        if self.replicas is not None:
            # The sessions' ends withdraw their requests (by "sled_disconnected") first;
            # what is still held after that, the release ends.
            deadline = time.monotonic() + 1.0
            while self.hub.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await self.approvals.settled(timeout=1.0)
            await self.replicas.give_up()
