"""The :class:`Gateway`: the reference gateway, run on its own thread.

It binds its socket in the caller's thread (so "port in use" is an ordinary
``OSError`` there, and port 0 resolves at once), then serves with uvicorn on
a private event loop in a background thread. Tests and ``run_gateway.py``
talk to it through thread-safe methods; anything that must touch a session
crosses into the loop with ``run_coroutine_threadsafe``.

Its parts (the socket, the store, the loop, the sled sessions, the HTTP
server, then the transports given to :meth:`Gateway.add_transport`) start
in that order and stop in reverse, through one
:class:`~sled_gateway.lifecycle.Lifecycle`.

::

    with Gateway(token="s3cret", auto="approve") as gw:   # GatewayConfig's fields as keywords
        url = gw.url_for_sleds()          # ws://127.0.0.1:PORT/api/sled-uplink?token=s3cret
        gw.wait_for(lambda s: any(x["project"] == "p" for x in s["sleds"]), timeout=5)
        gw.decide("p", "req-1", "approve")
        httpx.get(gw.http_url + "/api/state", headers=gw.api_headers())
        print(gw.console_url())           # http://127.0.0.1:PORT/?token=<operator token>

The operator token (console, REST API, MCP relay) is generated when none is
given: operator authentication cannot be switched off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import math
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import uvicorn
from loguru import logger

from actors.loop import new_event_loop
from protocol import Decision
from sled_gateway.app import GatewayApp
from sled_gateway.config import GatewayConfig
from sled_gateway.events import Events
from sled_gateway.lifecycle import Lifecycle
from sled_gateway.logs import protect_uvicorn_loggers
from sled_gateway.people import Grants
from sled_gateway.principal import Principal, as_principal
from sled_gateway.records import DecisionRecord, PendingPermission
from sled_gateway.replicas import Replicas
from sled_gateway.state import GatewayState
from sled_gateway.store import make_store
from sled_gateway.uvicorn_adapter import (
    EarlyAnswerClose,
    LeanWebSocketProtocol,
    NotifyingServer,
    guarded_protocol,
    reading_into_one_buffer,
)

log = logger.bind(actor="gateway")
T = TypeVar("T")


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    """The gateway's thread: run ``loop`` until stopped, then end what is left on it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except BaseException as exc:
        log.opt(exception=exc).error("gateway loop crashed")
    finally:
        loop.close()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (Linux): uvicorn writes a response's head
        # and body apart, and without it each HTTP answer waited ~40 ms on the
        # client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    """A host to put in URLs: wildcards become loopback, IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


#: The least ``retry_after`` a drain tells its sleds: with every sled closed at
#: once (``--drain-seconds 0``), their reconnects still spread over this long.
MIN_RETRY_AFTER = 5


def drain_retry_after(drain_seconds: float) -> int:
    """The ``retry_after=<s>`` of a drain over ``drain_seconds``: a sled waits a random
    time up to it, so the reconnects spread at least as wide as the closes did."""
    return max(MIN_RETRY_AFTER, math.ceil(drain_seconds))


class Transport(Protocol):
    """A way to answer permission requests besides the console (the terminal, Matrix).

    Made with the gateway; ``start()`` once the gateway serves (the hub and
    the HTTP server are up), ``stop()`` before they stop.
    """

    def start(self) -> object: ...

    def stop(self) -> object: ...


