"""Real local HTTP servers for testing the uplink's MCP replay.

The replay client POSTs raw JSON-RPC text to a *local MCP URL* and must cope
with everything a Streamable-HTTP server can do to it. Mocks of httpx would only
prove that the client agrees with itself, so these helpers run real servers on
127.0.0.1 (never another interface) in background threads:

* :class:`McpSdkServer` -- the official MCP Python SDK (``mcp`` 2.x,
  ``MCPServer``) served by uvicorn, in either of the SDK's two shapes:
  *stateful SSE* (the default: ``Mcp-Session-Id`` on initialize, answers as
  ``text/event-stream``) or *stateless JSON* (``stateless_http=True,
  json_response=True``). :meth:`McpSdkServer.restart` comes back on the same
  port with no memory of its sessions, which is exactly what "404 on a stale
  Mcp-Session-Id -> re-initialize" needs.
* :class:`StatusServer` -- answers every request with one fixed status/body.
* :class:`SilentServer` -- accepts and reads the request, never answers.
* :func:`closed_port_url` -- a URL whose port refuses connections.
* :class:`RecordingJsonServer` -- a trivial scripted JSON-RPC server that
  records every request's headers and body (to assert ``Accept``,
  ``Mcp-Session-Id``, ``MCP-Protocol-Version``), optionally answering over SSE
  and issuing / expiring session ids.

All servers are context managers; leaving the ``with`` block stops the server
and joins its threads, so tests leak neither threads nor sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

import anyio
import mcp_types as types
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

__all__ = [
    "MCP_ACCEPT",
    "McpSdkServer",
    "RecordedRequest",
    "RecordingJsonServer",
    "SilentServer",
    "StatusServer",
    "build_mcp_server",
    "closed_port_url",
]

LOOPBACK = "127.0.0.1"

#: The Accept header Streamable HTTP requires on every POST.
MCP_ACCEPT = "application/json, text/event-stream"


# --------------------------------------------------------------------------- #
# Recorded requests (shared by every server here)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as a server here saw it.

    ``headers`` keys are lower-cased (HTTP header names are case-insensitive;
    lower-casing makes ``req.headers["mcp-session-id"]`` reliable).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (raises on non-JSON bodies)."""
        return json.loads(self.body)


