"""Peer processes for the benchmark, each on 127.0.0.1 with its port on stdout.

    python -m bench.peers gateway --auto approve|silent   # a minimal WebSocket gateway
    python -m bench.peers http                            # trivial HTTP JSON server
    python -m bench.peers jsonrpc                         # trivial local JSON-RPC server
    python -m bench.peers relay WS_URL [--timeout S]      # the ingress's floor (below)
    python -m bench.peers bare-relay WS_URL               # the same hop with no parts

They run in their own processes so that the process being measured does not
share a GIL with its peers. Every bench process, peers and clients alike, runs
the event loop the uplink and the gateway run (:func:`new_event_loop`): a raw
baseline on a slower loop than the process it is compared with would flatter it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

APPROVE = {"approved": True, "always_allow": False}
#: Seconds the floor relay waits for the gateway's answer before its 504.
RELAY_TIMEOUT = 30.0
JSON_HEADERS = [(b"content-type", b"application/json")]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop the uplink's own thread and the gateway run (``actors.loop.new_event_loop``):
    uvloop's where it is installed, else asyncio's. A copy, not an import, so that
    the bench also runs against an older checkout, whose ``actors`` may not have it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def gateway(auto: str) -> None:
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosedError

    async def handler(ws: Any) -> None:
        # A client killed at the end of a bench closes without a close frame: that is
        # its end, not the peer's failure (a traceback in the bench's output).
        with contextlib.suppress(ConnectionClosedError):
            async for message in ws:
                frame = json.loads(message)
                if frame["type"] == "perm_request" and auto == "approve":
                    await ws.send(
                        json.dumps(
                            {"type": "perm_response", "req_id": frame["req_id"], "payload": APPROVE}
                        )
                    )

    async with serve(handler, "127.0.0.1", 0, max_size=None, ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


async def _request_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _asgi(answer: Any) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        payload = json.dumps(answer(await _request_body(receive))).encode()
        # A length, as every answer of the uplink and the gateway has: without one the
        # server sends the body chunked, more bytes and more writes than theirs.
        headers = [*JSON_HEADERS, (b"content-length", b"%d" % len(payload))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def _jsonrpc_answer(body: bytes) -> Any:
    request = json.loads(body)
    return {"jsonrpc": "2.0", "id": request.get("id"), "result": {"ok": True}}


class _RelaySocket(asyncio.Protocol):
    """The relay's WebSocket: websockets' sans-I/O client on an asyncio transport, as
    the uplink's own (``actors/websocket.py``), with nothing but the frames."""

    def __init__(self, url: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(url))
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.opened = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self.transport.write(b"".join(self.protocol.data_to_send()))

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Opcode

        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if not self.opened.done():
                self.opened.set_result(None)  # the handshake's response
            elif event.opcode is Opcode.TEXT:
                frame = json.loads(event.data)
                waiter = self.waiting.pop(frame.get("req_id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame["payload"])
        if out := self.protocol.data_to_send():
            self.transport.write(b"".join(out))

    def send(self, frame: Any) -> None:
        self.protocol.send_text(json.dumps(frame, separators=(",", ":")).encode())
        self.transport.write(b"".join(self.protocol.data_to_send()))


async def relay(url: str, timeout: float = RELAY_TIMEOUT) -> None:
    """The floor of the ingress's stack: ``POST /permission`` relayed as a
    ``perm_request`` and answered with the gateway's decision, in an answer of the
    ingress's shape, on the same parts (uvicorn's h11 server, websockets' sans-I/O
    client, the same loop), with none of the uplink's checks, limits, registry or
    fail-closed paths. What the uplink costs above it is its own."""
    from urllib.parse import urlsplit

    loop = asyncio.get_running_loop()
    where = urlsplit(url)
    _, ws = await loop.create_connection(lambda: _RelaySocket(url), where.hostname, where.port)
    await ws.opened
    ws.send({"type": "identity", "req_id": "identity", "payload": {"project": "relay"}})
    ids = itertools.count()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = json.loads(await _request_body(receive))
        request_id = f"relay-{next(ids)}"
        waiter = loop.create_future()
        ws.waiting[request_id] = waiter
        ws.send(
            {
                "type": "perm_request",
                "req_id": request_id,
                "payload": {"tool_name": request["tool_name"], "tool_input": request["tool_input"]},
            }
        )
        # The uplink fails closed after a timeout; the floor answers too rather than
        # hold a bench's client for ever on a gateway that stopped answering.
        timer = loop.call_later(timeout, _settle, waiter, None)
        decision = await waiter
        timer.cancel()
        if decision is None:
            ws.waiting.pop(request_id, None)
            error = json.dumps({"error": "the gateway did not answer"}).encode()
            await send({"type": "http.response.start", "status": 504, "headers": JSON_HEADERS})
            await send({"type": "http.response.body", "body": error})
            return
        approved = decision.get("approved") is True
        answer = {
            "request_id": request_id,
            "decision": "approve" if approved else "deny",
            "reason": "gateway",
            "behavior": "allow" if approved else "deny",
            "updatedInput": request["tool_input"],
        }
        payload = json.dumps(answer).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    await http_server(app)


def _settle(waiter: asyncio.Future[Any], value: Any) -> None:
    if not waiter.done():
        waiter.set_result(value)


#: The bare relay's answer: the ingress's keys and size, fixed.
_BARE_ANSWER = json.dumps(
    {
        "request_id": "bare-relay",
        "decision": "approve",
        "reason": "gateway",
        "behavior": "allow",
        "updatedInput": {"command": "ls"},
    }
).encode()
_BARE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_BARE_ANSWER), _BARE_ANSWER)
)


