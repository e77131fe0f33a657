"""``sled_gateway.uvicorn_adapter`` against the installed uvicorn.

The adapter reaches past uvicorn's documented API (its docstring says where and
why). A uvicorn release that renames or reshapes one of those internals must
fail here, by name, rather than quietly turn the gateway's slowloris defences
off. The first half checks each internal the adapter names; the second runs
the two limits on a real uvicorn server with real sockets.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState
from websockets.sync.client import connect

from actors.http_guard import DISCONNECT_EXTENSION
from sled_gateway.uvicorn_adapter import (
    READ_SIZE,
    GuardedH11Protocol,
    LeanWebSocketProtocol,
    NotifyingServer,
    guarded_protocol,
    reading_into_one_buffer,
)
from tests.conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
T = scaled(5.0)


# ── the internals the adapter names ─────────────────────────────────────────


def test_the_installed_uvicorn_is_the_pinned_minor_release() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    (pin,) = [r for r in pins if r.name == "uvicorn"]
    assert Version(uvicorn.__version__) in pin.specifier, (uvicorn.__version__, str(pin))


def test_h11_protocol_is_an_asyncio_protocol_config_accepts_as_a_class() -> None:
    assert issubclass(H11Protocol, asyncio.Protocol)
    assert "http" in inspect.signature(uvicorn.Config).parameters
    protocol = guarded_protocol(header_timeout=1.0, max_connections=2)
    config = uvicorn.Config(_app(), http=protocol, lifespan="off", log_config=None)
    config.load()
    assert config.http_protocol_class is protocol


def test_h11_protocol_takes_the_arguments_the_server_builds_it_with() -> None:
    parameters = list(inspect.signature(H11Protocol.__init__).parameters)
    assert parameters == ["self", "config", "server_state", "app_state", "_loop"]


def test_h11_protocol_keeps_its_h11_connection_in_conn() -> None:
    async def build() -> H11Protocol:
        config = uvicorn.Config(_app(), http="h11", lifespan="off", log_config=None)
        return H11Protocol(config=config, server_state=ServerState(), app_state={})

    protocol = asyncio.run(build())
    assert isinstance(protocol.conn, h11.Connection)
    assert protocol.conn.our_role is h11.SERVER
    assert protocol.conn.their_state is h11.IDLE  # no request head yet


def test_h11_protocol_keeps_the_running_loop_in_loop() -> None:
    """The deadlines' timers are set on ``protocol.loop`` (asking asyncio costs a getpid)."""

    async def build() -> bool:
        config = uvicorn.Config(_app(), http="h11", lifespan="off", log_config=None)
        protocol = H11Protocol(config=config, server_state=ServerState(), app_state={})
        return protocol.loop is asyncio.get_running_loop()

    assert asyncio.run(build())


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("connection_made", ["self", "transport"]),
        ("data_received", ["self", "data"]),
        ("on_response_complete", ["self"]),
        ("connection_lost", ["self", "exc"]),
    ],
)
def test_h11_protocol_has_the_methods_the_subclass_extends(
    method: str, parameters: list[str]
) -> None:
    assert list(inspect.signature(getattr(H11Protocol, method)).parameters) == parameters
    assert method in vars(GuardedH11Protocol)  # and the subclass still extends each one


def test_the_subclass_shadows_nothing_of_h11_protocol() -> None:
    """What the subclass adds must not collide with a name uvicorn has (or adds later)."""
    overridden = {"connection_made", "data_received", "on_response_complete", "connection_lost"}
    added = {n for n in vars(GuardedH11Protocol) if not n.startswith("__")} - overridden
    assert added, "nothing found to check"
    assert {n for n in added if hasattr(H11Protocol, n)} == set()

    async def build() -> GuardedH11Protocol:
        config = uvicorn.Config(_app(), lifespan="off", log_config=None)
        return GuardedH11Protocol(config=config, server_state=ServerState(), app_state={})

    instance = vars(asyncio.run(build()))
    plain = vars(asyncio.run(_plain_h11()))
    assert {n for n in instance if n in plain} == set(plain)  # only its own are new
    assert {n for n in instance if n not in plain} == {
        "_guard_transport",
        "_guard_timer",
        "_guard_start",
        "_guard_phase",
        "_guard_client",
        "_guard_proxy_header",
        "_guard_proxy_refused",
        "_guard_proxy_peer",
        "_guard_cycle",
        "_guard_on_gone",
    }


async def _plain_h11() -> H11Protocol:
    config = uvicorn.Config(_app(), lifespan="off", log_config=None)
    return H11Protocol(config=config, server_state=ServerState(), app_state={})