class _Recorder:
    """Thread-safe request log with a blocking wait, shared by the servers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[RecordedRequest] = []

    def add(self, req: RecordedRequest) -> None:
        with self._cond:
            self._items.append(req)
            self._cond.notify_all()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived; raise on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= count, timeout):
                raise TimeoutError(f"expected {count} requests, got {len(self._items)}")
            return list(self._items)


def _bind_loopback(port: int = 0) -> socket.socket:
    # SO_REUSEADDR lets a restarted server rebind its old port even while the
    # previous incarnation's connections sit in TIME_WAIT.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- #
# The MCP SDK server
# --------------------------------------------------------------------------- #


def build_mcp_server(name: str = "sled-uplink-test") -> MCPServer:
    """A fresh SDK ``MCPServer`` with the test tools.

    A fresh instance per start matters: the SDK's
    ``StreamableHTTPSessionManager.run()`` can run only once per instance.
    Every tool is ``async`` on purpose: the SDK runs sync tools in anyio
    worker threads, which would outlive the test and make overlapping
    ``sleep`` calls depend on the thread pool.
    """
    mcp = MCPServer(name)

    @mcp.tool()
    async def echo(text: str) -> str:
        """Return ``text`` unchanged."""
        return text

    @mcp.tool()
    async def sleep(seconds: float) -> str:
        """Sleep without blocking the server, so concurrent calls overlap."""
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @mcp.tool()
    async def add(a: int, b: int) -> int:
        """Return ``a + b``."""
        return a + b

    @mcp.tool()
    async def log_then_echo(text: str, ctx: Context) -> str:
        """Send a ``notifications/message`` before answering.

        In stateful SSE mode the notification travels on the request's own
        SSE stream ahead of the response: the replay client must skip it and
        wait for the message whose id matches.
        """
        # Not ctx.info(): that API warns MCPDeprecationWarning in mcp 2.x. A
        # notification tied to the request id rides that request's stream.
        await ctx.session.send_notification(
            types.LoggingMessageNotification(
                params=types.LoggingMessageNotificationParams(
                    level="info", data=f"about to echo {text!r}"
                )
            ),
            related_request_id=ctx.request_id,
        )
        return text

    return mcp


class _RecordingAsgi:
    """ASGI wrapper that logs each HTTP request (method, path, headers, body).

    The body is read in full *before* the SDK app runs and then handed to it
    unchanged, so requests the SDK rejects without reading (406, 404, 421...)
    are recorded too.
    """

    def __init__(self, app: Any, recorder: _Recorder) -> None:
        self._app = app
        self._recorder = recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan passes straight through
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self._recorder.add(RecordedRequest(scope["method"], scope["path"], headers, body))

        replayed = False

        async def replay_receive() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect

        await self._app(scope, replay_receive, send)


class McpSdkServer:
    """The official MCP SDK's Streamable HTTP server, on 127.0.0.1, in a thread.

    ``McpSdkServer()`` is the SDK default, *stateful SSE*;
    ``McpSdkServer(stateless=True)`` is *stateless JSON* (``json_response``
    follows ``stateless`` unless given). Use as a context manager::

        with McpSdkServer() as srv:
            httpx.post(srv.url, ...)
            srv.restart()          # same port, every session forgotten

    ``requests`` lists what reached the server (headers and body), across
    restarts, so tests can assert what the replay client actually sent.
    """

    def __init__(
        self,
        *,
        stateless: bool = False,
        json_response: bool | None = None,
        port: int = 0,
        path: str = "/mcp",
        session_idle_timeout: float | None = None,
        startup_timeout: float = 10.0,
        graceful_shutdown: float = 0.3,
    ) -> None:
        self.stateless = stateless
        self.json_response = stateless if json_response is None else json_response
        self.path = path
        self.session_idle_timeout = session_idle_timeout
        self.startup_timeout = startup_timeout
        # Bounds how long stop() waits for in-flight responses (e.g. a long
        # `sleep` call or an open SSE stream) before uvicorn cancels them.
        self.graceful_shutdown = graceful_shutdown
        self._port = port
        self._recorder = _Recorder()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.mcp: MCPServer | None = None

    # -- addressing ---------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("server not started yet")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._recorder.requests

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self._recorder.wait_for(count, timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> McpSdkServer:
        if self.running:
            raise RuntimeError("already running")
        # Bind here, in the caller's thread, so "port in use" raises right here
        # and port 0 is resolved before anyone asks for .url.
        sock = _bind_loopback(self._port)
        self._port = sock.getsockname()[1]

        self.mcp = build_mcp_server()
        kwargs: dict[str, Any] = {}
        if self.session_idle_timeout is not None:
            kwargs["session_idle_timeout"] = self.session_idle_timeout
        app = self.mcp.streamable_http_app(
            streamable_http_path=self.path,
            stateless_http=self.stateless,
            json_response=self.json_response,
            # The SDK would auto-enable DNS-rebinding protection for host
            # 127.0.0.1 with "127.0.0.1:*" allowed, so a random port passes
            # anyway; spelling it out keeps the tests independent of that
            # default while still exercising the Host/Origin checks.
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=[f"{LOOPBACK}:*", "localhost:*"],
                allowed_origins=[f"http://{LOOPBACK}:*", "http://localhost:*"],
            ),
            **kwargs,
        )
        config = uvicorn.Config(
            _RecordingAsgi(app, self._recorder),
            # No log_config / log_level: uvicorn would otherwise reconfigure
            # its (process-global) loggers, under the feet of other tests.
            log_config=None,
            log_level=None,
            lifespan="on",  # the lifespan runs the SDK's session manager
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=self.graceful_shutdown,  # type: ignore[arg-type]
        )
        server = uvicorn.Server(config)
        self._server, self._error = server, None

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        def run() -> None:
            try:
                # A private event loop per incarnation; uvicorn skips signal
                # handlers off the main thread, so the test's own stay intact.
                asyncio.run(serve())
            except BaseException as exc:  # incl. SystemExit on lifespan failure
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"mcp-sdk-{self._port}", daemon=True)
        self._thread.start()

        # `started` flips once the listening socket is serving; before that a
        # client would race the lifespan startup.
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not self._thread.is_alive():
                self.stop()  # forget the dead incarnation
                raise RuntimeError(f"MCP SDK server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"MCP SDK server did not start within {self.startup_timeout}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the server thread (quick: ~0.2 s idle, + graceful cap)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._end_sessions()
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():  # graceful shutdown stuck: stop waiting on connections
            server.force_exit = True
            thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("MCP SDK server thread did not stop")
        self._server = self._thread = self._loop = None

    def _end_sessions(self) -> None:
        """Terminate the SDK's live sessions before uvicorn shuts down.

        Why: left to uvicorn, a call still running on a stateful session is
        cancelled at the graceful-shutdown cap, and then the SDK spends a full
        second (its _SHUTDOWN_WRITE_TIMEOUT) trying to write an error onto the
        dead stream. Terminating the session transports first ends their
        streams at once (the client sees its SSE response end without a
        result), making stop() ~0.2 s instead of ~1.5 s. This uses the session
        manager's private session table, hence the defensive getattr: if an SDK
        update removes it, stop() just gets slower, not broken.
        """
        loop, mcp = self._loop, self.mcp
        if loop is None or mcp is None:
            return
        try:
            sessions = getattr(mcp.session_manager, "_server_instances", None)
        except RuntimeError:
            return
        if not sessions:
            return

        async def terminate_all() -> None:
            for transport in list(sessions.values()):
                with contextlib.suppress(Exception):
                    await transport.terminate()

        with contextlib.suppress(Exception):  # loop already closing: nothing to end
            asyncio.run_coroutine_threadsafe(terminate_all(), loop).result(1.0)

    def restart(self) -> None:
        """Stop, then start a *new* SDK app on the same port: all sessions forgotten."""
        self.stop()
        self.start()

    def __enter__(self) -> McpSdkServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- #
# Misbehaving plain HTTP servers
# --------------------------------------------------------------------------- #


class _ThreadedHttpServer:
    """Base: a stdlib ThreadingHTTPServer on 127.0.0.1 run in a thread.

    Subclasses implement :meth:`handle` (called per request, in the handler's
    thread, after the body was read and recorded).
    """

    path = "/mcp"

    def __init__(self, *, port: int = 0) -> None:
        self._recorder = _Recorder()
        self._stopping = threading.Event()
        # Open client connections, so stop() can cut idle keep-alive ones:
        # their handler threads would otherwise block server_close() forever.
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real servers

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

            def setup(self) -> None:
                super().setup()
                with owner._conns_lock:
                    owner._conns.add(self.connection)

            def finish(self) -> None:
                with owner._conns_lock:
                    owner._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner._recorder.add(RecordedRequest(self.command, self.path, headers, body))
                owner.handle(self, body)

            do_POST = do_GET = do_DELETE = do_PUT = _any

        class Server(ThreadingHTTPServer):
            # Non-daemon handler threads: server_close() joins them all, so
            # nothing outlives the `with` block.
            daemon_threads = False
            block_on_close = True

            def server_bind(self) -> None:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.socket.bind(self.server_address)
                self.server_address = self.socket.getsockname()

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up mid-response is expected here

        self._httpd = Server((LOOPBACK, port), Handler)
        self._thread: threading.Thread | None = None

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{self.path}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._recorder.requests

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self._recorder.wait_for(count, timeout)

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases handlers parked by SilentServer
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()  # joins handler threads

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _send(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    h.send_response(status)
    if content_type is not None:
        h.send_header("Content-Type", content_type)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if status not in (204, 304) and not 100 <= status < 200:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if body and status not in (204, 304):
        h.wfile.write(body)
    h.wfile.flush()


class StatusServer(_ThreadedHttpServer):
    """Answers every request with one fixed status, body and content type.

    E.g. ``StatusServer(500)``, ``StatusServer(404)`` (stale session),
    ``StatusServer(200, body="not json", content_type="application/json")``
    (unreadable answer), ``StatusServer(204, body=b"")``.
    """

    def __init__(
        self,
        status: int = 500,
        body: str | bytes = b"Internal Server Error",
        content_type: str | None = "text/plain",
        headers: Mapping[str, str] | None = None,
        *,
        port: int = 0,
    ) -> None:
        super().__init__(port=port)
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.extra_headers = dict(headers or {})

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        _send(h, self.status, self.body, self.content_type, self.extra_headers)


class SilentServer(_ThreadedHttpServer):
    """Accepts the connection, reads the whole request, never answers.

    The connection is held open until the server stops, so the client sees a
    read timeout, not a reset. ``wait_for_requests(1)`` proves the request got
    here (i.e. a timeout is not a connect failure).
    """

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        self._stopping.wait()
        h.close_connection = True


_reserved_sockets: list[socket.socket] = []


def closed_port_url(path: str = "/mcp") -> str:
    """A URL on 127.0.0.1 where connecting is refused.

    The port is bound but never listened on, and the socket is kept for the
    life of the process: on Linux a connect then gets ECONNREFUSED, and no
    other server (or an outgoing connection's ephemeral port) can take the
    port in the meantime -- unlike "bind, read the port, close".
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    _reserved_sockets.append(sock)
    return f"http://{LOOPBACK}:{sock.getsockname()[1]}{path}"


class RecordingJsonServer(_ThreadedHttpServer):
    """A scripted JSON-RPC "MCP" server that records every request.

    * A request (object with an ``id``) gets
      ``{"jsonrpc":"2.0","id":<id>,"result":{"echo":<params>}}``; the
      ``initialize`` result additionally names ``protocolVersion`` (the
      ``protocol_version`` argument, else the one the client asked for), as a
      real server does, so the client has something to put in
      ``MCP-Protocol-Version``.
    * A notification or a response (no ``id`` / no ``method``) gets 202, empty.
    * A batch (JSON array) gets an array of answers to its requests (202 if it
      holds none).
    * Non-JSON body: 400 with a JSON-RPC parse error.
    * ``sse=True``: answers are ``text/event-stream``: a comment, a
      ``notifications/message`` event (server -> client, no id), then one event
      per response.
    * ``sessions=True``: each ``initialize`` issues a new ``Mcp-Session-Id``
      (``sess-1``, ``sess-2``, ...); a request carrying an id not issued (or
      forgotten via :meth:`expire_sessions`) gets 404, as the SDK does.
      Requests without an id are served (this server is lenient).
    """

    #: The server -> client event sent ahead of the response(s) when ``sse=True``.
    NOTIFICATION: ClassVar[dict[str, Any]] = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": "working on it"},
    }

    def __init__(
        self,
        *,
        sse: bool = False,
        sessions: bool = False,
        protocol_version: str | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(port=port)
        self.sse = sse
        self.sessions = sessions
        self.protocol_version = protocol_version
        self._lock = threading.Lock()
        self._next_session = itertools.count(1)
        self._live_sessions: set[str] = set()
        self.issued_sessions: list[str] = []

    def expire_sessions(self) -> None:
        """Forget every session id: later requests carrying one get 404."""
        with self._lock:
            self._live_sessions.clear()

    def _answer(self, msg: Any) -> dict[str, Any] | None:
        if not isinstance(msg, dict) or "id" not in msg or "method" not in msg:
            return None  # notification, or a client's response to us
        params = msg.get("params")
        result: dict[str, Any] = {"echo": params}
        if msg["method"] == "initialize":
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            result["protocolVersion"] = self.protocol_version or asked or "2025-06-18"
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        try:
            parsed = json.loads(body)
        except ValueError:
            err = {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": -32700, "message": "Parse error"},
            }
            _send(h, 400, json.dumps(err).encode(), "application/json")
            return

        extra: dict[str, str] = {}
        if self.sessions:
            sid = h.headers.get("Mcp-Session-Id")
            with self._lock:
                if sid is not None and sid not in self._live_sessions:
                    err = {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {"code": -32600, "message": "Session not found"},
                    }
                    _send(h, 404, json.dumps(err).encode(), "application/json")
                    return
                msgs = parsed if isinstance(parsed, list) else [parsed]
                if any(isinstance(m, dict) and m.get("method") == "initialize" for m in msgs):
                    sid = f"sess-{next(self._next_session)}"
                    self._live_sessions.add(sid)
                    self.issued_sessions.append(sid)
                    extra["Mcp-Session-Id"] = sid

        if isinstance(parsed, list):
            answers = [a for a in map(self._answer, parsed) if a is not None]
            payload: Any = answers or None
        else:
            answers = [a] if (a := self._answer(parsed)) is not None else []
            payload = answers[0] if answers else None

        if payload is None:
            # Like the SDK: 202, empty body, yet Content-Type application/json.
            _send(h, 202, b"", "application/json", extra)
        elif self.sse:
            events = [
                ": recording server\n\n",
                f"event: message\ndata: {json.dumps(self.NOTIFICATION)}\n\n",
            ]
            events += [f"event: message\ndata: {json.dumps(a)}\n\n" for a in answers]
            extra["Cache-Control"] = "no-cache"
            _send(h, 200, "".join(events).encode(), "text/event-stream", extra)
        else:
            _send(h, 200, json.dumps(payload).encode(), "application/json", extra)
