"""This process's sled sockets: admission, identity, frames, session replacement.

Each sled holds one WebSocket at ``/api/sled-uplink``. The hub admits it by
its token (:class:`~sled_gateway.auth.sled.SledTokenBackend`), waits for its
``identity`` (closing impostors and the silent), parses each frame (dropping
and counting the malformed), and then:

- hands each ``perm_request`` to :class:`~sled_gateway.approvals.Approvals`
  and sends the ``perm_response`` it decides (:meth:`Hub.answer`), and each
  ``perm_cancel`` (the sled decided a request itself) to
  :meth:`~sled_gateway.approvals.Approvals.cancel`;
- serves ``sled.<project>.mcp`` on the bus while it holds that sled, turning
  each request into an ``mcp_request`` frame and the sled's ``mcp_response``
  into the reply;
- publishes :class:`~sled_gateway.events.SledUp` / ``SledDown``.

A newer session for a project replaces the older one (which is closed).
:meth:`Hub.drain` closes every session, spread over a window, with ``1012``
and ``retry_after=<s>`` (SIGTERM), and turns new sleds away with ``1013``.
Everything runs on the gateway's event loop.

Frames are dispatched by kind through one table (:attr:`Hub.handlers`): a
new kind is a handler method and one line there (docs/extending.md).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from starlette.authentication import AuthenticationError
from starlette.websockets import WebSocket

from protocol import (
    Decision,
    Envelope,
    Identity,
    Kind,
    PermCancel,
    PermRequest,
    RemoteProtocolError,
    parse,
    perm_response,
    printable,
    serialize,
)
from sled_gateway.approvals import Approvals
from sled_gateway.auth import PrincipalUser
from sled_gateway.auth.sled import SledTokenBackend
from sled_gateway.bus import (
    NOT_SENT,
    SLED_GONE,
    STOPPING,
    Bus,
    Message,
    Responder,
    StopServing,
    sled_subject,
)
from sled_gateway.config import GatewayConfig
from sled_gateway.events import Events, FrameReceived, SledDown, SledHeartbeat, SledUp
from sled_gateway.http.errors import error
from sled_gateway.principal import Principal
from sled_gateway.state import GatewayState, SledState

log = logger.bind(actor="gateway")

#: How long a drain lets the MCP relays already sent on a session finish before closing it.
RELAY_GRACE_S = 2.0

# A frame handler: returns False when it dropped the frame (and counted it so).
Handler = Callable[["Session", Envelope], Awaitable[bool | None]]


class _Ended(Exception):
    """The session ended before the sled answered (``reason``: a bus error word)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False, slots=True)
class Session:
    """One WebSocket connection from a sled (slotted: one lives per connected sled)."""

    id: int
    ws: WebSocket
    remote: str
    # The only project this session may claim (its per-sled token's), or None
    # for the shared token / --no-auth, which may claim any unlisted project.
    allowed_project: str | None = None
    project: str | None = None
    identity_timer: asyncio.TimerHandle | None = None
    mcp_waiters: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stop_serving: StopServing | None = None  # the bus's stop for sled.<project>.mcp
    # A drain is about to close it: no new MCP relay is sent on it (see Hub.drain).
    closing: bool = False
    # Its sled has a newer session on another replica (see Hub.moved_away): that
    # replica's answers are the sled's, and none of this session's errors is sent.
    moved: bool = False

    def label(self) -> str:
        return f"{printable(self.project or '?', 120)}#{self.id}"

    async def send(self, envelope: Envelope) -> bool:
        """Send one frame; False (logged) if the socket is already gone."""
        text = serialize(envelope)
        try:
            async with self.send_lock:  # one frame at a time on the wire
                await self.ws.send_text(text)
        except Exception as exc:
            log.warning(
                "sled {}: could not send {} '{}': {}",
                self.label(),
                envelope.type,
                printable(envelope.req_id, 120),
                exc or type(exc).__name__,
            )
            return False
        return True

    def fail_waiters(self, reason: str) -> None:
        for fut in self.mcp_waiters.values():
            if not fut.done():
                fut.set_exception(_Ended(reason))
        self.mcp_waiters.clear()


