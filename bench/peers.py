"""Peer processes for the benchmark, each on 127.0.0.1 with its port on stdout.

    python -m bench.peers gateway --auto approve|silent   # a minimal WebSocket gateway
    python -m bench.peers http                            # trivial HTTP JSON server
    python -m bench.peers jsonrpc                         # trivial local JSON-RPC server

They run in their own processes so that the process being measured does not
share a GIL with its peers.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

APPROVE = {"approved": True, "always_allow": False}


async def gateway(auto: str) -> None:
    from websockets.asyncio.server import serve

    async def handler(ws: Any) -> None:
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


def _asgi(answer: Any) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.dumps(answer(body)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


def _jsonrpc_answer(body: bytes) -> Any:
    request = json.loads(body)
    return {"jsonrpc": "2.0", "id": request.get("id"), "result": {"ok": True}}


async def http_server(answer: Any) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    # Accepted sockets inherit TCP_NODELAY on Linux; without it a response
    # written as headers + body waits ~40 ms on the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # accepting before the port is announced
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(_asgi(answer), log_config=None, access_log=False, lifespan="off")
    await uvicorn.Server(config).serve([sock])


def main() -> None:
    kind = sys.argv[1]
    if kind == "gateway":
        auto = sys.argv[sys.argv.index("--auto") + 1] if "--auto" in sys.argv else "approve"
        asyncio.run(gateway(auto))
    elif kind == "http":
        asyncio.run(http_server(lambda _body: {"ok": True}))
    elif kind == "jsonrpc":
        asyncio.run(http_server(_jsonrpc_answer))
    else:
        raise SystemExit(f"unknown peer {kind!r}")


if __name__ == "__main__":
    main()
