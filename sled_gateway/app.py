"""The gateway's web application: the sled uplink WebSocket, the REST API, the MCP relay.

One ASGI app (Starlette) serves everything on one port:

==============================  =========================================================
``/api/sled-uplink`` (WS)       sleds connect here; ``?token=`` checked before the upgrade
``GET /``                       the web console (``gateway/static/console.html``)
``GET /api/state``              sleds, pending permission requests, recent decisions
``POST /api/permissions/{project}/{req_id}``   ``{"decision": "approve"|"deny"|"always_allow"}``
``GET /api/audit``              the durable audit log, newest first (``?project=&since=&limit=``)
``GET|POST /api/rules``         always-allow and deny rules; ``DELETE /api/rules/{id}`` revokes one
``POST /sleds/{project}/mcp``   JSON-RPC relayed to that sled as ``mcp_request``
``GET /healthz``                liveness
==============================  =========================================================

All of it sits behind :class:`sled_gateway.security.SecurityMiddleware` (Host
allowlist, operator token or console session, CSRF checks, headers); only
``GET /healthz`` and the sled WebSocket pass without the operator credential,
and the sled WebSocket checks the sled's own token here.

Why ASGI and not ``websockets.asyncio.server.serve``: websockets' HTTP parser
refuses requests with a body ("unsupported request body"), so the REST and
MCP POSTs cannot share its port. uvicorn runs the WebSocket side on the
websockets library's own sans-I/O ``ServerProtocol`` (``ws="websockets-sansio"``),
and the ASGI *denial response* extension lets us answer a bad token with a
real HTTP 401 before the upgrade.

Everything here runs on one event loop; :class:`sled_gateway.state.GatewayState`
is the only thing other threads touch.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from loguru import logger
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from protocol import (
    Decision,
    Envelope,
    Kind,
    RemoteProtocolError,
    dumps,
    parse,
    printable,
    serialize,
)
from sled_gateway.config import GatewayConfig
from sled_gateway.policy import rule_key
from sled_gateway.security import PRINCIPAL_KEY, AllowedHosts, SecurityMiddleware
from sled_gateway.state import (
    AlreadyDecided,
    DecisionRecord,
    GatewayState,
    PendingPermission,
    SledState,
    UnknownRequest,
)
from sled_gateway.store import (
    ALLOW,
    DENY,
    MAX_PAGE,
    AuditEntry,
    Rule,
    RuleRevoked,
    Store,
    UnknownRule,
    make_store,
)

log = logger.bind(actor="gateway")

#: The ``perm_response`` payload for each decision (the sled maps it back exactly).
RESPONSE_PAYLOADS: dict[Decision, dict[str, bool]] = {
    Decision.APPROVE: {"approved": True, "always_allow": False},
    Decision.ALWAYS_ALLOW: {"approved": True, "always_allow": True},
    Decision.DENY: {"approved": False, "always_allow": False},
}

_MAX_DECISION_BODY = 64 * 1024
UPLINK_PATH = "/api/sled-uplink"
# The console's own policy: its inline script and style, its own API, no framing.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# Frame kinds a sled may send; anything else (perm_response, mcp_request,
# future kinds) is logged, counted and dropped.
_HANDLED = frozenset({Kind.IDENTITY, Kind.HEARTBEAT, Kind.PERM_REQUEST, Kind.MCP_RESPONSE})


class SledGone(Exception):
    """The sled's session ended before it answered an ``mcp_request``."""


class GatewayStopping(Exception):
    """The gateway is shutting down; in-flight relays are abandoned."""


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    """The body did not arrive within the body deadline (a slow-body attack or a dead client)."""


class NotRecorded(Exception):
    """The audit row could not be committed, so the sled was sent a deny instead."""


@dataclass(eq=False)
class Session:
    """One WebSocket connection from a sled."""

    id: int
    ws: WebSocket
    remote: str
    # The only project this session may claim (its per-sled token's), or None
    # for the shared token / --no-auth, which may claim any unlisted project.
    allowed_project: str | None = None
    project: str | None = None
    relays: int = 0  # MCP relays in flight to this sled
    identity_timer: asyncio.TimerHandle | None = None
    mcp_waiters: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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

    def fail_waiters(self, exc: Exception) -> None:
        for fut in self.mcp_waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self.mcp_waiters.clear()


