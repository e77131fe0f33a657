"""The gateway's web application: the sled uplink WebSocket, the REST API, the MCP relay.

One ASGI app (Starlette) serves everything on one port:

==============================  =========================================================
``/api/sled-uplink`` (WS)       sleds connect here; ``?token=`` checked before the upgrade
``GET /``                       the web console (``gateway/static/console.html``)
``GET /api/state``              sleds, pending permission requests, recent decisions
``POST /api/permissions/{project}/{req_id}``   ``{"decision": "approve"|"deny"|"always_allow"}``
``POST /sleds/{project}/mcp``   JSON-RPC relayed to that sled as ``mcp_request``
``GET /healthz``                liveness
==============================  =========================================================

Why ASGI and not ``websockets.asyncio.server.serve``: websockets' HTTP parser
refuses requests with a body ("unsupported request body"), so the REST and
MCP POSTs cannot share its port. uvicorn runs the WebSocket side on the
websockets library's own sans-I/O ``ServerProtocol`` (``ws="websockets-sansio"``),
and the ASGI *denial response* extension lets us answer a bad token with a
real HTTP 401 before the upgrade.

Everything here runs on one event loop; :class:`gateway.state.GatewayState`
is the only thing other threads touch.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from loguru import logger
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.config import GatewayConfig
from gateway.state import (
    AlreadyDecided,
    DecisionRecord,
    GatewayState,
    PendingPermission,
    SledState,
    UnknownRequest,
)
from protocol import (
    Decision,
    Envelope,
    Kind,
    RemoteProtocolError,
    dumps,
    parse,
    serialize,
)

log = logger.bind(actor="gateway")

#: The ``perm_response`` payload for each decision (PROTOCOL.md §1).
RESPONSE_PAYLOADS: dict[Decision, dict[str, bool]] = {
    Decision.APPROVE: {"approved": True, "always_allow": False},
    Decision.ALWAYS_ALLOW: {"approved": True, "always_allow": True},
    Decision.DENY: {"approved": False, "always_allow": False},
}

_MAX_DECISION_BODY = 64 * 1024
# Frame kinds a sled may send; anything else (perm_response, mcp_request,
# future kinds) is logged, counted and dropped.
_HANDLED = frozenset({Kind.IDENTITY, Kind.HEARTBEAT, Kind.PERM_REQUEST, Kind.MCP_RESPONSE})


class SledGone(Exception):
    """The sled's session ended before it answered an ``mcp_request``."""


class GatewayStopping(Exception):
    """The gateway is shutting down; in-flight relays are abandoned."""


class BodyTooLarge(Exception):
    pass


@dataclass(eq=False)
class Session:
    """One WebSocket connection from a sled."""

    id: int
    ws: WebSocket
    remote: str
    project: str | None = None
    mcp_waiters: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def label(self) -> str:
        return f"{self.project or '?'}#{self.id}"

    async def send(self, envelope: Envelope) -> bool:
        """Send one frame; False (logged) if the socket is already gone."""
        text = serialize(envelope)
        try:
            async with self.send_lock:  # one frame at a time on the wire
                await self.ws.send_text(text)
        except Exception as exc:
            log.warning(
                "sled {}: could not send {} {!r}: {}",
                self.label(),
                envelope.type,
                envelope.req_id,
                exc or type(exc).__name__,
            )
            return False
        return True

    def fail_waiters(self, exc: Exception) -> None:
        for fut in self.mcp_waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self.mcp_waiters.clear()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _load_console() -> str:
    return resources.files("gateway").joinpath("static/console.html").read_text("utf-8")