def test_the_request_cycle_has_what_the_408_uses() -> None:
    """``cycle.response_started``, ``disconnected`` and ``message_event``: the
    request deadline answers 408 only before a response began, and tells the
    handler the client is gone the way uvicorn's ``connection_lost`` does."""
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    source = inspect.getsource(RequestResponseCycle)
    for name in ("self.response_started", "self.disconnected", "self.message_event"):
        assert name in source, name
    assert "self.cycle.disconnected = True" in inspect.getsource(H11Protocol.connection_lost)
    assert "self.cycle.message_event.set()" in inspect.getsource(H11Protocol.connection_lost)
    receive = inspect.getsource(RequestResponseCycle.receive)
    assert "if self.disconnected or self.response_complete" in receive
    assert "if self.disconnected:" in inspect.getsource(RequestResponseCycle.send)


def test_server_startup_is_a_coroutine_taking_the_sockets() -> None:
    startup = uvicorn.Server.startup
    assert inspect.iscoroutinefunction(startup)
    assert list(inspect.signature(startup).parameters) == ["self", "sockets"]


def test_server_has_the_should_exit_flag_serve_stops_on() -> None:
    server = uvicorn.Server(uvicorn.Config(_app(), lifespan="off", log_config=None))
    assert vars(server)["should_exit"] is False  # the real server below stops when it is set


def test_stop_accepting_closes_the_listening_servers_startup_made() -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        config = uvicorn.Config(_app(), lifespan="off", log_config=None)
        server = NotifyingServer(config, on_started=started.set)
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        await asyncio.wait_for(started.wait(), 10)
        assert server.servers and all(isinstance(s, asyncio.Server) for s in server.servers)
        await server.stop_accepting()
        for listening in server.servers:
            await listening.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        server.request_exit()
        await asyncio.wait_for(serving, 10)

    asyncio.run(scenario())


# ── the limits on a real server ─────────────────────────────────────────────


def _app() -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    async def echo_body(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def slow(request: Request) -> PlainTextResponse:
        await request.body()
        await asyncio.sleep(1.0)  # a handler that takes its time once the body is in
        return PlainTextResponse("ok")

    async def hear(request: Request) -> PlainTextResponse:
        # Told when its client leaves before the answer; the answer comes after a while.
        request.scope["extensions"][DISCONNECT_EXTENSION](lambda: HEARD.append(request.url.path))
        await asyncio.sleep(float(request.query_params.get("after", "0")))
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/", ok),
            Route("/slow", slow, methods=["POST"]),
            Route("/echo", echo_body, methods=["POST"]),
            Route("/hear", hear),
            Route("/hear-too", hear),
            WebSocketRoute("/ws", echo),
        ]
    )


# The paths whose handlers were told that their client left, in order.
HEARD: list[str] = []


class Served:
    """A uvicorn server with the guarded protocol on a loopback port, in a thread."""

    def __init__(
        self, *, header_timeout: float, max_connections: int, buffered: bool = False, **limits: Any
    ) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        started = threading.Event()
        http: type[asyncio.Protocol] = guarded_protocol(
            header_timeout=header_timeout, max_connections=max_connections, **limits
        )
        ws: type[asyncio.Protocol] | str = "websockets-sansio"
        if buffered:  # as the gateway serves (sled_gateway/server.py)
            http, ws = reading_into_one_buffer(http), reading_into_one_buffer(LeanWebSocketProtocol)
        config = uvicorn.Config(
            _app(),
            http=http,
            ws=ws,
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=1,
        )
        self.server = NotifyingServer(config, on_started=started.set)
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True
        )
        self.thread.start()
        assert started.wait(T), "NotifyingServer never reported it was started"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=T)

    def stop(self) -> None:
        self.server.request_exit()
        self.thread.join(T)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[list[Served]]:
    servers: list[Served] = []
    yield servers
    for s in servers:
        s.stop()


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (waits up to the test timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while not answer.endswith(b"ok"):
        answer += sock.recv(65536)
    return answer


def test_a_request_head_must_arrive_in_time_on_each_cycle(served: list[Served]) -> None:
    s = Served(header_timeout=0.5, max_connections=10)
    served.append(s)
    with s.connect() as silent, s.connect() as keepalive:
        started = time.monotonic()
        assert b"200 OK" in _get(keepalive)  # in time: served, and the connection stays
        keepalive.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # then stalls
        assert _closed(silent)
        assert _closed(keepalive)
        assert 0.4 <= time.monotonic() - started < T


def test_the_head_deadline_counts_from_the_last_response_of_a_busy_connection(
    served: list[Served],
) -> None:
    """A keep-alive connection keeps one deadline timer across its requests: a
    timer that fires before the deadline then current waits on (requests made
    in time are served past the first deadline), and a head that then stalls
    is still cut at its own deadline."""
    s = Served(header_timeout=1.5, max_connections=10)
    served.append(s)
    with s.connect() as busy:
        started = time.monotonic()
        while time.monotonic() - started < 4.0:  # past two deadlines from the first response
            assert b"200 OK" in _get(busy)
            time.sleep(0.1)
        assert _still_open(busy)
        stalled = time.monotonic()
        busy.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _closed(busy)
        assert 1.0 <= time.monotonic() - stalled < T


def test_the_cap_evicts_the_oldest_idle_connection_and_never_a_websocket(
    served: list[Served],
) -> None:
    s = Served(header_timeout=60.0, max_connections=3)
    served.append(s)
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T) as ws:
        idle = [s.connect() for _ in range(4)]  # the cap lets two in beside the WebSocket
        try:
            assert _closed(idle[0])
            assert _closed(idle[1])
            with s.connect() as busy:
                assert b"200 OK" in _get(busy)
                assert _closed(idle[2])
            assert _still_open(idle[3])
            ws.send("still here")
            assert ws.recv(T) == "still here"
        finally:
            for sock in idle:
                sock.close()