#: How many sleds and pending requests ``GET /api/state`` lists unless ``?limit=`` says.
STATE_LIMIT = 500
_MAX_REASON = 1000
_AUDIT_DECISIONS = frozenset({*(d.value for d in Decision), "withdrawn"})
_RULE_SHAPE = (
    'body must be JSON: {"action": "allow"|"deny", "tool_name": str, '
    '"project": str|null, "key": str|null, "reason": str}'
)


def _who(request: Request) -> str:
    """Who made a change: ``console`` (the session cookie) or ``api`` (a bearer token),
    as the security middleware established it."""
    return str(request.scope.get(PRINCIPAL_KEY) or "api")


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> Any:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}")
    return int(text)


def _time_param(text: str | None) -> float | None:
    """``since=``: ISO 8601 (UTC unless it says) or Unix seconds."""
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"since must be an ISO 8601 time or Unix seconds, not {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _load_console() -> str:
    return resources.files("sled_gateway").joinpath("static/console.html").read_text("utf-8")


class GatewayApp:
    """The ASGI app plus the live sessions it serves."""

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
        self.sessions: dict[int, Session] = {}
        self.by_project: dict[str, Session] = {}  # identified, live sessions
        self._ids = itertools.count(1)
        self._background: set[asyncio.Future[None]] = set()
        self._pending_listeners: list[Callable[[PendingPermission], None]] = []
        self._decision_listeners: list[Callable[[DecisionRecord], None]] = []
        self._console_html = _load_console()
        self._stopping = False
        self.allowed_hosts = AllowedHosts.default(listen_host, config.allowed_hosts)
        # Sled tokens as bytes once, for constant-time compares.
        self._shared_token = config.token.encode("utf-8") if config.token is not None else None
        self._sled_tokens = [(p, t.encode("utf-8")) for p, t in config.sled_tokens.items()]
        self.routes = Starlette(
            routes=[
                WebSocketRoute(UPLINK_PATH, self._uplink),
                Route(UPLINK_PATH, self._upgrade_required, methods=["GET"]),
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
                Route("/api/audit", self._get_audit, methods=["GET"]),
                Route("/api/rules", self._get_rules, methods=["GET"]),
                Route("/api/rules", self._post_rule, methods=["POST"]),
                Route("/api/rules/{rule_id}", self._delete_rule, methods=["DELETE"]),
                # Starlette closes an unrouted WebSocket before the handshake
                # (an HTTP 403); a 404 says what is wrong: the path.
                WebSocketRoute("/{path:path}", self._no_such_websocket),
            ],
            exception_handlers={HTTPException: self._http_error},
        )
        self.asgi = SecurityMiddleware(
            self.routes,
            operator_token=config.operator_token,
            allowed_hosts=self.allowed_hosts,
            public_websockets=(UPLINK_PATH,),
            public_http_paths=(UPLINK_PATH,),
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

    def _admit(self, token: str | None) -> tuple[bool, str | None]:
        """(admitted, the one project it may claim or None for any unlisted project)."""
        if self._shared_token is None and not self._sled_tokens:
            return True, None  # --no-auth
        if token is None:
            return False, None
        # Constant time, on bytes (compare_digest rejects non-ASCII str); every
        # token is compared, so the time does not tell which one matched.
        given = token.encode("utf-8", "surrogatepass")
        match: str | None = None
        for project, expected in self._sled_tokens:
            if hmac.compare_digest(given, expected):
                match = project
        if match is not None:
            return True, match
        if self._shared_token is not None and hmac.compare_digest(given, self._shared_token):
            return True, None
        return False, None

    async def _uplink(self, ws: WebSocket) -> None:
        remote = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        admitted, allowed_project = self._admit(ws.query_params.get("token"))
        if not admitted:
            why = "no token" if "token" not in ws.query_params else "a wrong token"
            log.warning("refused a sled from {} with {} (HTTP 401)", remote, why)
            await ws.send_denial_response(_error(401, "unauthorized: missing or wrong token"))
            return
        if self._stopping:
            await ws.send_denial_response(_error(503, "gateway is shutting down"))
            return
        await ws.accept()
        session = Session(next(self._ids), ws, remote, allowed_project=allowed_project)
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
            task = asyncio.ensure_future(self._close(session, 1008, "no identity in time"))
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
                await self._record_invalid(session, env, "?", "perm_request before identity")
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
        claimed_by_token = project in self.config.sled_tokens
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
        info = {k: v for k, v in payload.items() if k != "project"}
        session.project = project
        old = self.by_project.get(project)
        self.by_project[project] = session
        self.state.identify(session.id, project, session.remote, info)
        self.state.count_frame(session.id, project, dropped=False)
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
        payload = env.payload
        tool_name = payload.get("tool_name") if isinstance(payload, dict) else None
        if not isinstance(tool_name, str) or not tool_name:
            log.warning(
                "sled {}: perm_request '{}' without a tool_name; denying",
                session.label(),
                printable(env.req_id, 120),
            )
            self.state.record_immediate(project, env.req_id, "?", Decision.DENY, "invalid")
            await self._record_invalid(session, env, "?", "perm_request without a tool_name")
            await session.send(
                Envelope(Kind.PERM_RESPONSE, env.req_id, RESPONSE_PAYLOADS[Decision.DENY])
            )
            return
        tool_input = payload.get("tool_input")
        rule = (
            None
            if self.state.is_pending(project, env.req_id)
            else self.store.match(project, tool_name, tool_input)
        )
        if rule is not None:
            await self._answer_by_rule(session, env.req_id, tool_name, tool_input, rule)
            return
        if (
            not self.state.is_pending(project, env.req_id)
            and self.state.pending_count(project) >= self.config.max_pending_per_sled
        ):
            log.warning(
                "sled {}: {} permission requests already pending (--max-pending-per-sled); "
                "denying '{}' ({})",
                session.label(),
                self.config.max_pending_per_sled,
                printable(env.req_id, 120),
                printable(tool_name, 120),
            )
            self.state.record_immediate(project, env.req_id, tool_name, Decision.DENY, "limit")
            await self._record_invalid(
                session, env, tool_name, "over --max-pending-per-sled", by="limit"
            )
            await session.send(
                Envelope(Kind.PERM_RESPONSE, env.req_id, RESPONSE_PAYLOADS[Decision.DENY])
            )
            return
        item = self.state.add_pending(session.id, project, env.req_id, tool_name, tool_input)
        if item is None:
            log.warning(
                "sled {}: perm_request '{}' is already pending; ignored",
                session.label(),
                printable(env.req_id, 120),
            )
            return
        log.info(
            "sled '{}' asks permission '{}': {}",
            printable(project, 120),
            printable(env.req_id, 120),
            printable(tool_name, 200),
        )
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
                "sled {}: mcp_response for unknown or expired req_id '{}'; dropped",
                session.label(),
                printable(env.req_id, 80),
            )
            return
        fut.set_result(env.payload)

    def _end(self, session: Session, close_code: int | None) -> None:
        self.sessions.pop(session.id, None)
        if session.project is not None and self.by_project.get(session.project) is session:
            del self.by_project[session.project]
        session.fail_waiters(GatewayStopping() if self._stopping else SledGone())
        withdrawn = self.state.disconnected(session.id, session.project, close_code)
        now = time.time()
        for gone in withdrawn:
            # The sled denies these itself; no answer goes out, so no need to wait.
            self.store.record_later(
                AuditEntry(
                    gone.project,
                    gone.session,
                    gone.req_id,
                    gone.tool_name,
                    gone.tool_input,
                    "withdrawn",
                    "sled_disconnected",
                    f"the sled disconnected (close code {close_code})",
                    gone.received_at,
                    now,
                )
            )
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
        self, project: str, req_id: str, decision: Decision, by: str, reason: str | None = None
    ) -> DecisionRecord:
        """Answer a pending request (raises UnknownRequest / AlreadyDecided / NotRecorded).

        The audit row (and, for always_allow, the rule) is committed before the
        ``perm_response`` goes out: a sled never acts on an unrecorded decision.
        """
        record, item = self.state.resolve(project, req_id, decision, by)
        log.info(
            "permission '{}' of sled '{}' ({}): {} by {}",
            printable(req_id, 120),
            printable(project, 120),
            printable(item.tool_name, 200),
            decision.value,
            by,
        )
        new_rule = None
        if decision is Decision.ALWAYS_ALLOW:
            usable, key = rule_key(item.tool_name, item.tool_input)
            if usable:
                new_rule = Rule(
                    0,
                    project,
                    item.tool_name,
                    key,
                    ALLOW,
                    record.decided_at,
                    by,
                    origin=f"always_allow of request {req_id}",
                )
            else:
                log.warning(
                    "permission {!r}: {} input has no command or file path; no rule made",
                    req_id,
                    item.tool_name,
                )
        entry = AuditEntry(
            project,
            item.session,
            req_id,
            item.tool_name,
            item.tool_input,
            decision.value,
            by,
            reason,
            item.received_at,
            record.decided_at,
        )
        session = self.sessions.get(item.session)
        try:
            _, rule = await self.store.record(entry, new_rule)
        except Exception as exc:
            log.opt(exception=exc).error(
                "permission {!r}: the decision could not be recorded; denying", req_id
            )
            if session is not None:
                await session.send(
                    Envelope(Kind.PERM_RESPONSE, req_id, RESPONSE_PAYLOADS[Decision.DENY])
                )
            raise NotRecorded(str(exc)) from exc
        if rule is not None:
            log.info(
                "rule {} for sled {!r}: always allow {} {}",
                rule.id,
                project,
                rule.tool_name,
                rule.key or "(any use)",
            )
        session = self.sessions.get(item.session)
        if session is None:  # cannot happen on the loop: its end withdraws its items
            log.warning(
                "permission '{}': the sled's session is gone; answer not sent",
                printable(req_id, 120),
            )
        else:
            await session.send(Envelope(Kind.PERM_RESPONSE, req_id, RESPONSE_PAYLOADS[decision]))
        self._notify_decision(record)
        return record

    async def _answer_by_rule(
        self, session: Session, req_id: str, tool_name: str, tool_input: Any, rule: Rule
    ) -> None:
        """Answer a request a rule covers at once: recorded as ``rule:<id>``, never pending."""
        project = session.project
        assert project is not None
        decision = Decision.ALWAYS_ALLOW if rule.action == ALLOW else Decision.DENY
        record = self.state.record_immediate(project, req_id, tool_name, decision, rule.who)
        what = f"{rule.tool_name} {rule.key}" if rule.key is not None else f"any {rule.tool_name}"
        entry = AuditEntry(
            project,
            session.id,
            req_id,
            tool_name,
            tool_input,
            decision.value,
            rule.who,
            f"rule {rule.id}: {rule.action} {what}",
            record.decided_at,
            record.decided_at,
        )
        try:
            await self.store.record(entry)
        except Exception as exc:
            log.opt(exception=exc).error("permission {!r}: not recorded; denying", req_id)
            decision = Decision.DENY
        log.info(
            "permission {!r} of sled {!r} ({}): {} by {}",
            req_id,
            project,
            tool_name,
            decision.value,
            rule.who,
        )
        await session.send(Envelope(Kind.PERM_RESPONSE, req_id, RESPONSE_PAYLOADS[decision]))

    async def _record_invalid(
        self, session: Session, env: Envelope, tool: str, why: str, by: str = "invalid"
    ) -> None:
        """Audit a request the gateway denied itself, malformed or over a limit (the
        deny goes out whatever happens)."""
        now = time.time()
        payload = env.payload if isinstance(env.payload, dict) else {}
        tool_name = payload.get("tool_name")
        entry = AuditEntry(
            session.project or "",
            session.id,
            env.req_id,
            tool_name if isinstance(tool_name, str) and tool_name else tool,
            payload.get("tool_input"),
            Decision.DENY.value,
            by,
            why,
            now,
            now,
        )
        try:
            await self.store.record(entry)
        except Exception as exc:
            log.opt(exception=exc).error("invalid permission request {!r} not recorded", env.req_id)

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

    async def _no_such_websocket(self, ws: WebSocket) -> None:
        await ws.send_denial_response(
            _error(404, f"no WebSocket endpoint at {printable(ws.url.path, 200)}")
        )

    async def _console(self, request: Request) -> Response:
        return HTMLResponse(
            self._console_html,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": CONSOLE_CSP},
        )

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "sleds": len(self.by_project)})

    async def _state(self, request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", STATE_LIMIT, 0, 100_000)
        except ValueError as exc:
            return _error(400, str(exc))
        snap = self.state.snapshot(limit=limit)
        sled_auth = (
            "per-sled"
            if self.config.sled_tokens
            else "shared"
            if self.config.token is not None
            else "off"
        )
        snap["gateway"] = {
            # Whether sleds need a token (the operator always does); never a token itself.
            "auth": sled_auth != "off",
            "sled_auth": sled_auth,
            "auto": self.config.auto.value if self.config.auto else None,
            "mcp_timeout_s": self.config.mcp_timeout,
        }
        return JSONResponse(snap, headers={"Cache-Control": "no-store"})

    async def _read_body(self, request: Request, limit: int) -> bytes:
        # The server's header deadline ends once the head is in; a body sent a
        # byte at a time would hold this request (and a relay slot) forever.
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyTooSlow from None
        return b"".join(chunks)

    async def _post_decision(self, request: Request) -> Response:
        project = request.path_params["project"]
        req_id = request.path_params["req_id"]
        try:
            body = json.loads(await self._read_body(request, _MAX_DECISION_BODY))
        except BodyTooLarge:
            return _error(413, "body too large")
        except BodyTooSlow:
            return _error(408, f"body not received within {self.config.body_timeout} s")
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'body must be JSON: {"decision": "approve"|"deny"|"always_allow"}')
        value = body.get("decision") if isinstance(body, dict) else None
        try:
            decision = Decision(value if isinstance(value, str) else "")
        except ValueError:
            return _error(
                400, f"decision must be one of {[d.value for d in Decision]}, not {value!r}"
            )
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            return _error(400, f"reason must be a string of at most {_MAX_REASON} characters")
        try:
            record = await self.decide(project, req_id, decision, by=_who(request), reason=reason)
        except UnknownRequest as exc:
            return _error(404, str(exc.args[0]))
        except AlreadyDecided as exc:
            return _error(409, str(exc), decided=exc.record.to_json())
        except NotRecorded as exc:
            return _error(503, f"the decision could not be recorded, so the sled was denied: {exc}")
        return JSONResponse({"ok": True, "decided": record.to_json()})

    async def _get_audit(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
            before = _int_param(request, "before", None, 1, 2**62)
            since = _time_param(q.get("since"))
            decision = q.get("decision") or None
            if decision is not None and decision not in _AUDIT_DECISIONS:
                raise ValueError(f"decision must be one of {sorted(_AUDIT_DECISIONS)}")
        except ValueError as exc:
            return _error(400, str(exc))
        rows = await self.store.audit(
            project=q.get("project") or None,
            since=since,
            before=before,
            decision=decision,
            limit=limit,
        )
        last = rows[-1].id if len(rows) == limit else None
        return JSONResponse(
            {"entries": [r.to_json() for r in rows], "next_before": last},
            headers={"Cache-Control": "no-store"},
        )

    async def _get_rules(self, request: Request) -> Response:
        everything = request.query_params.get("include_revoked", "") in ("1", "true", "yes")
        rules = await self.store.rules(include_revoked=everything)
        return JSONResponse(
            {"rules": [r.to_json() for r in rules]}, headers={"Cache-Control": "no-store"}
        )

    async def _post_rule(self, request: Request) -> Response:
        try:
            body = json.loads(await self._read_body(request, _MAX_DECISION_BODY))
        except BodyTooLarge:
            return _error(413, "body too large")
        except (ValueError, UnicodeDecodeError):
            return _error(400, _RULE_SHAPE)
        if not isinstance(body, dict):
            return _error(400, _RULE_SHAPE)
        unknown = set(body) - {"action", "project", "tool_name", "key", "reason"}
        action, project, tool = body.get("action"), body.get("project"), body.get("tool_name")
        key, reason = body.get("key"), body.get("reason")
        problem = None
        if unknown:
            problem = f"unknown field(s) {sorted(unknown)}"
        elif action not in (ALLOW, DENY):
            problem = f"action must be {ALLOW!r} or {DENY!r}, not {action!r}"
        elif not isinstance(tool, str) or not tool or len(tool) > 200:
            problem = "tool_name must be a non-empty string (at most 200 characters)"
        elif project is not None and (not isinstance(project, str) or not project):
            problem = "project must be a sled's project name, or null for every sled"
        elif key is not None and (not isinstance(key, str) or not key or len(key) > 10_000):
            problem = "key must be a non-empty string (the command or file path), or null"
        elif reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            problem = f"reason must be a string of at most {_MAX_REASON} characters"
        if problem is not None:
            return _error(400, problem)
        assert isinstance(tool, str)
        assert isinstance(action, str)
        draft = Rule(0, project, tool, key, action, time.time(), _who(request), "operator", reason)
        rule = await self.store.add_rule(draft)
        log.info(
            "rule {} by {}: {} {} {} for {}",
            rule.id,
            rule.created_by,
            rule.action,
            rule.tool_name,
            rule.key or "(any use)",
            repr(rule.project) if rule.project else "every sled",
        )
        return JSONResponse({"ok": True, "rule": rule.to_json()}, status_code=201)

    async def _delete_rule(self, request: Request) -> Response:
        text = request.path_params["rule_id"]
        if not text.isdigit() or len(text) > 18:
            return _error(400, f"a rule id is a number, not {text[:40]!r}")
        try:
            rule = await self.store.revoke_rule(int(text), _who(request))
        except UnknownRule as exc:
            return _error(404, str(exc))
        except RuleRevoked as exc:
            return _error(409, str(exc), rule=exc.rule.to_json())
        log.info("rule {} revoked by {}", rule.id, rule.revoked_by)
        return JSONResponse({"ok": True, "rule": rule.to_json()})

    async def _mcp(self, request: Request) -> Response:
        project = request.path_params["project"]
        session = self.by_project.get(project)
        if session is None:
            return _error(404, f"no connected sled named {printable(project, 120)!r}")
        if session.relays >= self.config.max_relays_per_sled:
            log.warning(
                "sled {}: {} MCP relays in flight (--max-relays-per-sled); answered 503",
                session.label(),
                session.relays,
            )
            return JSONResponse(
                {"error": f"too many MCP requests in flight to sled {printable(project, 120)!r}"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        session.relays += 1
        try:
            return await self._relay(request, session, project)
        finally:
            session.relays -= 1

    async def _relay(self, request: Request, session: Session, project: str) -> Response:
        try:
            raw = await self._read_body(request, self.config.max_mcp_body)
        except BodyTooLarge:
            return _error(413, f"body larger than {self.config.max_mcp_body} bytes")
        except BodyTooSlow:
            return _error(408, f"body not received within {self.config.body_timeout} s")
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "body is not UTF-8 text")
        # The sled judges the JSON-RPC (it answers -32600 for
        # non-JSON), so the body goes out verbatim, unparsed.
        req_id = f"mcp-{uuid.uuid4().hex}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session.mcp_waiters[req_id] = fut
        log.debug(
            "relaying MCP request {} ({} bytes) to sled {}", req_id, len(raw), session.label()
        )
        if not await session.send(Envelope(Kind.MCP_REQUEST, req_id, {"body": body})):
            session.mcp_waiters.pop(req_id, None)
            return _error(502, f"sled {project!r} went away before the request was sent")
        try:
            payload = await asyncio.wait_for(fut, self.config.mcp_timeout)
        except TimeoutError:
            session.mcp_waiters.pop(req_id, None)
            log.warning(
                "MCP request {} to sled {}: no answer in {} s",
                req_id,
                session.label(),
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

    async def shutdown(self) -> None:
        """Abandon relays (503) and close every sled session with 1001 (going away)."""
        self._stopping = True
        for session in list(self.sessions.values()):
            session.fail_waiters(GatewayStopping())
            try:
                await session.ws.close(1001, "gateway shutting down")
            except Exception as exc:
                log.debug("closing session {}: {}", session.id, exc)
