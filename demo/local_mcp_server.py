"""The demo sled's own MCP server: the official MCP SDK, a few harmless tools.

    python -m demo.local_mcp_server --port 3001      # MCP at http://127.0.0.1:3001/mcp

Tools: ``echo`` (returns its text), ``add`` (two integers), ``server_time``
(the server's clock, UTC). It speaks Streamable HTTP, the SDK's default
stateful shape (``Mcp-Session-Id``, answers as SSE), which is what a sled's
MCP endpoint looks like to the uplink.

Exit status: 0 after SIGINT/SIGTERM, 2 if the port is taken or an option is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType

import uvicorn
from mcp.server.mcpserver import MCPServer

from demo import DEFAULT_MCP_PORT, LOOPBACK, MCP_PORT_ENV, env_port


def build_server() -> MCPServer:
    """A fresh SDK server with the demo tools (async: no worker threads to outlive it)."""
    mcp = MCPServer(
        "demo-sled", version="1.0", instructions="A demo sled's local tools; all harmless."
    )

    @mcp.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    async def server_time() -> str:
        """The sled's current time (UTC, ISO 8601)."""
        return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    return mcp


class _Server(uvicorn.Server):
    """uvicorn, but SIGINT/SIGTERM just stop it (exit 0), never re-raised afterwards."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self.should_exit:  # a second signal: stop waiting for connections
                self.force_exit = True
            self.should_exit = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.local_mcp_server",
        description="The demo sled's local MCP server (MCP SDK, Streamable HTTP).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_port(MCP_PORT_ENV, DEFAULT_MCP_PORT),
        help=f"TCP port on {LOOPBACK} (env {MCP_PORT_ENV}; default %(default)s)",
    )
    parser.add_argument("--host", default=LOOPBACK, help="address to bind (default %(default)s)")
    parser.add_argument(
        "--path", default="/mcp", help="the MCP endpoint path (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, not {args.port}")

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        sys.stderr.write(
            f"local_mcp_server: error: --port: cannot listen on {args.host}:{args.port}: "
            f"{exc.strerror or exc}\n"
        )
        return 2
    port = sock.getsockname()[1]

    app = build_server().streamable_http_app(streamable_http_path=args.path, host=args.host)
    config = uvicorn.Config(
        app,
        lifespan="on",  # runs the SDK's session manager
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    print(f"local MCP server (MCP SDK) on http://{args.host}:{port}{args.path}", flush=True)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    print("local MCP server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