def test_a_newcomer_is_closed_when_every_connection_is_busy(served: list[Served]) -> None:
    s = Served(header_timeout=60.0, max_connections=1)
    served.append(s)
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T) as ws:
        with s.connect() as newcomer:
            assert _closed(newcomer)  # the WebSocket counts toward the cap
        ws.send("still here")
        assert ws.recv(T) == "still here"


def test_a_websocket_that_left_frees_its_place_under_the_cap_at_once(
    served: list[Served],
) -> None:
    """A closed WebSocket's transport is swept when a newcomer finds the cap reached, not
    only by the upgraded sweep's timer: the place is free for the next connection."""
    s = Served(header_timeout=60.0, max_connections=1)
    served.append(s)
    s.server.config.http_protocol_class.upgraded_sweep_interval = 3600.0  # type: ignore[union-attr]
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T) as ws:
        ws.send("ping")
        assert ws.recv(T) == "ping"
    deadline = time.monotonic() + 2 * T
    while True:  # the server sees the close a moment after the client
        with s.connect() as newcomer:
            newcomer.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = newcomer.recv(65536)
                if not chunk:  # closed by the cap: try again
                    break
                answer += chunk
        if b"200 OK" in answer or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert b"200 OK" in answer


def test_an_upgraded_connection_counts_without_keeping_its_http_protocol(
    served: list[Served],
) -> None:
    s = Served(header_timeout=60.0, max_connections=10)
    served.append(s)
    protocol = s.server.config.http_protocol_class
    assert issubclass(protocol, GuardedH11Protocol)
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T) as ws:
        ws.send("ping")
        assert ws.recv(T) == "ping"
        assert list(protocol.open_transports.values()) == [None]


def test_a_burst_of_real_requests_from_one_client_is_not_cut_by_its_cap(
    served: list[Served],
) -> None:
    """The per-client cap counts again after a grace: connections that sent their
    request at once are past "receiving" by then, only stalled ones are closed."""
    s = Served(header_timeout=60.0, max_connections=500, max_per_client=4)
    served.append(s)
    socks = [s.connect() for _ in range(60)]  # all accepted before any head is read
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        for sock in socks:
            assert b"200 OK" in _get_answer(sock)
        stalled = [s.connect() for _ in range(6)]
        socks += stalled
        for sock in stalled:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        # Over the cap and still receiving after the grace: the oldest two go.
        assert _closed(stalled[0])
        assert _closed(stalled[1])
        time.sleep(0.2)
        assert all(_still_open(sock) for sock in stalled[2:])
    finally:
        for sock in socks:
            sock.close()