class _BareSocket(_RelaySocket):
    """The bare relay's WebSocket: the handshake as the relay's, then every answer
    frame taken by its length alone (the peer's frames are unmasked and final)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.bare = False
        self.buffer = b""
        self.callers: collections.deque[asyncio.Transport] = collections.deque()

    def data_received(self, data: bytes) -> None:
        if not self.bare:
            super().data_received(data)
            return
        buffer = self.buffer + data
        while len(buffer) >= 2:
            size, head = buffer[1] & 0x7F, 2
            if size == 126:
                size, head = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                size, head = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < head + size:
                break
            buffer = buffer[head + size :]
            # The peer answers one connection in order: the oldest caller's answer.
            self.callers.popleft().write(_BARE_RESPONSE)
        self.buffer = buffer


class _BareHttp(asyncio.Protocol):
    """Each request (a head and its ``Content-Length`` bytes) sends one fixed frame."""

    def __init__(self, ws: _BareSocket, frame: bytes) -> None:
        self.ws, self.frame, self.buffer = ws, frame, b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            size = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + size:
                return
            self.buffer = self.buffer[end + 4 + size :]
            self.ws.callers.append(self.transport)
            self.ws.transport.write(self.frame)


async def bare_relay(url: str) -> None:
    """The same hop as :func:`relay` with no parts on it: a request's bytes are not
    parsed (but for its length), each sends one fixed ``perm_request`` frame, and each
    answer frame, taken by its length, sends one fixed answer of the ingress's size.
    The WebSocket handshake is websockets'. What :func:`relay` costs above it is its
    parts' (uvicorn, h11, the ASGI app, websockets per frame), not the hop's: the
    extra process on the path, its wake-ups and its two sockets."""
    from urllib.parse import urlsplit

    loop = asyncio.get_running_loop()
    where = urlsplit(url)
    _, ws = await loop.create_connection(lambda: _BareSocket(url), where.hostname, where.port)
    await ws.opened
    ws.send({"type": "identity", "req_id": "identity", "payload": {"project": "bare-relay"}})
    request = {"tool_name": "Bash", "tool_input": {"command": "ls"}}
    ws.protocol.send_text(
        json.dumps({"type": "perm_request", "req_id": "bare", "payload": request}).encode()
    )
    frame = b"".join(ws.protocol.data_to_send())  # one mask key, for every request
    ws.bare = True
    server = await loop.create_server(lambda: _BareHttp(ws, frame), sock=_announced_socket())
    async with server:
        await asyncio.Future()


def _announced_socket() -> socket.socket:
    """A listening socket on a free loopback port, its port printed for the bench."""
    sock = socket.socket()
    # Accepted sockets inherit TCP_NODELAY on Linux; without it a response
    # written as headers + body waits ~40 ms on the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # accepting before the port is announced
    print(sock.getsockname()[1], flush=True)
    return sock


async def http_server(app: Any) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    await uvicorn.Server(config).serve([_announced_socket()])


def main() -> None:
    kind = sys.argv[1]
    if kind == "gateway":
        auto = sys.argv[sys.argv.index("--auto") + 1] if "--auto" in sys.argv else "approve"
        run_loop(gateway(auto))
    elif kind == "http":
        run_loop(http_server(_asgi(lambda _body: {"ok": True})))
    elif kind == "jsonrpc":
        run_loop(http_server(_asgi(_jsonrpc_answer)))
    elif kind == "relay":
        timeout = float(sys.argv[4]) if sys.argv[3:4] == ["--timeout"] else RELAY_TIMEOUT
        run_loop(relay(sys.argv[2], timeout))
    elif kind == "bare-relay":
        run_loop(bare_relay(sys.argv[2]))
    else:
        raise SystemExit(f"unknown peer {kind!r}")


if __name__ == "__main__":
    main()