class Gateway:
    """The reference sled gateway, usable from tests in a background thread."""

    def __init__(
        self, config: GatewayConfig | None = None, *, grants: Grants | None = None, **overrides: Any
    ) -> None:
        """``Gateway(**settings)`` or ``Gateway(config, **overrides)``.

        The keywords are :class:`GatewayConfig`'s fields (``run_gateway.py
        --help`` describes each): ``token`` is the one shared sled token
        (demos), ``sled_tokens`` maps a project to its own, ``operator_token``
        opens the console and the API (generated if None), ``allowed_hosts``
        are Host names served besides the loopback names and ``host``; ``db``
        is the SQLite file (``:memory:`` by default).

        ``grants`` gives signed-in people (``--oidc-issuer``) their roles: a
        :class:`~sled_gateway.people.Grants` (the ``--access`` file's); without
        one they may sign in and do nothing.
        """
        self.config = (
            replace(config, **overrides) if config is not None else GatewayConfig(**overrides)
        )
        self.host = self.config.host
        self._requested_port = self.config.port
        self._state = GatewayState(self.config.heartbeat_interval)
        # Opened in start(), on the caller's thread, so a bad file is an error there.
        self.store = make_store(
            self.config.db,
            retention_days=self.config.audit_retention_days,
            max_bytes=self.config.audit_max_bytes,
        )
        self._app = GatewayApp(
            self.config, self._state, listen_host=self.host, store=self.store, grants=grants
        )
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: NotifyingServer | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self._monitor: concurrent.futures.Future[None] | None = None
        self._started = threading.Event()
        self._start_timeout = 10.0
        self._stop_timeout = 5.0
        self._lifecycle = Lifecycle()
        # The order of sled_gateway/lifecycle.py: each part one line.
        self._lifecycle.add("socket", self._bind_socket, self._close_socket)
        # The store closes after the loop ends: the sessions' last audit rows are queued by then.
        self._lifecycle.add("store", self.store.open, self.store.close)
        self._lifecycle.add("loop", self._start_loop, self._stop_loop)
        self._lifecycle.add("bus", self._app.bus.open, self._app.bus.close)
        self._lifecycle.add("hub", self._start_hub, self._stop_hub)
        self._lifecycle.add("http", self._start_http, self._stop_http)

    # -- lifecycle ----------------------------------------------------------------

    def add_transport(self, transport: Transport, name: str | None = None) -> None:
        """Start ``transport`` after the HTTP server and stop it before (now, if running)."""
        self._lifecycle.add(name or type(transport).__name__, transport.start, transport.stop)

    @property
    def parts(self) -> list[str]:
        """The names of the parts running now, in the order they started."""
        return self._lifecycle.started

    def start(self, timeout: float = 10.0) -> Gateway:
        """Bind and serve; returns once listening. ``OSError`` if the address is taken."""
        if self._thread is not None:
            raise RuntimeError("Gateway already started")
        protect_uvicorn_loggers()
        self._start_timeout = timeout
        try:
            self._lifecycle.start()
        except BaseException:
            self._thread = self._loop = None  # not started: start() may be tried again
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the transports, the listener, the sled sessions (1001), the store and
        the loop, in that order. Idempotent."""
        self._stop_timeout = timeout
        self._lifecycle.stop()
        log.info("gateway stopped")

    def drain(self, seconds: float | None = None) -> concurrent.futures.Future[None]:
        """Begin draining (SIGTERM): ``/readyz`` → 503 at once, then the sleds are closed
        spread over ``seconds`` (``drain_seconds`` by default) with ``1012`` and
        ``retry_after=<s>``. The future is done once they are; :meth:`stop` follows."""
        window = self.config.drain_seconds if seconds is None else seconds
        return self.run_on_loop(self._app.hub.drain(window, drain_retry_after(window)))

    def _start_loop(self) -> None:
        loop = new_event_loop()
        thread = threading.Thread(
            target=_run_forever, args=(loop,), name="sled-gateway", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()

    def _stop_loop(self) -> None:
        loop, thread, server, serving = self._loop, self._thread, self._server, self._serving
        if loop is None or thread is None:
            return
        if server is not None and serving is not None:
            # The hub closed the sled sessions; uvicorn now closes what is left
            # (keep-alive HTTP connections) and returns.
            server.request_exit()
            concurrent.futures.wait([serving], self._stop_timeout)
        if thread is threading.current_thread():
            loop.call_soon(loop.stop)
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._stop_timeout)
        if thread.is_alive():
            log.error("gateway thread did not stop within {} s", self._stop_timeout)

    def _start_hub(self) -> None:
        self._monitor = self.run_on_loop(self._app.monitor())

    def _stop_hub(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            try:
                self.run_on_loop(self._app.shutdown()).result(self._stop_timeout / 2)
            except Exception as exc:
                log.warning("gateway shutdown step failed: {!r}", exc)
        if self._monitor is not None:
            self._monitor.cancel()

    def _bind_socket(self) -> None:
        self._sock = _bind(self.host, self._requested_port)
        self._port = self._sock.getsockname()[1]

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _start_http(self) -> None:
        self._started.clear()
        serving = self._serving = self.run_on_loop(self._serve())
        serving.add_done_callback(lambda _: self._started.set())  # ended before listening
        if not self._started.wait(self._start_timeout) or serving.done():
            error = serving.exception() if serving.done() else None
            raise RuntimeError(f"gateway did not start: {error!r}")
        log.info("gateway listening on {}", self.http_url)

    def _stop_http(self) -> None:
        """Stop accepting connections; the ones open stay for the hub to close."""
        if self._server is not None and self.running:
            self.run_on_loop(self._server.stop_accepting()).result(self._stop_timeout)

    async def _serve(self) -> None:
        config = uvicorn.Config(
            # An answer before the body is read closes the connection after it.
            EarlyAnswerClose(self._app.asgi),
            lifespan="off",
            log_config=None,  # the embedding program owns logging
            access_log=False,  # access lines carry ?token=
            # Head and whole-request deadlines, a per-client cap and an evicting
            # total cap on top of uvicorn's h11 protocol (uvicorn has none).
            # Both protocols read into one buffer, not a new 256 KiB block a read.
            http=reading_into_one_buffer(
                guarded_protocol(
                    header_timeout=self.config.header_timeout,
                    request_timeout=self.config.request_timeout,
                    max_connections=self.config.max_connections,
                    max_per_client=self.config.max_connections_per_client,
                    trusted_proxies=self.config.trusted_proxies,
                    log_actor="gateway",
                )
            ),
            timeout_keep_alive=5,
            # uvicorn believes X-Forwarded-For from 127.0.0.1 and ::1 by default (or from
            # whatever FORWARDED_ALLOW_IPS says): any local process could name another
            # client. The client's address comes from the connection, or from a trusted
            # proxy's PROXY header (--trusted-proxy), never from a header of the request.
            proxy_headers=False,
            # The websockets library's ServerProtocol, lighter per idle connection.
            ws=reading_into_one_buffer(LeanWebSocketProtocol),
            ws_max_size=self.config.max_frame_bytes,
            ws_ping_interval=self.config.ping_interval,
            ws_ping_timeout=self.config.ping_timeout,
            timeout_graceful_shutdown=3,
            server_header=False,
        )
        self._server = NotifyingServer(config, on_started=self._started.set)
        assert self._sock is not None
        try:
            await self._server.serve(sockets=[self._sock])
        except Exception as exc:
            log.opt(exception=exc).error("gateway server crashed")
            raise

    def __enter__(self) -> Gateway:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True from start until stop, unless the server ended on its own."""
        serving = self._serving
        return (
            self._thread is not None
            and self._thread.is_alive()
            and serving is not None
            and not serving.done()
        )

    @property
    def replicas(self) -> Replicas | None:
        """This process among the replicas sharing a server database, or None (one node)."""
        return self._app.replicas

    # -- addresses ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("Gateway not started")
        return self._port

    @property
    def http_url(self) -> str:
        """``http://host:port`` (the console is at ``/``)."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def operator_token(self) -> str:
        """The operator's credential (console, REST API, MCP relay). Never log it."""
        return self.config.operator_token

    def console_url(self) -> str:
        """``http://host:port/?token=…``: opening it logs a browser in (then redirects to ``/``)."""
        return f"{self.http_url}/?token={quote(self.operator_token, safe='')}"

    def api_headers(self) -> dict[str, str]:
        """The header API and MCP clients send: ``{"Authorization": "Bearer …"}``."""
        return {"Authorization": f"Bearer {self.operator_token}"}

    @property
    def allowed_hosts(self) -> list[str]:
        """The Host names served, as configured (loopback names and the listen host first)."""
        return list(self._app.allowed_hosts.shown)

    def url_for_sleds(self, token: str | None = None) -> str:
        """The uplink URL a sled connects to; ``token`` defaults to the configured one.

        It carries the real token: never log it (``protocol.redact`` it first).
        """
        url = f"ws://{_url_host(self.host)}:{self.port}/api/sled-uplink"
        token = token if token is not None else self.config.token
        return f"{url}?token={quote(token, safe='')}" if token is not None else url

    def mcp_url(self, project: str) -> str:
        """Where an MCP client reaches ``project``'s tools through this gateway."""
        return f"{self.http_url}/sleds/{quote(project, safe='')}/mcp"

    # -- state and decisions ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Snapshot: ``{"sleds": [...], "pending": [...], "decisions": [...], ...}``."""
        return self._state.snapshot()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Block until ``predicate(state())`` holds; ``TimeoutError`` otherwise."""
        return self._state.wait_for(predicate, timeout)

    def is_pending(self, project: str, req_id: str) -> bool:
        return self._state.is_pending(project, req_id)

    def pending(self) -> list[PendingPermission]:
        return self._state.pending_items()

    def decide(
        self,
        project: str,
        req_id: str,
        decision: Decision | str,
        *,
        by: str | Principal = "library",
        timeout: float = 5.0,
        input_sha256: str | None = None,
    ) -> DecisionRecord:
        """Answer a pending permission request from any thread.

        ``decision`` is ``"approve"``, ``"deny"`` or ``"always_allow"``; ``by`` is
        a :class:`~sled_gateway.principal.Principal`, or the label the audit log
        shows for this program. ``input_sha256``: the hash of the input that was
        shown (``protocol.input_sha256``); another input pending under the id is
        :class:`~sled_gateway.records.InputMismatch`. Raises ``ValueError`` for
        another word, :class:`~sled_gateway.state.UnknownRequest`,
        :class:`~sled_gateway.state.AlreadyDecided`,
        :class:`~sled_gateway.approvals.Forbidden`, or
        :class:`~sled_gateway.approvals.NotRecorded` if the audit row could not
        be committed (the request is then still pending). Under a quorum of the
        access file: :class:`~sled_gateway.approvals.VoteCounted` (counted, not
        decided yet) or :class:`~sled_gateway.approvals.VoteRefused` (cannot count).
        """
        choice = Decision(decision)
        if self._loop is None:
            raise RuntimeError("Gateway not started")
        future = asyncio.run_coroutine_threadsafe(
            self._app.approvals.decide(
                project, req_id, choice, as_principal(by), input_sha256=input_sha256
            ),
            self._loop,
        )
        return future.result(timeout)

    def add_pending_listener(self, callback: Callable[[PendingPermission], None]) -> None:
        """``callback(item)`` for each new pending request; runs on the gateway's loop thread."""
        self._app.add_pending_listener(callback)

    def add_decision_listener(self, callback: Callable[[DecisionRecord], None]) -> None:
        """``callback(record)`` after each decision and each withdrawn request (decision
        ``"withdrawn"``); runs on the gateway's loop thread."""
        self._app.add_decision_listener(callback)

    @property
    def events(self) -> Events:
        """The gateway's events (subscribe before starting; handlers run on its loop)."""
        return self._app.events

    async def decide_on_loop(
        self,
        project: str,
        req_id: str,
        decision: Decision | str,
        *,
        by: str | Principal,
        input_sha256: str | None = None,
    ) -> DecisionRecord:
        """:meth:`decide` for code already running on the gateway's loop (a transport).

        Same errors; awaiting it there instead of blocking on :meth:`decide` is
        what keeps the loop (and so the console and the API) running.
        """
        return await self._app.approvals.decide(
            project, req_id, Decision(decision), as_principal(by), input_sha256=input_sha256
        )

    def run_on_loop(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the gateway's event loop (e.g. a transport's main task)."""
        if self._loop is None:
            raise RuntimeError("Gateway not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- the durable store ----------------------------------------------------------

    def _in_loop(self, coro: Any, timeout: float) -> Any:
        if self._loop is None:
            raise RuntimeError("Gateway not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def audit(self, *, timeout: float = 5.0, **filters: Any) -> list[dict[str, Any]]:
        """Audit rows newest first, as ``GET /api/audit`` lists them (same filters)."""
        rows = self._in_loop(self.store.audit(**filters), timeout)
        return [r.to_json() for r in rows]

    def rules(self, *, include_revoked: bool = False, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Rules newest first, as ``GET /api/rules`` lists them."""
        rules = self._in_loop(self.store.rules(include_revoked=include_revoked), timeout)
        return [r.to_json() for r in rules]
