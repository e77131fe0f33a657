"""The :class:`Gateway`: the reference gateway, run on its own thread.

It binds its socket in the caller's thread (so "port in use" is an ordinary
``OSError`` there, and port 0 resolves at once), then serves with uvicorn on
a private event loop in a background thread. Tests and ``run_gateway.py``
talk to it through thread-safe methods; anything that must touch a session
crosses into the loop with ``run_coroutine_threadsafe``.

::

    with Gateway(token="s3cret", auto="approve") as gw:
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
import os
import secrets
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import uvicorn
from loguru import logger

from protocol import Decision
from sled_gateway.app import GatewayApp
from sled_gateway.config import MAX_FRAME, GatewayConfig
from sled_gateway.httpserver import guarded_protocol
from sled_gateway.logs import protect_uvicorn_loggers
from sled_gateway.state import DecisionRecord, GatewayState, PendingPermission
from sled_gateway.store import MEMORY, make_store

log = logger.bind(actor="gateway")
T = TypeVar("T")


class _Server(uvicorn.Server):
    """uvicorn.Server that tells us when it is listening."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()


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


class Gateway:
    """The reference sled gateway, usable from tests in a background thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        auto: Decision | str | None = None,
        heartbeat_interval: float = 10.0,
        mcp_timeout: float = 30.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        operator_token: str | None = None,
        allowed_hosts: Sequence[str] | None = None,
        sled_tokens: Mapping[str, str] | None = None,
        max_relays_per_sled: int = 8,
        max_pending_per_sled: int = 1000,
        forget_disconnected_after: float = 3600.0,
        identity_timeout: float = 10.0,
        header_timeout: float = 10.0,
        max_connections: int = 200,
        db: str | os.PathLike[str] = MEMORY,
        audit_retention_days: float | None = None,
    ) -> None:
        """``token``: the one shared sled token (demos); ``sled_tokens``: project → its token.

        ``operator_token`` opens the console and the API (generated if None);
        ``allowed_hosts`` are Host names served besides the loopback names and
        ``host``. The other limits are described in ``run_gateway.py --help``.
        """
        self.config = GatewayConfig(
            operator_token=(
                operator_token if operator_token is not None else secrets.token_urlsafe(24)
            ),
            token=token,
            sled_tokens=dict(sled_tokens or {}),
            allowed_hosts=tuple(allowed_hosts or ()),
            auto=Decision(auto) if auto is not None else None,
            heartbeat_interval=heartbeat_interval,
            mcp_timeout=mcp_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_relays_per_sled=max_relays_per_sled,
            max_pending_per_sled=max_pending_per_sled,
            forget_disconnected_after=forget_disconnected_after,
            identity_timeout=identity_timeout,
            header_timeout=header_timeout,
            max_connections=max_connections,
        )
        self.host = host
        self._requested_port = port
        self._state = GatewayState(self.config.heartbeat_interval)
        # Opened in start(), on the caller's thread, so a bad file is an error there.
        self.store = make_store(db, retention_days=audit_retention_days)
        self._app = GatewayApp(self.config, self._state, listen_host=host, store=self.store)
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Gateway:
        """Bind and serve; returns once listening. ``OSError`` if the address is taken."""
        if self._thread is not None:
            raise RuntimeError("Gateway already started")
        protect_uvicorn_loggers()
        self._sock = _bind(self.host, self._requested_port)
        try:
            self.store.open()
        except BaseException:
            self._sock.close()
            self._sock = None
            raise
        self._port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="sled-gateway", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        log.info("gateway listening on {}", self.http_url)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            log.opt(exception=exc).error("gateway loop crashed")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = uvicorn.Config(
            self._app.asgi,
            lifespan="off",
            log_config=None,  # the embedding program owns logging
            access_log=False,  # access lines carry ?token=
            # A header-read deadline and an evicting connection cap on top of
            # uvicorn's h11 protocol (uvicorn has neither).
            http=guarded_protocol(
                header_timeout=self.config.header_timeout,
                max_connections=self.config.max_connections,
            ),
            timeout_keep_alive=5,
            ws="websockets-sansio",  # the websockets library's ServerProtocol
            ws_max_size=MAX_FRAME,
            ws_ping_interval=self.config.ping_interval,
            ws_ping_timeout=self.config.ping_timeout,
            timeout_graceful_shutdown=3,
            server_header=False,
        )
        self._server = _Server(config, on_started=self._started.set)
        monitor = asyncio.create_task(self._app.monitor())
        try:
            assert self._sock is not None
            await self._server.serve(sockets=[self._sock])
        finally:
            monitor.cancel()

    def stop(self, timeout: float = 5.0) -> None:
        """Close sled sessions (1001), stop serving, join the thread. Idempotent."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._app.shutdown(), loop).result(timeout / 2)
            except Exception as exc:
                log.warning("gateway shutdown step failed: {!r}", exc)
        if server is not None:
            server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("gateway thread did not stop within {} s", timeout)
        if self._sock is not None:
            self._sock.close()
        self.store.close()  # after the loop: the sessions' last audit rows are queued by then
        log.info("gateway stopped")

    def __enter__(self) -> Gateway:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

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
        by: str = "library",
        timeout: float = 5.0,
    ) -> DecisionRecord:
        """Answer a pending permission request from any thread.

        ``decision`` is ``"approve"``, ``"deny"`` or ``"always_allow"``. Raises
        ``ValueError`` for another word, :class:`~sled_gateway.state.UnknownRequest`
        or :class:`~sled_gateway.state.AlreadyDecided`; :class:`~sled_gateway.app.NotRecorded`
        if the audit row could not be committed (the sled was then sent a deny).
        """
        choice = Decision(decision)
        if self._loop is None:
            raise RuntimeError("Gateway not started")
        future = asyncio.run_coroutine_threadsafe(
            self._app.decide(project, req_id, choice, by), self._loop
        )
        return future.result(timeout)

    def add_pending_listener(self, callback: Callable[[PendingPermission], None]) -> None:
        """``callback(item)`` for each new pending request; runs on the gateway's loop thread."""
        self._app.add_pending_listener(callback)

    def add_decision_listener(self, callback: Callable[[DecisionRecord], None]) -> None:
        """``callback(record)`` after each decision and each withdrawn request (decision
        ``"withdrawn"``); runs on the gateway's loop thread."""
        self._app.add_decision_listener(callback)

    async def decide_on_loop(
        self, project: str, req_id: str, decision: Decision | str, *, by: str
    ) -> DecisionRecord:
        """:meth:`decide` for code already running on the gateway's loop (a transport).

        Same errors; awaiting it there instead of blocking on :meth:`decide` is
        what keeps the loop (and so the console and the API) running.
        """
        return await self._app.decide(project, req_id, Decision(decision), by)

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
