"""The library API: build, start, use and stop one uplink (docs/library.md).

::

    from actors import Uplink, UplinkConfig

    with Uplink(UplinkConfig(upstream_url="ws://gw/api/sled-uplink?token=…",
                             project="my-sled")) as uplink:
        outcome = uplink.decide("Bash", {"command": "rm -rf build"}, timeout=130)
        if outcome.decision.allows: ...
        print(uplink.status()["connection"]["state"])

    async with Uplink(config) as uplink:   # in an asyncio application: its own loop
        outcome = await uplink.adecide("Bash", {"command": "ls"})

Actors start dependencies first and stop in reverse, in a ``finally``, so that
nothing outlives the uplink; an actor still alive after that is waited for,
then logged as a bug.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import anyio.to_thread
import pykka
from loguru import logger

from actors.base import UplinkActor
from actors.config import UplinkConfig
from actors.context import Role, UplinkContext
from actors.heartbeat import HeartbeatActor
from actors.loop import EventLoop
from actors.mcp_proxy import McpProxyActor
from actors.messages import (
    Abandon,
    DenyAll,
    GetSnapshot,
    Reconnect,
    Settable,
    Shutdown,
    Start,
    Submit,
)
from actors.permissions import PermissionRegistryActor, new_request_id
from actors.router import RouterActor
from actors.status import snapshot
from actors.supervisor import SupervisorActor
from protocol import JSON, Decision, Kind, Outcome, PermRequest, Reason, redact, serialize
from protocol.frames import read_suggestions
from protocol.urls import plain_text_token_host

# The handler table: envelope kind → the actor class that handles it. It is
# the only list of session users: each class in it is started (in this
# order, then the heartbeat), is routed its kind, and is told SessionOpened /
# SessionClosed. A new kind is one actor class plus one entry, here or in
# ``Uplink(handlers=…)``, which replaces the default for a kind it names.
DEFAULT_HANDLERS: dict[str, type[UplinkActor]] = {
    Kind.PERM_RESPONSE: PermissionRegistryActor,
    Kind.MCP_REQUEST: McpProxyActor,
}

_log = logger.bind(actor="system")


class Uplink:
    """One running uplink: its actors, its event loop and (optionally) its ingress."""

    def __init__(
        self,
        config: UplinkConfig,
        *,
        handlers: Mapping[str, type[UplinkActor]] | None = None,
    ) -> None:
        self.config = config.validate()
        self._handlers = {**DEFAULT_HANDLERS, **(handlers or {})}
        # Requests go to whichever actor decides the perm_response kind.
        self._registry = self._handlers[Kind.PERM_RESPONSE].role
        roles = [c.role for c in session_users(self._handlers)]
        if len(set(roles)) != len(roles):
            raise ValueError(f"two handler classes share a role: {roles}")
        self._ctx: UplinkContext | None = None
        self._started: list[str] = []
        self._ingress: Any = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False

    # ── lifecycle ───────────────────────────────────────────────────────

    def start(self) -> Uplink:
        """Start the actors, with the uplink's event loop in a helper thread."""
        self._claim()
        self._bring_up(UplinkContext(self.config, EventLoop()))
        return self

    async def astart(self) -> Uplink:
        """Start inside the running asyncio loop, which becomes the uplink's I/O loop.

        Then :meth:`adecide` reaches the socket without crossing a thread.
        The actors' own threads start in a worker thread, so the loop keeps
        running meanwhile. Stop it with :meth:`astop` (``async with`` does both).
        """
        self._claim()
        ctx = UplinkContext(self.config, await EventLoop.adopt())
        try:
            await anyio.to_thread.run_sync(self._bring_up, ctx)
        finally:
            if self._stopped.is_set():  # it failed, and _bring_up stopped it
                await ctx.loop.aclose()
        return self

    def _claim(self) -> None:
        with self._lock:
            if self._claimed:
                raise RuntimeError("this Uplink was already started")
            self._claimed = True

    def _bring_up(self, ctx: UplinkContext) -> None:
        self._ctx = ctx
        # Said once, before the first connect sends it.
        for url in self.config.gateway_urls:
            exposed = plain_text_token_host(url)
            if exposed is not None:
                _log.warning(
                    "the gateway token travels unencrypted over ws:// to {!r}, which is not "
                    "loopback: anyone on the path can read it; use wss://",
                    exposed,
                )
        try:
            self._start_actors(ctx)
            if self.config.listen_address is not None:
                from actors.ingress import Ingress  # optional edge; imports uvicorn

                self._ingress = Ingress(
                    ctx,
                    request_permission=self.arequest_permission,
                    abandon=self.abandon,
                    # Looked up on each call, like a method call on the uplink.
                    status=lambda: self.status(),  # noqa: PLW0108
                )
                self._ingress.start()
            supervisor = ctx.directory.get(Role.SUPERVISOR)
            assert supervisor is not None
            supervisor.tell(Start())
            supervisor.ask(GetSnapshot(), timeout=5)  # mailboxes are FIFO: Start is handled
        except BaseException:
            self.stop()
            raise
        _log.info(
            "uplink started for project {!r} (gateway {})",
            self.config.project,
            "disabled"
            if not self.config.enabled
            else ", ".join(redact(url) for url in self.config.gateway_urls),
        )

    def _start_actors(self, ctx: UplinkContext) -> None:
        users = session_users(self._handlers)
        ctx.routes.update({kind: c.role for kind, c in self._handlers.items()})
        ctx.session_listeners.extend(c.role for c in users)
        classes: list[type[UplinkActor]] = [*users, RouterActor, SupervisorActor]
        for actor_class in classes:
            ctx.factories[actor_class.role] = _factory(actor_class, ctx)
            ref = ctx.factories[actor_class.role]()
            ctx.directory.set(actor_class.role, ref)
            self._started.append(actor_class.role)
            # Dependencies first, each proven alive before the next starts.
            ref.ask(GetSnapshot(), timeout=5)

    def stop(self, timeout: float = 5.0, *, close_code: int = 1001) -> None:
        """Deny everything undecided, close the session, stop every actor."""
        ctx = self._ctx
        if ctx is None or self._stopped.is_set():
            return
        self._refuse_in_loop("stop()", "await astop()")
        self._stopped.set()
        deadline = time.monotonic() + timeout
        directory, loop = ctx.directory, ctx.loop
        try:
            # 1. Fail closed first, so callers hear "shutdown", not "session ended".
            denial = DenyAll(Reason.SHUTDOWN, close=True)
            if directory.tell(self._registry, denial):
                _wait(denial.done, deadline, share=0.3)
            # 2. Close the WebSocket with 1001 (going away).
            closing = Shutdown(close_code)
            if directory.tell(Role.SUPERVISOR, closing):
                _wait(closing.done, deadline, share=0.5)
            # 3. Let waiting HTTP callers get their answers, then stop listening.
            if self._ingress is not None:
                self._ingress.stop(timeout=max(0.5, (deadline - time.monotonic()) / 2))
        finally:
            # 4. Actors in reverse start order, then anything left over.
            for role in [Role.CONNECTION, *reversed(self._started)]:
                ref = directory.get(role)
                if ref is not None:
                    with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                        ref.stop(timeout=max(0.2, deadline - time.monotonic()))
                    directory.set(role, None)
            for ref in list(ctx.live):
                # A session's connection actor may still be finishing the stop
                # its supervisor asked for (without waiting): wait for it too.
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    ref.stop(timeout=max(0.2, deadline - time.monotonic()))
                if ref.is_alive():
                    _log.error("bug: {} was still running after shutdown", ref)
            loop.close()
            _log.info("uplink stopped")

    async def astop(self, timeout: float = 5.0, *, close_code: int = 1001) -> None:
        """:meth:`stop` for an uplink started with :meth:`astart`, awaited in its loop."""
        ctx = self._ctx
        if ctx is None:
            return
        await anyio.to_thread.run_sync(partial(self.stop, timeout, close_code=close_code))
        if ctx.loop.adopted:
            await ctx.loop.aclose()

    def __enter__(self) -> Uplink:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def __aenter__(self) -> Uplink:
        return await self.astart()

    async def __aexit__(self, *_: object) -> None:
        await self.astop()

    # ── using it ────────────────────────────────────────────────────────

    def request_permission(
        self,
        tool_name: str,
        tool_input: JSON = None,
        *,
        request_id: str | None = None,
        suggestions: Iterable[str] = (),
    ) -> concurrent.futures.Future[Outcome]:
        """Submit a permission request; the future resolves with its one :class:`Outcome`.

        ``suggestions``: rule texts the agent suggests for "always allow" (Claude
        Code's ``permission_suggestions``), sent along for the gateway to offer.
        """
        future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        self._submit(tool_name, tool_input, request_id or new_request_id(), future, suggestions)
        return future

    def arequest_permission(
        self,
        tool_name: str,
        tool_input: JSON = None,
        *,
        request_id: str | None = None,
        suggestions: Iterable[str] = (),
    ) -> asyncio.Future[Outcome]:
        """:meth:`request_permission` for asyncio code: an asyncio future of the running loop.

        In the uplink's own loop (after :meth:`astart`) the registry settles
        the future directly; from any other loop the answer crosses threads
        once. Cancelling the future abandons the wait, not the request: it
        is still decided and logged.
        """
        ctx = self._ctx
        # In the uplink's loop thread while its loop runs, that loop is the running
        # one (a thread runs one loop at a time): no get_running_loop, a getpid each.
        if ctx is not None and ctx.loop.in_loop_thread() and ctx.loop.loop.is_running():
            loop = ctx.loop.loop
        else:
            loop = asyncio.get_running_loop()
        request_id = request_id or new_request_id()
        if ctx is not None and ctx.loop.loop is loop:
            future: asyncio.Future[Outcome] = loop.create_future()
            self._submit(tool_name, tool_input, request_id, future, suggestions)
            return future
        return asyncio.wrap_future(
            self.request_permission(
                tool_name, tool_input, request_id=request_id, suggestions=suggestions
            ),
            loop=loop,
        )

    def _submit(
        self,
        tool_name: str,
        tool_input: JSON,
        request_id: str,
        future: Settable[Outcome],
        suggestions: Iterable[str] = (),
    ) -> None:
        tool_input = {} if tool_input is None else tool_input
        # The frame's own bounds, so what is sent is what a gateway reads back.
        hints = (
            read_suggestions([suggestions] if isinstance(suggestions, str) else list(suggestions))
            if suggestions  # the usual (): none to read
            else ()
        )
        # Raises LocalProtocolError (a ValueError-like caller bug) for what the
        # wire cannot carry, before anything is queued.
        frame_text = serialize(PermRequest(tool_name, tool_input, hints).envelope(request_id))
        submitted = Submit(request_id, tool_name, tool_input, future, time.monotonic(), frame_text)
        if not self.config.enabled:
            future.set_result(Outcome(request_id, Decision.DENY, Reason.DISABLED))
        elif self._ctx is None or self._stopped.is_set():
            future.set_result(Outcome(request_id, Decision.DENY, Reason.SHUTDOWN))
        elif not self._ctx.directory.tell(self._registry, submitted):
            # The registry died and its restart is on the way: fail closed, and say so.
            future.set_result(Outcome(request_id, Decision.DENY, Reason.CRASH))

    def abandon(self, request_id: str) -> None:
        """The caller of ``request_id`` went away: deny it now (``caller_gone``).

        If it was sent, the gateway is told (``perm_cancel``) and withdraws it.
        A request already decided, or never submitted, is left alone.
        """
        if self._ctx is not None and not self._stopped.is_set():
            self._ctx.directory.tell(self._registry, Abandon(request_id))

    def decide(
        self,
        tool_name: str,
        tool_input: JSON = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        """Blocking :meth:`request_permission`. The wait defaults to the permission
        timeout plus a margin; a caller that gives up earlier gets a deny."""
        self._refuse_in_loop("decide()", "await adecide()")
        request_id = request_id or new_request_id()
        future = self.request_permission(tool_name, tool_input, request_id=request_id)
        try:
            return future.result(timeout=self._wait_for(timeout))
        except concurrent.futures.TimeoutError:
            return Outcome(request_id, Decision.DENY, Reason.TIMEOUT)

    async def adecide(
        self,
        tool_name: str,
        tool_input: JSON = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        """:meth:`decide` for asyncio code; a caller that gives up earlier gets a deny."""
        request_id = request_id or new_request_id()
        future = self.arequest_permission(tool_name, tool_input, request_id=request_id)
        try:
            async with asyncio.timeout(self._wait_for(timeout)):
                return await future
        except TimeoutError:
            return Outcome(request_id, Decision.DENY, Reason.TIMEOUT)

    def _refuse_in_loop(self, call: str, instead: str) -> None:
        """A blocking call from the uplink's own loop would wait on itself."""
        if self._ctx is not None and self._ctx.loop.in_loop_thread():
            raise RuntimeError(
                f"{call} would block the event loop the uplink runs on; use {instead}"
            )

    def _wait_for(self, timeout: float | None) -> float:
        return self.config.permission_timeout + 5 if timeout is None else timeout

    def status(self) -> dict[str, Any]:
        """The actor-state snapshot that the logs and ``/status`` show."""
        if self._ctx is None:
            return {"connection": {"state": "stopped"}, "permissions": {"pending": 0}}
        return snapshot(self._ctx)

    def reconnect(self) -> None:
        """End a back-off wait now (what SIGHUP does)."""
        if self._ctx is not None:
            self._ctx.directory.tell(Role.SUPERVISOR, Reconnect())

    def wait_connected(self, timeout: float) -> bool:
        """Wait until a session is up and identified (for tests and scripts)."""
        self._refuse_in_loop("wait_connected()", "await await_connected()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected():
                return True
            time.sleep(0.01)
        return False

    async def await_connected(self, timeout: float) -> bool:
        """:meth:`wait_connected` for asyncio code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected():
                return True
            await asyncio.sleep(0.01)
        return False

    def _connected(self) -> bool:
        return bool(self.status()["connection"].get("state") == "connected")

    @property
    def context(self) -> UplinkContext:
        if self._ctx is None:
            raise RuntimeError("the Uplink is not started")
        return self._ctx


def session_users(handlers: Mapping[str, type[UplinkActor]]) -> list[type[UplinkActor]]:
    """The actors a handler table starts, in order: each handler class once, then
    the heartbeat. All of them are told when a session opens and closes."""
    users: list[type[UplinkActor]] = []
    candidates: list[type[UplinkActor]] = [*handlers.values(), HeartbeatActor]
    for actor_class in candidates:
        if actor_class not in users:
            users.append(actor_class)
    return users


def _factory(
    actor_class: type[UplinkActor], ctx: UplinkContext
) -> Callable[[], pykka.ActorRef[Any]]:
    return lambda: actor_class.start(ctx)


def _wait(future: concurrent.futures.Future[Any], deadline: float, *, share: float) -> None:
    budget = max(0.05, (deadline - time.monotonic()) * share)
    with contextlib.suppress(concurrent.futures.TimeoutError):
        future.result(timeout=budget)
