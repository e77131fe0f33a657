"""The gateway's routes: parse the request, call a service, map its errors to JSON.

==============================  =========================================================
``/api/sled-uplink`` (WS)       sleds connect here (:mod:`sled_gateway.hub`)
``GET /``                       the web console (:mod:`sled_gateway.http.console`)
``GET /api/state``              sleds, pending permission requests, recent decisions
``GET /api/events``             that document as Server-Sent Events on each change (:mod:`.live`)
``POST /api/permissions/{project}/{req_id}``   ``{"decision": ..., "input_sha256": hex}``
``POST /api/permissions/decide``  many at once, each its own decision (:mod:`.bulk_api`)
``GET /api/permissions/{project}/{req_id}``    one request, with its whole input
``GET /api/audit``              the durable audit log, newest first (``?project=&since=&limit=``)
``GET|POST /api/rules``         always-allow and deny rules; ``DELETE /api/rules/{id}`` revokes one
``GET|POST /api/tokens``        person API tokens; ``DELETE /api/tokens/{id}`` (:mod:`.tokens_api`)
``/api/rules/check|import|impact``  rules in Claude Code's grammar (:mod:`.rules_api`)
``POST /sleds/{project}/mcp``   JSON-RPC relayed to that sled (:mod:`sled_gateway.relay`)
``GET /login``, ``/auth/callback``  OpenID Connect sign-in (:mod:`sled_gateway.auth.oidc`)
``POST /logout``, ``GET /api/me``   end the console session; who this request acts as
``GET /healthz``                liveness
``GET /readyz``                 readiness: 503 while draining or without a database
==============================  =========================================================

Who asks is the :class:`~sled_gateway.principal.Principal` the request guard
put on the request (:func:`sled_gateway.auth.principal_of`); whether they may
is the approvals service's call, not a route's.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from loguru import logger
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from protocol import Decision, printable
from protocol.web import ascii_digits
from sled_gateway.approvals import (
    Approvals,
    Forbidden,
    NotRecorded,
    NotSuggested,
    VoteCounted,
    VoteRefused,
)
from sled_gateway.auth import principal_of
from sled_gateway.config import GatewayConfig
from sled_gateway.http.bulk_api import BULK_PATH, BulkDecisions
from sled_gateway.http.console import SHELL_PATHS, ConsolePage, ShellFiles
from sled_gateway.http.errors import error, forbidden
from sled_gateway.http.lean import LeanRoute
from sled_gateway.http.live import EVENTS_PATH, LiveStreams, Receive, Scope, Send
from sled_gateway.http.params import BodyTooLarge, BodyTooSlow, int_param, read_body, time_param
from sled_gateway.http.rules_api import RulesApi
from sled_gateway.http.tokens_api import TokensApi
from sled_gateway.hub import Hub
from sled_gateway.principal import Principal, Role
from sled_gateway.readiness import Readiness
from sled_gateway.records import AlreadyDecided, InputMismatch, UnknownRequest
from sled_gateway.relay import Relay
from sled_gateway.state import GatewayState
from sled_gateway.store import ALLOW, DENY, MAX_PAGE, Rule, RuleRevoked, Store, UnknownRule
from sled_gateway.tokens import PersonTokens

log = logger.bind(actor="gateway")

UPLINK_PATH = "/api/sled-uplink"
#: How many sleds and pending requests ``GET /api/state`` lists unless ``?limit=`` says.
STATE_LIMIT = 500
_MAX_DECISION_BODY = 64 * 1024
_MAX_REASON = 1000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_AUDIT_DECISIONS = frozenset(
    {*(d.value for d in Decision), "withdrawn", "token_created", "token_revoked"}
)
_DECISION_SHAPE = 'body must be JSON: {"decision": "approve"|"deny"|"always_allow"}'
_RULE_SHAPE = (
    'body must be JSON: {"rule": str, "action": "allow"|"ask"|"deny", "project": str|null, '
    '"reason": str} or {"action": "allow"|"deny", "tool_name": str, '
    '"project": str|null, "key": str|null, "reason": str}'
)
#: A Claude Code settings file can be long; one import's body may be this big.
_MAX_IMPORT_BODY = 1024 * 1024


class Routes:
    """The handlers, over the services they call."""

    def __init__(
        self,
        config: GatewayConfig,
        state: GatewayState,
        *,
        store: Store,
        approvals: Approvals,
        hub: Hub,
        relay: Relay,
        tokens: PersonTokens,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.approvals = approvals
        self.hub = hub
        self.relay = relay
        self.readiness = Readiness(store, lambda: hub.draining)
        self.rules_api = RulesApi(
            store,
            approvals,
            lambda request, shape: self._json_body(
                request, shape, _MAX_IMPORT_BODY if request.url.path.endswith("/import") else None
            ),
        )
        self.bulk = BulkDecisions(approvals, self._json_body)
        self.tokens_api = TokensApi(tokens, self._json_body)
        self.live = LiveStreams(lambda: self.state_document(STATE_LIMIT))
        shell = ShellFiles()
        decision = Route(
            "/api/permissions/{project}/{req_id:path}", self._post_decision, methods=["POST"]
        )
        self.app = Starlette(
            routes=[
                WebSocketRoute(UPLINK_PATH, hub.uplink),
                # The decision POST is the hot HTTP route, and the router tries routes in
                # order (about 1.6 µs each); no route above or below matches its paths.
                decision,
                Route(
                    "/api/permissions/{project}/{req_id:path}",
                    self._get_permission,
                    methods=["GET"],
                ),
                Route(UPLINK_PATH, self._upgrade_required, methods=["GET"]),
                Route("/", ConsolePage().handle, methods=["GET"]),
                *(Route(path, shell.handle, methods=["GET"]) for path in SHELL_PATHS),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/readyz", self._readyz, methods=["GET"]),
                Route("/api/state", self._state, methods=["GET"]),
                Route(EVENTS_PATH, _EventStream(self), methods=["GET"]),
                Route(BULK_PATH, self.bulk.handle, methods=["POST"]),
                # GET/DELETE are answered 405 by the router; the MCP SDK tolerates
                # that (no server→client stream, no session to terminate).
                Route("/sleds/{project}/mcp", self._relay, methods=["POST"]),
                Route("/api/audit", self._get_audit, methods=["GET"]),
                Route("/api/rules", self._get_rules, methods=["GET"]),
                Route("/api/rules", self._post_rule, methods=["POST"]),
                Route("/api/rules/check", self.rules_api.check, methods=["POST"]),
                Route("/api/rules/import", self.rules_api.import_rules, methods=["POST"]),
                Route("/api/rules/impact", self.rules_api.impact, methods=["GET"]),
                Route("/api/rules/{rule_id}", self._delete_rule, methods=["DELETE"]),
                Route("/api/tokens", self.tokens_api.list, methods=["GET"]),
                Route("/api/tokens", self.tokens_api.create, methods=["POST"]),
                Route("/api/tokens/{token_id}", self.tokens_api.revoke, methods=["DELETE"]),
                *extra_routes,  # sign-in (sled_gateway/auth/oidc.py)
                # Starlette closes an unrouted WebSocket before the handshake
                # (an HTTP 403); a 404 says what is wrong: the path.
                WebSocketRoute("/{path:path}", self._no_such_websocket),
            ],
            # A handler's bug answers in the house's JSON shape too, as on the lean
            # path; Starlette then raises it again, for the server to log.
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )
        #: What the request guard serves: the decision POST on its lean path, the rest
        #: through Starlette (:mod:`sled_gateway.http.lean`).
        self.asgi = LeanRoute(decision, self.app)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return error(500, "internal error")

    async def _upgrade_required(self, request: Request) -> Response:
        return JSONResponse(
            {"error": "this is the sled uplink WebSocket endpoint; upgrade required"},
            status_code=426,
            headers={"Upgrade": "websocket"},
        )

    async def _no_such_websocket(self, ws: WebSocket) -> None:
        await ws.send_denial_response(
            error(404, f"no WebSocket endpoint at {printable(ws.url.path, 200)}")
        )

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "sleds": self.hub.sled_count})

    async def _readyz(self, request: Request) -> Response:
        verdict = await self.readiness.verdict()
        if verdict is None:
            return JSONResponse({"ready": True, "sleds": self.hub.sled_count})
        reason, detail = verdict
        return error(503, detail, ready=False, reason=reason)

    async def _state(self, request: Request) -> Response:
        principal = principal_of(request)
        try:
            self.approvals.authorize(principal, Role.VIEWER, "read the state", somewhere=True)
        except Forbidden as exc:
            return forbidden(exc)
        try:
            limit = int_param(request, "limit", STATE_LIMIT, 0, 100_000)
        except ValueError as exc:
            return error(400, str(exc))
        document = self.state_document(limit)
        return JSONResponse(
            visible_state(document, principal), headers={"Cache-Control": "no-store"}
        )

    async def _relay(self, request: Request) -> Response:
        try:
            self.approvals.authorize(
                principal_of(request),
                Role.ADMIN,
                "call a sled's tools",
                request.path_params["project"],
            )
        except Forbidden as exc:
            return forbidden(exc)
        return await self.relay.handle(request)

    def state_document(self, limit: int | None) -> dict[str, Any]:
        """What ``GET /api/state`` serves and ``GET /api/events`` pushes."""
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
        return snap

    async def _json_body(
        self, request: Request, shape: str, limit: int | None = None
    ) -> tuple[Any, Response | None]:
        """(the parsed body, None), or (None, the 4xx that says why there is none);
        ``shape`` is what a body that is not JSON is told to look like."""
        try:
            raw = await read_body(request, limit or _MAX_DECISION_BODY, self.config.body_timeout)
            return json.loads(raw), None
        except BodyTooLarge:
            return None, error(413, "body too large")
        except BodyTooSlow:
            return None, error(408, f"body not received within {self.config.body_timeout} s")
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting deeper than json parses
            return None, error(400, shape)

    async def _post_decision(self, request: Request) -> Response:
        project = request.path_params["project"]
        req_id = request.path_params["req_id"]
        body, unreadable = await self._json_body(request, _DECISION_SHAPE)
        if unreadable is not None:
            return unreadable
        value = body.get("decision") if isinstance(body, dict) else None
        try:
            decision = Decision(value if isinstance(value, str) else "")
        except ValueError:
            return error(
                400, f"decision must be one of {[d.value for d in Decision]}, not {value!r}"
            )
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            return error(400, f"reason must be a string of at most {_MAX_REASON} characters")
        digest = body.get("input_sha256")
        if digest is not None and not (
            isinstance(digest, str) and _SHA256_HEX.fullmatch(digest) is not None
        ):
            return error(400, "input_sha256 must be 64 lowercase hex digits (SHA-256)")
        rule = body.get("rule")
        if rule is not None and not isinstance(rule, str):
            return error(400, "rule must be one of the request's suggested_rules (a string)")
        try:
            record = await self.approvals.decide(
                project,
                req_id,
                decision,
                principal_of(request),
                reason=reason,
                input_sha256=digest,
                rule=rule,
            )
        except Forbidden as exc:
            return forbidden(exc)
        except NotSuggested as exc:
            return error(400, str(exc))
        except VoteCounted as exc:
            return JSONResponse(
                {
                    "ok": True,
                    "state": "pending",
                    "message": str(exc),
                    "votes": [v.to_json() for v in exc.votes],
                    "needs": exc.needs,
                },
                status_code=202,
            )
        except VoteRefused as exc:
            return error(409, str(exc), votes=[v.to_json() for v in exc.votes], needs=exc.needs)
        except UnknownRequest as exc:
            return error(404, str(exc.args[0]))
        except AlreadyDecided as exc:
            return error(409, str(exc), decided=exc.record.to_json())
        except InputMismatch as exc:
            return error(409, str(exc), input_sha256=exc.item.input_sha256)
        except NotRecorded as exc:
            return error(
                503,
                "the decision could not be recorded, so it was not taken; "
                f"the request is still pending: {exc}",
            )
        return JSONResponse({"ok": True, "decided": record.to_json()})

    async def _get_permission(self, request: Request) -> Response:
        """One request: pending with its WHOLE input and hash (``/api/state`` may cut a
        big input down; a person approves only what this shows), or its decision."""
        project = request.path_params["project"]
        req_id = request.path_params["req_id"]
        try:
            self.approvals.authorize(
                principal_of(request), Role.VIEWER, "read permission requests", project
            )
        except Forbidden as exc:
            return forbidden(exc)
        try:
            item = self.state.pending_item(project, req_id)
        except AlreadyDecided as exc:
            votes = [
                v for v in await self.store.votes(project, req_id) if v.at <= exc.record.decided_at
            ]
            # The votes on the request under this id that was decided last.
            if votes:
                last = votes[-1].requested_at
                votes = [v for v in votes if v.requested_at == last]
            return JSONResponse(
                {
                    "state": exc.record.decision,
                    "decided": exc.record.to_json(),
                    "votes": [v.to_json() for v in votes],
                    "needs": votes[-1].needs if votes else 1,
                },
                headers={"Cache-Control": "no-store"},
            )
        except UnknownRequest as exc:
            return error(404, str(exc.args[0]))
        shown = item.to_json()
        for cut in ("input_truncated", "input_bytes"):  # what /api/state says of a cut input
            shown.pop(cut, None)
        shown["tool_input"] = item.tool_input
        shown["input_sha256"] = item.input_sha256
        return JSONResponse(
            {
                "state": "pending",
                "request": shown,
                "votes": [v.to_json() for v in self.approvals.ballot(project, req_id)],
                "needs": item.needs,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _get_audit(self, request: Request) -> Response:
        q = request.query_params
        principal = principal_of(request)
        try:
            self.approvals.authorize(
                principal,
                Role.VIEWER,
                "read the audit",
                q.get("project") or None,
                somewhere=not q.get("project"),
            )
        except Forbidden as exc:
            return forbidden(exc)
        try:
            limit = int_param(request, "limit", 100, 1, MAX_PAGE)
            before = int_param(request, "before", None, 1, 2**62)
            since = time_param(q.get("since"))
            decision = q.get("decision") or None
            if decision is not None and decision not in _AUDIT_DECISIONS:
                raise ValueError(f"decision must be one of {sorted(_AUDIT_DECISIONS)}")
        except ValueError as exc:
            return error(400, str(exc))
        assert limit is not None
        rows = await self.store.audit(
            project=q.get("project") or None,
            since=since,
            before=before,
            decision=decision,
            limit=limit,
            person=q.get("person") or None,
        )
        last = rows[-1].id if len(rows) == limit else None
        if not principal.everywhere:
            # Cut after the page is read: a page may hold fewer rows than asked.
            rows = [r for r in rows if principal.has(Role.VIEWER, r.project)]
        return JSONResponse(
            {"entries": [r.to_json() for r in rows], "next_before": last},
            headers={"Cache-Control": "no-store"},
        )

    async def _get_rules(self, request: Request) -> Response:
        principal = principal_of(request)
        try:
            self.approvals.authorize(principal, Role.VIEWER, "read the rules", somewhere=True)
        except Forbidden as exc:
            return forbidden(exc)
        everything = request.query_params.get("include_revoked", "") in ("1", "true", "yes")
        rules = await self.store.rules(include_revoked=everything)
        if not principal.everywhere:
            rules = [r for r in rules if r.project is None or principal.has(Role.VIEWER, r.project)]
        return JSONResponse(
            {"rules": [r.to_json() for r in rules]}, headers={"Cache-Control": "no-store"}
        )

    async def _post_rule(self, request: Request) -> Response:
        body, unreadable = await self._json_body(request, _RULE_SHAPE)
        if unreadable is not None:
            return unreadable
        if not isinstance(body, dict):
            return error(400, _RULE_SHAPE)
        if "rule" in body:
            return await self.rules_api.post_grammar_rule(request, body)
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
            return error(400, problem)
        assert isinstance(tool, str)
        assert isinstance(action, str)
        try:
            rule = await self.approvals.add_rule(
                Rule(0, project, tool, key, action, time.time(), "", "operator", reason),
                principal_of(request),
            )
        except Forbidden as exc:
            return forbidden(exc)
        return JSONResponse({"ok": True, "rule": rule.to_json()}, status_code=201)

    async def _delete_rule(self, request: Request) -> Response:
        text = request.path_params["rule_id"]
        if not ascii_digits(text) or len(text) > 18:
            return error(400, f"a rule id is a number, not {text[:40]!r}")
        try:
            rule = await self.approvals.revoke_rule(int(text), principal_of(request))
        except Forbidden as exc:
            return forbidden(exc)
        except UnknownRule as exc:
            return error(404, str(exc))
        except RuleRevoked as exc:
            return error(409, str(exc), rule=exc.rule.to_json())
        return JSONResponse({"ok": True, "rule": rule.to_json()})


def visible_state(document: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """The state document cut down to the sleds ``principal`` may view (itself when all)."""
    if principal.everywhere:
        return document
    seen = dict(document)
    seen["sleds"] = [s for s in document["sleds"] if principal.has(Role.VIEWER, s["project"])]
    seen["pending"] = [p for p in document["pending"] if principal.has(Role.VIEWER, p["project"])]
    seen["decisions"] = [
        d for d in document["decisions"] if principal.has(Role.VIEWER, d["project"])
    ]
    counts = dict.fromkeys(document["counts"], 0)
    for sled in seen["sleds"]:
        counts[sled["state"]] = counts.get(sled["state"], 0) + 1
    counts["sleds"] = len(seen["sleds"])
    counts["pending"] = len(seen["pending"])
    seen["counts"] = counts
    return seen


class _EventStream:
    """``GET /api/events`` for the request's principal: a viewer's stream carries only
    the sleds it may view (an ASGI app, so the stream is not buffered as a response)."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(HTTPConnection(scope))
        try:
            self.routes.approvals.authorize(
                principal, Role.VIEWER, "read the state", somewhere=True
            )
        except Forbidden as exc:
            await forbidden(exc)(scope, receive, send)
            return
        view = (
            None if principal.everywhere else functools.partial(visible_state, principal=principal)
        )
        await self.routes.live.serve(scope, receive, send, view)
