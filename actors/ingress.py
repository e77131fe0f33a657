"""The local HTTP ingress (PROTOCOL.md §3): permission requests from any sled
process, plus status, readiness and Prometheus metrics.

A small ASGI app served by uvicorn inside the uplink's own event loop: a
caller waiting on ``POST /permission`` costs a coroutine, not a thread, so
thousands can wait at once. Every answer is JSON (but ``/metrics``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from actors.config import check_bindable
from actors.context import UplinkContext
from protocol import JSON, ConfigError, Decision, LocalProtocolError, Outcome, dumps, loads

if TYPE_CHECKING:
    from actors.system import Uplink

MAX_BODY = 1024 * 1024
CONNECTION_STATES = ("disabled", "connecting", "connected", "backoff", "stopping", "stopped")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_log = logger.bind(actor="ingress")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def permission_answer(
    outcome: Outcome, tool_input: JSON, tool_name: str | None = None
) -> dict[str, JSON]:
    """The ``POST /permission`` answer, usable as Claude Code's permission-prompt result
    (with ``tool_name``, an always-allow carries Claude Code's session rule too)."""
    answer: dict[str, JSON] = {
        "request_id": outcome.request_id,
        "decision": str(outcome.decision),
        "reason": str(outcome.reason),
    }
    if outcome.decision is Decision.DENY:
        answer["behavior"] = "deny"
        answer["message"] = outcome.message
    else:
        answer["behavior"] = "allow"
        answer["updatedInput"] = tool_input
        if outcome.decision is Decision.ALWAYS_ALLOW and tool_name is not None:
            from protocol.claude_code import updated_permissions

            rules: list[JSON] = list(updated_permissions(tool_name, tool_input))
            if rules:
                answer["updatedPermissions"] = rules
    return answer


def parse_permission_body(raw: bytes) -> tuple[str, JSON, str | None]:
    """(tool_name, tool_input, request_id) from a request body, or HttpError 400."""
    try:
        body = loads(raw)
    except ValueError:
        raise HttpError(400, "body is not valid JSON") from None
    except RecursionError:
        raise HttpError(400, "body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    tool_name = body.get("tool_name")
    if not isinstance(tool_name, str) or not tool_name.strip():
        raise HttpError(400, "tool_name must be a non-empty string")
    # Claude Code's permission-prompt shape: input / tool_use_id (ours win if both).
    tool_input = body["tool_input"] if "tool_input" in body else body.get("input", {})
    request_id = body["request_id"] if "request_id" in body else body.get("tool_use_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        field = "request_id" if "request_id" in body else "tool_use_id"
        raise HttpError(400, f"{field} must be a non-empty string")
    return tool_name, tool_input, request_id


class _UplinkCollector(Collector):
    """Prometheus view of the same counters and gauges /status shows."""

    def __init__(self, ctx: UplinkContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterable[Any]:
        from actors.status import snapshot

        snap = snapshot(self.ctx)
        counters = snap.get("counters", {})
        gauges = snap.get("gauges", {})
        connection = snap.get("connection", {})
        state = GaugeMetricFamily(
            "sled_uplink_connection_state", "1 for the current connection state", labels=["state"]
        )
        for name in CONNECTION_STATES:
            state.add_metric([name], 1.0 if connection.get("state") == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "sled_uplink_permissions_pending",
            "Undecided permission requests",
            value=snap.get("permissions", {}).get("pending", 0),
        )
        yield GaugeMetricFamily(
            "sled_uplink_mcp_in_flight",
            "MCP replays running or waiting",
            value=gauges.get("mcp_in_flight", 0),
        )
        yield GaugeMetricFamily(
            "sled_uplink_backoff_seconds",
            "Current reconnect back-off wait (0 when connected)",
            value=connection.get("backoff") or 0 if connection.get("state") == "backoff" else 0,
        )
        families = [
            ("decisions", "decision", "Permission decisions by kind"),
            ("decision_reasons", "reason", "Permission decisions by reason"),
            ("frames_in", "type", "Frames received, by type"),
            ("frames_out", "type", "Frames sent, by type"),
            ("frames_dropped", "reason", "Inbound frames dropped, by reason"),
            ("sessions", "event", "Sessions that came up / ended"),
            ("actor_crashes", "role", "Actor crashes, by role"),
        ]
        for family, label, doc in families:
            metric = CounterMetricFamily(f"sled_uplink_{family}", doc, labels=[label])
            for key, value in sorted(counters.get(family, {}).items()):
                metric.add_metric([key], value)
            yield metric


class Ingress:
    """The ASGI app plus the uvicorn server that runs it in the uplink's loop."""

    def __init__(self, uplink: Uplink, ctx: UplinkContext) -> None:
        self.uplink = uplink
        self.ctx = ctx
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_UplinkCollector(ctx))
        self.waiting = 0
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        # Whole ASGI apps at a path (the MCP endpoint), after the same checks.
        self._mounts: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}
        self._mcp: Any = None  # actors.claude_code.McpEndpoint
        self._routes: dict[
            str, dict[str, Callable[[Scope, Receive], Awaitable[tuple[int, Any]]]]
        ] = {
            "/permission": {"POST": self._permission},
            "/status": {"GET": self._status},
            "/healthz": {"GET": self._healthz},
            "/ready": {"GET": self._ready},
            "/metrics": {"GET": self._metrics},
            "/hooks/claude-code": {"POST": self._claude_hook},
        }

    # ── lifecycle ───────────────────────────────────────────────────────

    def start(self) -> None:
        address = self.ctx.config.listen_address
        assert address is not None
        host, port = address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it: an answer written as headers + body
            # must not wait ~40 ms on Nagle and the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            check_bindable(address)  # raises ConfigError with the OS's words
            raise ConfigError("--listen", f"cannot listen on {host}:{port}") from None
        self._start_mcp(host)
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            log_config=None,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
            backlog=2048,
        )
        self._server = _QuietServer(config)
        self._serving = self.ctx.loop.spawn(self._server.serve, [sock])
        deadline = time.monotonic() + 5
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
            if time.monotonic() > deadline:
                raise RuntimeError("the HTTP ingress did not start within 5 s")
            time.sleep(0.005)
        _log.info(
            "ingress listening on http://{}:{}", host if ":" not in host else f"[{host}]", self.port
        )
        self.ctx.board.publish("ingress", {"state": "listening", "port": self.port})

    def stop(self, timeout: float = 2.0) -> None:
        if self._server is None or self._serving is None:
            return
        # Give answered callers a moment to receive their responses.
        deadline = time.monotonic() + timeout / 2
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop_mcp(timeout / 4)
        self._server.should_exit = True
        try:
            self._serving.result(timeout=timeout)
        except Exception as exc:
            _log.debug("ingress stop: {!r}", exc)
        self.ctx.board.publish("ingress", {"state": "stopped", "port": self.port})

    # ── ASGI ────────────────────────────────────────────────────────────

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        mounted = self._mounts.get(scope["path"])
        if mounted is not None:
            await mounted(scope, receive, send)
            return
        methods = self._routes.get(scope["path"])
        try:
            if methods is None:
                raise HttpError(404, f"no such endpoint: {scope['path']}")
            handler = methods.get(scope["method"])
            if handler is None:
                raise HttpError(405, f"{scope['method']} is not allowed on {scope['path']}")
            status, body = await handler(scope, receive)
        except HttpError as exc:
            status, body = exc.status, {"error": exc.message}
        except Exception:  # every answer is JSON, even a bug's
            _log.exception("{} {} failed", scope["method"], scope["path"])
            status, body = 500, {"error": "internal error"}
        if isinstance(body, bytes):
            content_type = b"text/plain; version=0.0.4; charset=utf-8"
            payload = body
        else:
            content_type = b"application/json"
            payload = dumps(body).encode("utf-8")
        headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
        if status == 405 and methods is not None:
            headers.append((b"allow", ", ".join(methods).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    raise HttpError(400, "bad Content-Length")
                if int(value) > MAX_BODY:
                    raise HttpError(413, f"body is larger than {MAX_BODY} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "client disconnected")
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                raise HttpError(413, f"body is larger than {MAX_BODY} bytes")
            if not message.get("more_body"):
                return bytes(body)

    async def _permission(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        tool_name, tool_input, request_id = parse_permission_body(
            await self._read_body(scope, receive)
        )
        try:
            future = self.uplink.arequest_permission(tool_name, tool_input, request_id=request_id)
        except (LocalProtocolError, RecursionError) as exc:
            raise HttpError(400, f"request cannot be forwarded: {exc}") from None
        # Wait without tying the decision to this caller: if the client goes
        # away, the shield keeps the request's future, so it is still decided
        # (and logged) as usual.
        self.waiting += 1
        try:
            outcome = await asyncio.shield(future)
        finally:
            self.waiting -= 1
        return 200, permission_answer(outcome, tool_input, tool_name)

    async def _claude_hook(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        from actors.claude_code import answer_hook

        # Claude Code posts JSON and sends no Origin: a browser's form or
        # cross-site fetch must not be able to queue questions for the humans.
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise HttpError(415, "the body must be sent as Content-Type: application/json")
        if b"origin" in headers:
            raise HttpError(403, "requests from web pages are not accepted here")
        raw = await self._read_body(scope, receive)
        try:
            body = loads(raw)
        except (ValueError, RecursionError):
            raise HttpError(400, "body is not valid JSON") from None
        self.waiting += 1
        try:
            return 200, await answer_hook(self.uplink, body, self.ctx.config.hook_never_forward)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        finally:
            self.waiting -= 1

    # ── the MCP endpoint (Claude Code's permission prompt) ──────────────

    def _start_mcp(self, host: str) -> None:
        from actors.claude_code import McpEndpoint

        def count(delta: int) -> None:
            self.waiting += delta

        self._mcp = McpEndpoint(
            self.uplink,
            self.ctx.loop,
            progress_interval=self.ctx.config.claude_progress_interval,
            allowed_hosts=[f"[{host}]" if ":" in host else host],
            waiting=count,
        )
        self._mcp.start()
        self._mounts["/mcp"] = self._mounts["/mcp/"] = self._mcp.handle

    def _stop_mcp(self, timeout: float) -> None:
        if self._mcp is not None:
            self._mcp.stop(timeout)

    async def _status(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        return 200, self.uplink.status()

    def _state(self) -> str:
        return str(self.uplink.status()["connection"].get("state", "unknown"))

    async def _healthz(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        state = self._state()
        return 200, {"ok": True, "connected": state == "connected", "state": state}

    async def _ready(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        state = self._state()
        ready = state == "connected"
        return (200 if ready else 503), {"ready": ready, "state": state}

    async def _metrics(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        return 200, generate_latest(self.registry)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the uplink's owner (run_uplink.py,
    or an asyncio application that lent its loop) decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