def _get_answer(sock: socket.socket) -> bytes:
    answer = b""
    while not answer.endswith(b"ok"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_the_request_deadline_counts_the_request_not_the_handler(served: list[Served]) -> None:
    s = Served(header_timeout=0.3, max_connections=10, request_timeout=0.5)
    served.append(s)
    with s.connect() as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi")
        assert b"200 OK" in _get_answer(sock)  # after 1 s: twice the deadline
    with s.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9\r\n\r\nhi")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'{"error":' in answer
        assert 0.4 <= time.monotonic() - started < T


class _WriteCounter:
    """The real transport, with its ``write`` calls counted (each is a system call)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def test_a_response_leaves_in_one_write_and_a_websocket_still_echoes(
    served: list[Served],
) -> None:
    """uvicorn writes a head and a body; the guarded protocol sends them as one
    write, so the client wakes for one segment, not two."""
    s = Served(header_timeout=60.0, max_connections=10)
    served.append(s)
    protocol = s.server.config.http_protocol_class
    writes: list[bytes] = []

    class Counted(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_WriteCounter(transport, writes))

    s.server.config.http_protocol_class = Counted
    with s.connect() as sock:
        for _ in range(3):  # keep-alive: every response of the connection
            writes.clear()
            answer = _get(sock)
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nok")
            assert writes == [answer]
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T) as ws:
        for text in ("one", "two"):
            writes.clear()
            ws.send(text)
            assert ws.recv(T) == text
            assert len(writes) == 1  # a frame is written at once, never held


def test_an_interim_100_continue_is_not_held_back(served: list[Served]) -> None:
    """A client that sends ``Expect: 100-continue`` waits for it before its body:
    the interim answer must leave at once, not wait for a body that never comes."""
    s = Served(header_timeout=60.0, max_connections=10)
    served.append(s)
    with s.connect() as sock:
        sock.sendall(
            b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"{}")
        answer = b""
        while not answer.endswith(b"ok"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK")


def test_uvicorn_reads_the_client_from_the_transports_socket_then_its_peername() -> None:
    """What lets a trusted proxy's PROXY header name the client of a WebSocket too
    (``actors/http_guard.py``): the wrapping transport hides the socket."""
    from uvicorn.protocols import utils

    class Transport(asyncio.Transport):
        def __init__(self, info: dict[str, Any]) -> None:
            super().__init__()
            self.info = info

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.info.get(name, default)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        with socket.create_connection(sock.getsockname()) as client:
            seen = Transport({"socket": client, "peername": ("192.0.2.7", 1)})
            assert utils.get_remote_addr(seen) == client.getpeername()
    assert utils.get_remote_addr(Transport({"peername": ("192.0.2.7", 1)})) == ("192.0.2.7", 1)
    # And the scheme from whether the transport's "sslcontext" is true.
    assert utils.is_ssl(Transport({"sslcontext": True})) is True
    assert utils.is_ssl(Transport({})) is False
    for name in ("http.h11_impl", "websockets.websockets_sansio_impl"):
        source = inspect.getsource(importlib.import_module(f"uvicorn.protocols.{name}"))
        assert "self.client = get_remote_addr(transport)" in source
        assert "is_ssl(transport)" in source


def test_a_handler_hears_once_that_its_client_left_before_the_answer(
    served: list[Served],
) -> None:
    """The disconnect extension: called once, at once, for a client that leaves while
    its handler works; never for one that left after its answer, nor for the next
    request's handler on the same connection."""
    HEARD.clear()
    s = Served(header_timeout=2.0, max_connections=10)
    served.append(s)
    with s.connect() as sock:  # answered, then two requests on the same connection
        assert _get_answer_of(sock, b"/hear").endswith(b"ok")
        assert _get_answer_of(sock, b"/hear").endswith(b"ok")
    with s.connect() as sock:
        sock.sendall(b"GET /hear-too?after=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.2)  # the handler is waiting
    deadline = time.monotonic() + T
    while not HEARD and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert HEARD == ["/hear-too"]


def _get_answer_of(sock: socket.socket, path: bytes) -> bytes:
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while not answer.endswith(b"ok"):
        answer += sock.recv(65536)
    return answer


def test_reads_into_one_buffer_a_thread_keep_every_byte_across_servers_and_reads(
    served: list[Served],
) -> None:
    """The gateway's protocols read into one buffer a thread (no new 256 KiB block a
    read): bodies and WebSocket messages several buffers long, sent to two servers on
    two loop threads at once, come back byte for byte."""
    servers = [Served(header_timeout=60.0, max_connections=10, buffered=True) for _ in range(2)]
    served.extend(servers)
    for s in servers:
        assert issubclass(s.server.config.http_protocol_class, asyncio.BufferedProtocol)
        assert issubclass(s.server.config.ws_protocol_class, asyncio.BufferedProtocol)
    errors: list[BaseException] = []

    def client(s: Served, seed: int) -> None:
        try:
            for size in (10, READ_SIZE - 1, READ_SIZE + 1, 5 * READ_SIZE + 7):
                body = bytes((seed + i * 7) % 251 for i in range(size))
                with s.connect() as sock:
                    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
                    sock.sendall(head.encode() + body)
                    answer = b""
                    while not answer.endswith(body) and len(answer) < size + 4096:
                        chunk = sock.recv(1 << 20)
                        assert chunk, "closed before the whole echo"
                        answer += chunk
                    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(body)
                text = "".join(chr(97 + (seed + i) % 26) for i in range(size))
                with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=T, max_size=None) as ws:
                    ws.send(text)
                    assert ws.recv(T) == text
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(s, seed))
        for seed, s in enumerate(servers * 2)  # two clients a server, all at once
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 6)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
