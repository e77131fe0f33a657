"""The local HTTP ingress: permission requests from any sled
process, plus status, readiness and Prometheus metrics.

A small ASGI app served by uvicorn inside the uplink's own event loop: a
caller waiting on ``POST /permission`` costs a coroutine, not a thread, so
thousands can wait at once. Every answer is JSON (but ``/metrics``).

The ingress is a security control (an approval a web page can forge is worse
than none), so every request passes :class:`RequestGuard` before any routing:
its ``Host`` must be allowed (DNS rebinding), a ``POST`` must be
``application/json`` and any ``Origin`` must be the ingress itself (CSRF), and
with an ingress token every endpoint but ``/healthz`` needs it. An early
answer (413, 415, ...) to a request whose body is still arriving is followed by
reading and discarding that body, within bounds, before the connection closes:
closing a socket with unread data makes the kernel reset it, and the client
then never sees the answer. Below the app, the server's protocol
(``actors/http_guard.py``, shared with the gateway) bounds the time a request
head and a whole request may take to arrive (408), the connections one client
may hold while sending requests, and all connections together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import importlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import uvicorn
from loguru import logger

from actors.config import check_bindable
from actors.context import UplinkContext
from actors.http_guard import (
    DISCONNECT_EXTENSION,
    DRAIN_MAX_BYTES,  # after an early answer, so it is not lost to a reset
    DRAIN_SECONDS,
    declares_body,
    drain,
    guarded_protocol,
)
from actors.permissions import new_request_id
from protocol import JSON, ConfigError, Decision, LocalProtocolError, Outcome, dumps, loads
from protocol.web import (
    LOOPBACK_HOSTS,
    ascii_digits,
    error_body,
    host_name,
    is_json_content_type,
    listen_host_entry,
    split_host,
)

MAX_BODY = 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_log = logger.bind(actor="ingress")

T = TypeVar("T")


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _ClientGone(Exception):
    """The HTTP client disconnected while its request waited for a decision."""


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call only once the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(scope: Scope, receive: Receive, waiting: asyncio.Future[T]) -> T:
    """Await ``waiting``; if the client disconnects first, cancel it and raise
    :class:`_ClientGone`. Nobody is left to read a late answer, and a request
    nobody waits for must not stay in front of a person.

    The calling task awaits ``waiting`` itself and is cancelled when the client
    goes away, so an answer wakes the handler in one turn of the loop (a
    shield and an ``asyncio.wait`` around it would add two callback hops, each
    a turn of the loop and an ``epoll_wait``). The server's protocol says when
    the client went away (its ``sled.on_disconnect`` extension, in
    ``actors/http_guard.py``); under a server without it, a watcher task
    waits in ``receive``. Whichever is settled first decides, once: a client
    found gone after ``waiting`` was settled changes nothing (its answer goes
    out to nobody: a decision is never turned into an abandonment); one found
    gone before cancels it, and whoever would settle it later finds it done
    (as for any cancelled wait).
    """
    if waiting.done():
        return waiting.result()
    # The future's loop is the running one: no get_running_loop (a getpid each).
    loop = waiting.get_loop()
    caller = asyncio.current_task(loop)
    assert caller is not None  # an ASGI handler always runs in a task
    gone = False

    def client_gone() -> None:
        nonlocal gone
        if not waiting.done():
            gone = True
            caller.cancel()

    async def watch() -> None:
        await _until_disconnect(receive)
        client_gone()

    on_disconnect = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    watcher = None
    if on_disconnect is not None:
        on_disconnect(client_gone)  # a no-op once waiting is settled
    else:
        watcher = loop.create_task(watch())
    try:
        return await waiting
    except asyncio.CancelledError:
        # A cancel from outside as well (the server stopping) stays a cancel.
        if not gone or caller.uncancel() > 0:
            raise
        raise _ClientGone from None
    finally:
        if watcher is not None:
            watcher.cancel()


class RequestGuard:
    """The checks every request passes before routing; pure (scope in, HttpError out).

    - ``Host`` in the allowlist, else 421: a DNS-rebinding page's requests
      carry its own name, whatever address that name now resolves to;
    - an ``Origin``, when sent, must be this ingress itself (an allowed host
      with the ingress's port), else 403: browsers send it on every
      cross-origin request and on every POST, even a ``no-cors`` one;
    - with a token, ``Authorization: Bearer <token>`` on every path but
      ``/healthz``, else 401 (compared in constant time);
    - ``POST`` only with ``Content-Type: application/json``, else 415: a page
      can send ``text/plain`` or a form anywhere without a CORS preflight, but
      not JSON.
    """

    def __init__(self, allowed_hosts: tuple[str, ...], port: int, token: str | None = None) -> None:
        # A malformed entry names no host (""), and "" is what a malformed Host reads as.
        self.allowed = frozenset(host_name(h) for h in allowed_hosts) - {""}
        self.port = port
        self._token = None if token is None else token.encode("utf-8")
        # The exact bytes a client usually sends for an allowed name (``name``,
        # ``name:port``; ``http://name:port`` as Origin), accepted without
        # parsing. Anything else is parsed; these sets only skip work.
        spelled = [f"[{n}]" if ":" in n else n for n in self.allowed if _plain_name(n)]
        self._plain_hosts = frozenset(
            h.encode("latin-1") for n in spelled for h in (n, f"{n}:{port}")
        )
        self._plain_origins = frozenset(f"http://{n}:{port}".encode("latin-1") for n in spelled)

    @classmethod
    def for_config(cls, config: Any, port: int) -> RequestGuard:
        hosts = [*LOOPBACK_HOSTS, *config.ingress_allowed_hosts]
        address = config.listen_address
        listen_host = None if address is None else listen_host_entry(address[0])
        if listen_host is not None:
            hosts.append(listen_host)
        return cls(tuple(hosts), port, config.ingress_token)

    def check(self, scope: Scope) -> None:
        host = origin = authorization = content_type = None
        for name, value in scope["headers"]:
            # A repeated security header is ambiguous: refuse rather than guess.
            if name == b"host":
                if host is not None:
                    raise HttpError(400, "more than one Host header")
                host = value
            elif name == b"content-type":
                content_type = value
            elif name == b"origin":
                if origin is not None:
                    raise HttpError(400, "more than one Origin header")
                origin = value
            elif name == b"authorization":
                if authorization is not None:
                    raise HttpError(400, "more than one Authorization header")
                authorization = value
        if host is None:
            raise HttpError(421, "a Host header is required")
        if host not in self._plain_hosts and host_name(host.decode("latin-1")) not in self.allowed:
            raise HttpError(421, "this Host is not served here (see --ingress-allowed-host)")
        if (
            origin is not None
            and origin not in self._plain_origins
            and not self._own_origin(origin.decode("latin-1"))
        ):
            raise HttpError(403, "cross-origin requests are refused")
        if self._token is not None and scope["path"] != "/healthz":
            self._authenticate(authorization)
        if scope["method"] == "POST" and not is_json_content_type(content_type):
            raise HttpError(415, "Content-Type must be application/json")

    def _own_origin(self, origin: str) -> bool:
        scheme, sep, rest = origin.strip().lower().partition("://")
        if not sep or scheme != "http" or "/" in rest or "@" in rest:
            return False  # "null", https://..., or not an origin at all
        parsed = split_host(rest)
        if parsed is None:
            return False
        name, port = parsed
        return name in self.allowed and (80 if port is None else port) == self.port

    def _authenticate(self, header: bytes | None) -> None:
        challenge = [(b"www-authenticate", b'Bearer realm="sled-uplink"')]
        if header is None:
            raise HttpError(401, "an Authorization: Bearer token is required", challenge)
        scheme, _, given = header.strip().partition(b" ")
        assert self._token is not None
        # compare_digest on bytes: its time does not depend on where they differ.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            raise HttpError(401, "wrong or malformed Authorization: Bearer token", challenge)


def _plain_name(name: str) -> bool:
    """Whether ``name`` reads back as itself from a Host and an Origin, byte for byte."""
    return name.isascii() and not any(c in name for c in "/@?# \t")


class _Body:
    """``receive`` that remembers whether the request body has been read to its end."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._receive = receive
        self._scope = scope
        self._read_to_end = False

    @property
    def ended(self) -> bool:
        # The head is read for a body only when the answer goes out before it
        # was read: a permission request's was always read by then.
        return self._read_to_end or not declares_body(self._scope)

    async def __call__(self) -> dict[str, Any]:
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            self._read_to_end = True
        return message

    async def drain(self) -> None:
        """Read and discard the rest of the body, within DRAIN_MAX_BYTES and DRAIN_SECONDS."""
        await drain(self, lambda: self.ended, DRAIN_MAX_BYTES, DRAIN_SECONDS)


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
            from actors.claude_code import regular_file
            from protocol.claude_code import updated_permissions

            rules: list[JSON] = list(updated_permissions(tool_name, tool_input, regular_file))
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


class Ingress:
    """The ASGI app plus the uvicorn server that runs it in the uplink's loop."""

    def __init__(
        self,
        ctx: UplinkContext,
        *,
        request_permission: Callable[..., asyncio.Future[Outcome]],
        status: Callable[[], dict[str, Any]],
        abandon: Callable[[str], None] | None = None,
    ) -> None:
        # What the ingress needs of the uplink, not the uplink itself:
        # ``request_permission(tool_name, tool_input, request_id=...)``, ``status()``
        # and ``abandon(request_id)`` (a caller went away: deny it, tell the gateway).
        self.request_permission = request_permission
        self.status = status
        self.abandon = abandon or (lambda _request_id: None)
        self.ctx = ctx
        self._prometheus: Any = None  # actors.metrics.UplinkMetrics, from the first GET /metrics
        self.waiting = 0
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self.guard: RequestGuard | None = None  # set once the port is known
        self._serving: concurrent.futures.Future[None] | None = None
        # Whole ASGI apps at a path (the MCP endpoint), after the same checks.
        self._mounts: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}
        self._mcp: Any = None  # actors.claude_code.McpEndpoint
        self._publish_lock = threading.Lock()
        self._http_state = "starting"
        self._mcp_state = "not_loaded"
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
        self.guard = RequestGuard.for_config(self.ctx.config, self.port)
        config = uvicorn.Config(
            self,
            # Head and whole-request deadlines and connection caps (the same
            # guard as the gateway's); its h11 is what "auto" picked anyway.
            http=guarded_protocol(
                header_timeout=self.ctx.config.ingress_header_timeout,
                request_timeout=self.ctx.config.ingress_request_timeout,
                max_connections=self.ctx.config.ingress_max_connections,
                max_per_client=self.ctx.config.ingress_max_connections_per_client,
                log_actor="ingress",
            ),
            log_config=None,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
            backlog=2048,
            # Nothing here reads the client's address or scheme from the request,
            # so uvicorn's X-Forwarded-* middleware would only be one more step a
            # request (and a way for a local process to restate where it came
            # from); and the Server header says nothing a caller needs.
            proxy_headers=False,
            server_header=False,
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
        self._publish(state="listening")

    def _publish(self, *, state: str | None = None, mcp: str | None = None) -> None:
        # ``mcp`` is the Claude Code endpoint's state: not_loaded until the first
        # request to /mcp, which loads the MCP SDK in a helper thread (loading),
        # then ready or unavailable, and stopped; the last word is what /status shows.
        with self._publish_lock:
            if state is not None:
                self._http_state = state
            if mcp is not None:
                self._mcp_state = mcp
            self.ctx.board.publish(
                "ingress", {"state": self._http_state, "port": self.port, "mcp": self._mcp_state}
            )

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
        self._publish(state="stopped", mcp="stopped")

    # ── ASGI ────────────────────────────────────────────────────────────

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = _Body(scope, receive)
        try:
            # One place, before any routing: every endpoint, present or added
            # later (the mounted MCP app too, dispatched below), is behind the
            # same Host, Origin, token and JSON checks.
            assert self.guard is not None
            self.guard.check(scope)
        except HttpError as exc:
            await _respond(send, body, exc.status, error_body(exc.message), exc.headers)
            return
        mounted = self._mounts.get(scope["path"])
        if mounted is not None:
            await _serve_mounted(mounted, scope, body, send)
            return
        methods = self._routes.get(scope["path"])
        extra: list[tuple[bytes, bytes]] = []
        try:
            if methods is None:
                raise HttpError(404, f"no such endpoint: {scope['path']}")
            handler = methods.get(scope["method"])
            if handler is None:
                raise HttpError(405, f"{scope['method']} is not allowed on {scope['path']}")
            status, answer = await handler(scope, body)
        except _ClientGone:
            return  # nobody to answer
        except HttpError as exc:
            status, answer = exc.status, error_body(exc.message)
            extra = exc.headers
        except Exception:  # every answer is JSON, even a bug's
            _log.exception("{} {} failed", scope["method"], scope["path"])
            status, answer = 500, error_body("internal error")
        if status == 405 and methods is not None:
            extra = [*extra, (b"allow", ", ".join(methods).encode())]
        await _respond(send, body, status, answer, extra)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not ascii_digits(value):
                    raise HttpError(400, "bad Content-Length")
                if int(value) > MAX_BODY:
                    raise HttpError(413, f"body is larger than {MAX_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(413, f"body is larger than {MAX_BODY} bytes")
            if not message.get("more_body"):
                # Usually the whole body came in one message (bytes(bytes) is no copy).
                return bytes(chunk) if not chunks else b"".join([*chunks, chunk])
            chunks.append(chunk)

    async def _permission(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        tool_name, tool_input, request_id = parse_permission_body(
            await self._read_body(scope, receive)
        )
        request_id = request_id or new_request_id()  # named here: abandon needs it
        try:
            future = self.request_permission(tool_name, tool_input, request_id=request_id)
        except (LocalProtocolError, RecursionError) as exc:
            raise HttpError(400, f"request cannot be forwarded: {exc}") from None
        # A client that goes away is abandoned (denied as caller_gone, and the
        # gateway withdraws it), never left for a person to answer. Its wait
        # cancelled the future, which the registry then leaves unsettled.
        self.waiting += 1
        try:
            outcome = await _unless_gone(scope, receive, future)
        except _ClientGone:
            _log.info("the caller of {!r} went away; abandoning it", request_id)
            self.abandon(request_id)
            raise
        finally:
            self.waiting -= 1
        return 200, permission_answer(outcome, tool_input, tool_name)

    async def _claude_hook(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        from actors.claude_code import answer_hook

        # Claude Code sends no Origin. The guard lets the ingress's own origin
        # through; here even that is refused, so no page at all, not even one
        # the ingress served, can queue questions for the humans. (The guard
        # already made a POST JSON.)
        if any(name == b"origin" for name, _ in scope["headers"]):
            raise HttpError(403, "requests from web pages are not accepted here")
        raw = await self._read_body(scope, receive)
        try:
            body = loads(raw)
        except (ValueError, RecursionError):
            raise HttpError(400, "body is not valid JSON") from None
        self.waiting += 1
        try:
            return 200, await _unless_gone(
                scope,
                receive,
                # A task of its own: cancelled when the caller leaves, its
                # wait abandons the request (see ``claude_code.ask``).
                asyncio.ensure_future(
                    answer_hook(
                        self.request_permission,
                        body,
                        self.ctx.config.hook_never_forward,
                        abandon=self.abandon,
                    )
                ),
            )
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        finally:
            self.waiting -= 1

    # ── the MCP endpoint (Claude Code's permission prompt) ──────────────

    def _start_mcp(self, host: str) -> None:
        from actors.claude_code import McpEndpoint

        def count(delta: int) -> None:
            self.waiting += delta

        config = self.ctx.config
        self._mcp = McpEndpoint(
            self.request_permission,
            self.ctx.loop,
            abandon=self.abandon,
            version=str(config.identity_extra.get("version", "")),
            permission_timeout=config.permission_timeout,
            progress_interval=config.claude_progress_interval,
            # The SDK's own Host/Origin check, a second wall behind the guard's.
            allowed_hosts=[*_listen_hosts(host), *config.ingress_allowed_hosts],
            waiting=count,
            on_state=lambda state: self._publish(mcp=state),
        )
        self._mounts["/mcp"] = self._mounts["/mcp/"] = self._mcp.handle

    def _stop_mcp(self, timeout: float) -> None:
        if self._mcp is not None:
            self._mcp.stop(timeout)

    async def _status(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        return 200, self.status()

    def _state(self) -> str:
        return str(self.status()["connection"].get("state", "unknown"))

    async def _healthz(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        state = self._state()
        return 200, {"ok": True, "connected": state == "connected", "state": state}

    async def _ready(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        state = self._state()
        ready = state == "connected"
        return (200 if ready else 503), {"ready": ready, "state": state}

    async def _metrics(self, _scope: Scope, _receive: Receive) -> tuple[int, Any]:
        # prometheus_client (with http.server, wsgiref and email) is imported on the
        # first scrape, in a worker thread so the loop keeps serving meanwhile; an
        # uplink nobody scrapes never loads it. A failed import is a JSON 500.
        if self._prometheus is None:
            loaded = await asyncio.to_thread(importlib.import_module, "actors.metrics")
            if self._prometheus is None:  # not made by another scrape meanwhile
                self._prometheus = loaded.UplinkMetrics(self.ctx)
        return 200, self._prometheus.exposition()


def _listen_hosts(host: str) -> list[str]:
    entry = listen_host_entry(host)
    return [] if entry is None else [entry]


async def _serve_mounted(
    app: Callable[..., Awaitable[None]], scope: Scope, body: _Body, send: Send
) -> None:
    """A mounted app (the MCP endpoint), whose bug answers in JSON too if it had not
    begun its answer; after that, the server cuts the connection."""
    began = False

    async def tracked(message: dict[str, Any]) -> None:
        nonlocal began
        began = began or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, body, tracked)
    except Exception:
        if began:
            raise
        _log.exception("{} {} failed", scope["method"], scope["path"])
        await _respond(send, body, 500, error_body("internal error"), [])


async def _respond(
    send: Send, body: _Body, status: int, answer: Any, extra: list[tuple[bytes, bytes]]
) -> None:
    """Send one answer: JSON, or Prometheus text for ``bytes``."""
    if isinstance(answer, bytes):
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        payload = answer
    else:
        content_type = b"application/json"
        payload = dumps(answer).encode("utf-8")
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
    headers += extra
    if body.ended:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    # Answered before the body was read (413, 415, 401, ...): send the answer
    # now, read what the client is still sending, then close, so the close is
    # a FIN after the answer, not a reset that discards it.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": True})
    await body.drain()
    await send({"type": "http.response.body", "body": b""})


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the uplink's owner (run_uplink.py,
    or an asyncio application that lent its loop) decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