class GatewayApp:
    """The ASGI app plus the live sessions it serves."""

    def __init__(self, config: GatewayConfig, state: GatewayState) -> None:
        self.config = config
        self.state = state
        self.sessions: dict[int, Session] = {}
        self.by_project: dict[str, Session] = {}  # identified, live sessions
        self._ids = itertools.count(1)
        self._pending_listeners: list[Callable[[PendingPermission], None]] = []
        self._decision_listeners: list[Callable[[DecisionRecord], None]] = []
        self._console_html = _load_console()
        self._stopping = False
        self.asgi = Starlette(
            routes=[
                WebSocketRoute("/api/sled-uplink", self._uplink),
                Route("/api/sled-uplink", self._upgrade_required, methods=["GET"]),
                Route("/", self._console, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/api/state", self._state, methods=["GET"]),
                Route(
                    "/api/permissions/{project}/{req_id:path}",
                    self._post_decision,
                    methods=["POST"],
                ),
                # GET/DELETE are answered 405 by the router; the MCP SDK tolerates
                # that (no server→client stream, no session to terminate).
                Route("/sleds/{project}/mcp", self._mcp, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    # -- listeners ------------------------------------------------------------

    def add_pending_listener(self, callback: Callable[[PendingPermission], None]) -> None:
        """Call ``callback(item)`` (on the loop thread; keep it quick) for each new request."""
        self._pending_listeners.append(callback)

    def add_decision_listener(self, callback: Callable[[DecisionRecord], None]) -> None:
        """Call ``callback(record)`` (on the loop thread; keep it quick) for each decision
        and each withdrawn request, so a transport can show the outcome wherever it asked."""
        self._decision_listeners.append(callback)

    def _notify_decision(self, record: DecisionRecord) -> None:
        for callback in self._decision_listeners:
            try:
                callback(record)
            except Exception:
                log.exception("decision listener failed")

    # -- the sled uplink WebSocket ----------------------------------------------

    def _authorized(self, token: str | None) -> bool:
        if self.config.token is None:
            return True
        if token is None:
            return False
        # Constant-time compare, on bytes: compare_digest rejects non-ASCII str.
        return hmac.compare_digest(token.encode("utf-8"), self.config.token.encode("utf-8"))

    async def _uplink(self, ws: WebSocket) -> None:
        remote = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        if not self._authorized(ws.query_params.get("token")):
            why = "no token" if "token" not in ws.query_params else "a wrong token"
            log.warning("refused a sled from {} with {} (HTTP 401)", remote, why)
            await ws.send_denial_response(_error(401, "unauthorized: missing or wrong token"))
            return
        if self._stopping:
            await ws.send_denial_response(_error(503, "gateway is shutting down"))
            return
        await ws.accept()
        session = Session(next(self._ids), ws, remote)
        self.sessions[session.id] = session
        log.info("sled connected from {} (session {})", remote, session.id)
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
            self._end(session, close_code)

    def _drop(self, session: Session, reason: str, detail: str) -> None:
        log.warning("sled {}: dropped a frame ({}): {}", session.label(), reason, detail)
        self.state.count_frame(session.id, session.project, dropped=True)

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
                await session.send(
                    Envelope(Kind.PERM_RESPONSE, env.req_id, RESPONSE_PAYLOADS[Decision.DENY])
                )
            return
        if env.type not in _HANDLED:
            # Unknown kinds are how later protocol phases arrive: log, count, drop.
            self._drop(
                session, "unexpected_type", f"type {env.type[:80]!r} (req_id {env.req_id[:80]!r})"
            )
            return
        self.state.count_frame(session.id, session.project, dropped=False)
        if env.type == Kind.IDENTITY:
            await self._on_identity(session, env)
        elif env.type == Kind.HEARTBEAT:
            before = self.state.heartbeat(session.id, session.project or "")
            if before is SledState.STALE:
                log.info("sled {} is live again (heartbeat)", session.label())
            else:
                log.trace("sled {} heartbeat", session.label())
        elif env.type == Kind.PERM_REQUEST:
            await self._on_perm_request(session, env)
        else:
            self._on_mcp_response(session, env)

    async def _on_identity(self, session: Session, env: Envelope) -> None:
        payload = env.payload
        project = payload.get("project") if isinstance(payload, dict) else None
        if not isinstance(project, str) or not project:
            log.warning("sled from {}: identity without a project name; closing", session.remote)
            await session.ws.close(1008, "identity needs a project name")
            return
        if session.project is not None:
            log.warning("sled {}: second identity frame ignored", session.label())
            return
        info = {k: v for k, v in payload.items() if k != "project"}
        session.project = project
        old = self.by_project.get(project)
        self.by_project[project] = session
        self.state.identify(session.id, project, session.remote, info)
        self.state.count_frame(session.id, project, dropped=False)
        log.info(
            "sled {!r} identified (session {}, from {}, {})",
            project,
            session.id,
            session.remote,
            info or "no extra info",
        )
        if old is not None and old is not session:
            # Usually a restarted sled whose old connection is half-open. If two
            # sleds share a name they will keep replacing each other: logged loudly.
            log.warning(
                "sled {!r}: session {} replaces session {}; closing the old one",
                project,
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
        payload = env.payload
        tool_name = payload.get("tool_name") if isinstance(payload, dict) else None
        if not isinstance(tool_name, str) or not tool_name:
            log.warning(
                "sled {}: perm_request {!r} without a tool_name; denying",
                session.label(),
                env.req_id,
            )
            self.state.record_immediate(project, env.req_id, "?", Decision.DENY, "invalid")
            await session.send(
                Envelope(Kind.PERM_RESPONSE, env.req_id, RESPONSE_PAYLOADS[Decision.DENY])
            )
            return
        tool_input = payload.get("tool_input")
        item = self.state.add_pending(session.id, project, env.req_id, tool_name, tool_input)
        if item is None:
            log.warning(
                "sled {}: perm_request {!r} is already pending; ignored",
                session.label(),
                env.req_id,
            )
            return
        log.info("sled {!r} asks permission {!r}: {}", project, env.req_id, tool_name)
        if self.config.auto is not None:
            await self.decide(project, env.req_id, self.config.auto, by="auto")
            return
        for callback in self._pending_listeners:
            try:
                callback(item)
            except Exception:
                log.exception("pending-permission listener failed")

    def _on_mcp_response(self, session: Session, env: Envelope) -> None:
        fut = session.mcp_waiters.pop(env.req_id, None)
        if fut is None or fut.done():
            log.warning(
                "sled {}: mcp_response for unknown or expired req_id {!r}; dropped",
                session.label(),
                env.req_id[:80],
            )
            return
        fut.set_result(env.payload)

    def _end(self, session: Session, close_code: int | None) -> None:
        self.sessions.pop(session.id, None)
        if session.project is not None and self.by_project.get(session.project) is session:
            del self.by_project[session.project]
        session.fail_waiters(GatewayStopping() if self._stopping else SledGone())
        withdrawn = self.state.disconnected(session.id, session.project, close_code)
        for item in withdrawn:
            withdrawal = self.state.decision_for(item.project, item.req_id)
            if withdrawal is not None:
                self._notify_decision(withdrawal)
        log.info(
            "sled {} disconnected (code {}){}",
            session.label(),
            close_code,
            f"; withdrew {len(withdrawn)} pending permission request(s)" if withdrawn else "",
        )

    # -- decisions ------------------------------------------------------------

    async def decide(
        self, project: str, req_id: str, decision: Decision, by: str
    ) -> DecisionRecord:
        """Answer a pending request (raises UnknownRequest / AlreadyDecided)."""
        record, item = self.state.resolve(project, req_id, decision, by)
        log.info(
            "permission {!r} of sled {!r} ({}): {} by {}",
            req_id,
            project,
            item.tool_name,
            decision.value,
            by,
        )
        session = self.sessions.get(item.session)
        if session is None:  # cannot happen on the loop: its end withdraws its items
            log.warning("permission {!r}: the sled's session is gone; answer not sent", req_id)
        else:
            await session.send(Envelope(Kind.PERM_RESPONSE, req_id, RESPONSE_PAYLOADS[decision]))
        self._notify_decision(record)
        return record

    # -- HTTP endpoints ---------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def _upgrade_required(self, request: Request) -> Response:
        return JSONResponse(
            {"error": "this is the sled uplink WebSocket endpoint; upgrade required"},
            status_code=426,
            headers={"Upgrade": "websocket"},
        )

    async def _console(self, request: Request) -> Response:
        return HTMLResponse(self._console_html, headers={"Cache-Control": "no-store"})

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "sleds": len(self.by_project)})

    async def _state(self, request: Request) -> Response:
        snap = self.state.snapshot()
        snap["gateway"] = {
            "auth": self.config.token is not None,
            "auto": self.config.auto.value if self.config.auto else None,
            "mcp_timeout_s": self.config.mcp_timeout,
        }
        return JSONResponse(snap, headers={"Cache-Control": "no-store"})

    async def _read_body(self, request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _post_decision(self, request: Request) -> Response:
        project = request.path_params["project"]
        req_id = request.path_params["req_id"]
        try:
            body = json.loads(await self._read_body(request, _MAX_DECISION_BODY))
        except BodyTooLarge:
            return _error(413, "body too large")
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'body must be JSON: {"decision": "approve"|"deny"|"always_allow"}')
        value = body.get("decision") if isinstance(body, dict) else None
        try:
            decision = Decision(value if isinstance(value, str) else "")
        except ValueError:
            return _error(
                400, f"decision must be one of {[d.value for d in Decision]}, not {value!r}"
            )
        try:
            record = await self.decide(project, req_id, decision, by="console")
        except UnknownRequest as exc:
            return _error(404, str(exc.args[0]))
        except AlreadyDecided as exc:
            return _error(409, str(exc), decided=exc.record.to_json())
        return JSONResponse({"ok": True, "decided": record.to_json()})

    async def _mcp(self, request: Request) -> Response:
        project = request.path_params["project"]
        session = self.by_project.get(project)
        if session is None:
            return _error(404, f"no connected sled named {project!r}")
        try:
            raw = await self._read_body(request, self.config.max_mcp_body)
        except BodyTooLarge:
            return _error(413, f"body larger than {self.config.max_mcp_body} bytes")
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "body is not UTF-8 text")
        # The sled judges the JSON-RPC (PROTOCOL.md §1: it answers -32600 for
        # non-JSON), so the body goes out verbatim, unparsed.
        req_id = f"mcp-{uuid.uuid4().hex}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session.mcp_waiters[req_id] = fut
        log.debug("relaying MCP request {} ({} bytes) to sled {!r}", req_id, len(raw), project)
        if not await session.send(Envelope(Kind.MCP_REQUEST, req_id, {"body": body})):
            session.mcp_waiters.pop(req_id, None)
            return _error(502, f"sled {project!r} went away before the request was sent")
        try:
            payload = await asyncio.wait_for(fut, self.config.mcp_timeout)
        except TimeoutError:
            session.mcp_waiters.pop(req_id, None)
            log.warning(
                "MCP request {} to sled {!r}: no answer in {} s",
                req_id,
                project,
                self.config.mcp_timeout,
            )
            return _error(
                504, f"sled {project!r} did not answer within {self.config.mcp_timeout} s"
            )
        except SledGone:
            return _error(502, f"sled {project!r} disconnected before answering")
        except GatewayStopping:
            return _error(503, "gateway is shutting down")
        if payload is None:  # the sled's local server answered 202/204 (a notification)
            return Response(status_code=202)
        return Response(dumps(payload), status_code=200, media_type="application/json")

    # -- background work and shutdown ---------------------------------------------

    async def monitor(self) -> None:
        """Announce state changes that only time causes (a sled going stale)."""
        tick = min(self.config.heartbeat_interval / 4, 1.0)
        while True:
            await asyncio.sleep(tick)
            for rec, new in self.state.refresh():
                if new is SledState.STALE:
                    log.warning(
                        "sled {!r} is stale: no heartbeat for {:.1f} s",
                        rec.project,
                        self.state.stale_after,
                    )

    async def shutdown(self) -> None:
        """Abandon relays (503) and close every sled session with 1001 (going away)."""
        self._stopping = True
        for session in list(self.sessions.values()):
            session.fail_waiters(GatewayStopping())
            try:
                await session.ws.close(1001, "gateway shutting down")
            except Exception as exc:
                log.debug("closing session {}: {}", session.id, exc)