class Hub:
    """The sled sessions of this process."""

    def __init__(
        self,
        config: GatewayConfig,
        state: GatewayState,
        *,
        events: Events,
        approvals: Approvals,
        bus: Bus,
        sled_auth: SledTokenBackend,
    ) -> None:
        self.config = config
        self.state = state
        self.events = events
        self.approvals = approvals
        self.bus = bus
        self.sled_auth = sled_auth
        self.sessions: dict[int, Session] = {}
        self.by_project: dict[str, Session] = {}  # identified, live sessions
        self._ids = itertools.count(1)
        self._background: set[asyncio.Future[None]] = set()
        self._stopping = False
        #: True once :meth:`drain` began: ``/readyz`` answers 503, new sleds get 1013.
        self.draining = False
        self._retry_after = 0
        approvals.answer_through(self)
        # The frame kinds a sled may send, each with its handler; anything else
        # (perm_response, mcp_request, kinds of later protocol phases) is
        # logged, counted and dropped. A new kind: a handler and one line here.
        self.handlers: dict[str, Handler] = {
            Kind.IDENTITY: self._on_identity,
            Kind.HEARTBEAT: self._on_heartbeat,
            Kind.PERM_REQUEST: self._on_perm_request,
            Kind.PERM_CANCEL: self._on_perm_cancel,
            Kind.MCP_RESPONSE: self._on_mcp_response,
        }

    # -- admission and the frame loop ---------------------------------------------

    async def _admit(self, ws: WebSocket) -> Principal | None:
        try:
            found = await self.sled_auth.authenticate(ws)
        except AuthenticationError:
            return None
        if found is None:
            return None
        user = found[1]
        assert isinstance(user, PrincipalUser)
        return user.principal

    async def uplink(self, ws: WebSocket) -> None:
        """The ``/api/sled-uplink`` WebSocket endpoint."""
        remote = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        sled = await self._admit(ws)
        if sled is None:
            why = "no token" if "token" not in ws.query_params else "a wrong token"
            log.warning("refused a sled from {} with {} (HTTP 401)", remote, why)
            await ws.send_denial_response(error(401, "unauthorized: missing or wrong token"))
            return
        if self._stopping:
            await ws.send_denial_response(error(503, "gateway is shutting down"))
            return
        await ws.accept()
        if self.draining:
            # Accepted only to say when to come back: the uplink reads the close
            # reason (a denial's Retry-After header never reaches its logic).
            log.info("refused a sled from {} while draining (1013)", remote)
            await ws.close(1013, f"retry_after={self._retry_after}")
            return
        session = Session(next(self._ids), ws, remote, allowed_project=sled.who or None)
        self.sessions[session.id] = session
        log.info("sled connected from {} (session {})", remote, session.id)
        session.identity_timer = asyncio.get_running_loop().call_later(
            self.config.identity_timeout, self._identity_overdue, session
        )
        close_code: int | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    close_code = message.get("code")
                    break
                text = message.get("text")
                if text is None:
                    self._drop(
                        session,
                        "binary",
                        f"binary message of {len(message.get('bytes') or b'')} bytes",
                    )
                    continue
                await self._on_text(session, text)
        finally:
            if session.identity_timer is not None:
                session.identity_timer.cancel()
            self._end(session, close_code)

    def _identity_overdue(self, session: Session) -> None:
        session.identity_timer = None
        if session.project is None and session.id in self.sessions:
            log.warning(
                "sled session {} from {}: no identity within {} s; closing (1008)",
                session.id,
                session.remote,
                self.config.identity_timeout,
            )
            self._close_soon(session, 1008, "no identity in time")

    def _close_soon(self, session: Session, code: int, reason: str) -> None:
        task = asyncio.ensure_future(self._close(session, code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close(self, session: Session, code: int, reason: str) -> None:
        try:
            await session.ws.close(code, reason)
        except Exception as exc:
            log.debug("closing session {}: {}", session.id, exc)

    def _drop(self, session: Session, reason: str, detail: str) -> None:
        log.warning(
            "sled {}: dropped a frame ({}): {}", session.label(), reason, printable(detail, 300)
        )
        self.events.publish(FrameReceived(session.id, session.project, dropped=True))

    async def _on_text(self, session: Session, text: str) -> None:
        try:
            env = parse(text)
        except RemoteProtocolError as exc:
            self._drop(session, exc.reason, exc.detail)
            return
        if session.project is None and env.type != Kind.IDENTITY:
            self._drop(session, "before_identity", f"{env.type!r} frame before identity")
            if env.type == Kind.PERM_REQUEST:
                # Fail fast rather than let the sled wait out its permission timeout.
                await self._refuse(session, env, "?", "perm_request before identity")
            return
        handler = self.handlers.get(env.type)
        if handler is None:
            # Unknown kinds are how later protocol phases arrive: log, count, drop.
            self._drop(
                session, "unexpected_type", f"type {env.type[:80]!r} (req_id {env.req_id[:80]!r})"
            )
            return
        if await handler(session, env) is not False:
            # Counted once handled: after an identity, the sled's record exists.
            self.events.publish(FrameReceived(session.id, session.project, dropped=False))

    async def _on_heartbeat(self, session: Session, env: Envelope) -> None:
        project = session.project or ""
        before = self.state.sled_state(session.id, project)
        self.events.publish(SledHeartbeat(session.id, project))
        if before is SledState.STALE:
            log.info("sled {} is live again (heartbeat)", session.label())
        else:
            log.trace("sled {} heartbeat", session.label())

    async def _on_identity(self, session: Session, env: Envelope) -> None:
        try:
            identity = Identity.from_payload(env.payload)
        except RemoteProtocolError:
            log.warning("sled from {}: identity without a project name; closing", session.remote)
            await session.ws.close(1008, "identity needs a project name")
            return
        project, info = identity.project, identity.info
        if session.project is not None:
            log.warning("sled {}: second identity frame ignored", session.label())
            return
        claimed_by_token = project in self.sled_auth.projects
        if session.allowed_project != project and (
            session.allowed_project is not None or claimed_by_token
        ):
            # An impostor (or a misconfigured sled): its token is not this
            # project's. The real sled's session, if any, is not touched.
            holder = (
                f"the token of project '{printable(session.allowed_project, 120)}'"
                if session.allowed_project is not None
                else "the shared token"
            )
            log.warning(
                "sled session {} from {} presented {} but claimed project '{}'; closing (1008)",
                session.id,
                session.remote,
                holder,
                printable(project, 120),
            )
            await session.ws.close(1008, "this token does not admit that project")
            return
        if session.identity_timer is not None:
            session.identity_timer.cancel()
            session.identity_timer = None
        session.project = project
        old = self.by_project.get(project)
        self.by_project[project] = session
        session.stop_serving = self.bus.serve(
            sled_subject(project, "mcp"), self._mcp_responder(session)
        )
        self.events.publish(SledUp(session.id, project, session.remote, info))
        log.info(
            "sled '{}' identified (session {}, from {}, {})",
            printable(project, 120),
            session.id,
            session.remote,
            printable(info, 500) if info else "no extra info",
        )
        if old is not None and old is not session:
            # Usually a restarted sled whose old connection is half-open. If two
            # sleds share a name they will keep replacing each other: logged loudly.
            log.warning(
                "sled '{}': session {} replaces session {}; closing the old one",
                printable(project, 120),
                session.id,
                old.id,
            )
            try:
                await old.ws.close(4000, "replaced by a newer session for this project")
            except Exception as exc:
                log.debug("closing replaced session {}: {}", old.id, exc)

    async def _on_perm_request(self, session: Session, env: Envelope) -> None:
        project = session.project
        assert project is not None
        try:
            request = PermRequest.from_envelope(env)
        except RemoteProtocolError as exc:
            log.warning(
                "sled {}: perm_request '{}' denied: {}",
                session.label(),
                printable(env.req_id, 120),
                printable(exc.detail, 200),
            )
            await self._refuse(session, env, "?", "perm_request without a tool_name")
            return
        await self.approvals.request(
            session.id,
            project,
            env.req_id,
            request.tool_name,
            request.tool_input,
            suggestions=request.suggestions,
        )

    async def _on_perm_cancel(self, session: Session, env: Envelope) -> bool:
        """The sled decided one of its requests itself: withdraw it from the people."""
        project = session.project
        assert project is not None
        try:
            cancel = PermCancel.from_payload(env.payload)
        except RemoteProtocolError as exc:
            self._drop(session, exc.reason, exc.detail)
            return False
        if not self.approvals.cancel(session.id, project, env.req_id, cancel.reason):
            self._drop(
                session,
                "unknown_cancel",
                f"perm_cancel for '{env.req_id[:120]}', not pending from this session",
            )
            return False
        return True

    async def _refuse(self, session: Session, env: Envelope, tool: str, why: str) -> None:
        """Deny a malformed or premature request (audited as ``invalid``)."""
        payload = env.payload if isinstance(env.payload, dict) else {}
        tool_name = payload.get("tool_name")
        await self.approvals.deny_by_gateway(
            session.id,
            session.project,
            env.req_id,
            tool_name=tool_name if isinstance(tool_name, str) and tool_name else tool,
            tool_input=payload.get("tool_input"),
            why=why,
            principal=Principal.gateway("invalid"),
        )

    async def _on_mcp_response(self, session: Session, env: Envelope) -> None:
        fut = session.mcp_waiters.pop(env.req_id, None)
        if fut is None or fut.done():
            log.warning(
                "sled {}: mcp_response for unknown or expired req_id '{}'; dropped",
                session.label(),
                printable(env.req_id, 80),
            )
            return
        fut.set_result(env.payload)

    def _end(self, session: Session, close_code: int | None) -> None:
        self.sessions.pop(session.id, None)
        if session.stop_serving is not None:
            session.stop_serving()
        if session.project is not None and self.by_project.get(session.project) is session:
            del self.by_project[session.project]
        session.fail_waiters(STOPPING if self._stopping else SLED_GONE)
        withdrawn = self.approvals.withdraw(session.id, close_code)
        self.events.publish(
            SledDown(session.id, session.project, close_code, by_gateway=self._stopping)
        )
        log.info(
            "sled {} disconnected (code {}){}",
            session.label(),
            close_code,
            f"; withdrew {len(withdrawn)} pending permission request(s)" if withdrawn else "",
        )

    # -- what the rest of the gateway asks of a session ----------------------------

    async def answer(self, session: int, req_id: str, decision: Decision) -> bool:
        """Send ``perm_response``; False if that session is gone or the send failed."""
        held = self.sessions.get(session)
        if held is None:
            return False
        return await held.send(perm_response(req_id, decision))

    def serving(self, project: str, session_id: int) -> Session | None:
        """Session ``session_id`` if it is ``project``'s live one here and has not been
        let go of for a newer one elsewhere (:meth:`moved_away`). A dict read: safe from
        another thread (the store's writer asks it)."""
        session = self.by_project.get(project)
        if session is None or session.id != session_id or session.moved:
            return None
        return session

    def moved_away(self, project: str, session_id: int, replica: str) -> None:
        """``replica`` holds ``project``'s sled in a session newer than this process's
        session ``session_id`` of it (:class:`~sled_gateway.replicas.Replicas` knows):
        the sled reconnected there, and the session here is half-open (or a second
        sled of that name, as on one process). It is closed (4000), as a newer session
        here would close it; first it stops serving, quietly. Every replica serving the
        sled gets each MCP relay and the requester takes the first reply, so an error
        from here ("not sent": retry; "gone": it may have run) would beat the real
        answer."""
        session = self.serving(project, session_id)
        if session is None:
            return
        session.moved = True
        if session.stop_serving is not None:
            session.stop_serving(quiet=True)
        log.warning(
            "sled '{}': a newer session on replica {}; closing session {} here",
            printable(project, 120),
            printable(replica, 120),
            session.id,
        )
        self._close_soon(session, 4000, "replaced by a newer session for this project")

    def _mcp_responder(self, session: Session) -> Responder:
        async def respond(message: Message) -> Message | None:
            if session.moved:
                return None  # nothing sent: the sled's new holder answers
            answer = await self._relay_mcp(session, message)
            # Moved meanwhile: an error from here could beat the new holder's real answer,
            # on a bus that gave it the request too (one that reaches no other replica
            # did not, and this error is then the truth: it may have been sent).
            if session.moved and "error" in answer and self.bus.connected:
                return None
            return answer

        return respond

    async def _relay_mcp(self, session: Session, message: Message) -> Message:
        if session.closing:  # not sent: its sled is about to move to another replica
            return {"error": STOPPING}
        req_id = f"mcp-{uuid.uuid4().hex}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session.mcp_waiters[req_id] = fut
        log.debug(
            "relaying MCP request {} ({} characters) to sled {}",
            req_id,
            len(message["body"]),
            session.label(),
        )
        if not await session.send(Envelope(Kind.MCP_REQUEST, req_id, {"body": message["body"]})):
            session.mcp_waiters.pop(req_id, None)
            return {"error": NOT_SENT}
        try:
            return {"payload": await fut}
        except _Ended as exc:
            return {"error": exc.reason}
        finally:
            # Answered, failed or abandoned (the requester's deadline): an
            # answer arriving later is dropped as unknown.
            session.mcp_waiters.pop(req_id, None)

    @property
    def sled_count(self) -> int:
        return len(self.by_project)

    # -- background work and shutdown ---------------------------------------------

    async def monitor(self) -> None:
        """Announce state changes that only time causes (a sled going stale)."""
        tick = min(self.config.heartbeat_interval / 4, 1.0)
        while True:
            await asyncio.sleep(tick)
            for rec, new in self.state.refresh():
                if new is SledState.STALE:
                    log.warning(
                        "sled '{}' is stale: no heartbeat for {:.1f} s",
                        printable(rec.project, 120),
                        self.state.stale_after,
                    )
            for project in self.state.forget_disconnected(self.config.forget_disconnected_after):
                log.info(
                    "forgot sled '{}': disconnected more than {} s ago",
                    printable(project, 120),
                    self.config.forget_disconnected_after,
                )

    async def drain(self, seconds: float, retry_after: int) -> None:
        """Close every sled session with ``1012`` and ``retry_after=<retry_after>``, the
        i-th of n at ``i * seconds / n``, so their reconnects do not land at once.

        From the start, ``/readyz`` answers 503 and a new sled is closed with
        ``1013`` and the same reason. A closed session ends as any disconnect
        does: its sled denies what it had pending and the gateway withdraws it.
        Returns once the sessions ended (or a few seconds after the last close).
        """
        self.draining = True
        self._retry_after = retry_after
        loop = asyncio.get_running_loop()
        sessions = list(self.sessions.values())
        log.info(
            "draining: closing {} sled session(s) over {:g} s (1012, retry_after={})",
            len(sessions),
            seconds,
            retry_after,
        )
        began = loop.time()
        reason = f"retry_after={retry_after}"
        for i, session in enumerate(sessions):
            delay = began + seconds * i / len(sessions) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if session.id in self.sessions:
                # Relays already sent get their answers first; a relay answered 502 after
                # its sled ran the call would invite a retry that runs it twice.
                session.closing = True
                await self._relays_answered(session, RELAY_GRACE_S)
                await self._close(session, 1012, reason)
        deadline = loop.time() + 3.0
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained ({} session(s) still open)", len(self.sessions))

    @staticmethod
    async def _relays_answered(session: Session, timeout: float) -> None:
        waiting = [fut for fut in session.mcp_waiters.values() if not fut.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    async def shutdown(self) -> None:
        """Abandon relays (503) and close every sled session with 1001 (going away)."""
        self._stopping = True
        for session in list(self.sessions.values()):
            session.fail_waiters(STOPPING)
            try:
                await session.ws.close(1001, "gateway shutting down")
            except Exception as exc:
                log.debug("closing session {}: {}", session.id, exc)
