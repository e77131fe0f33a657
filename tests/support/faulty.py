"""Misbehaving gateways for the fault-injection suite (raw TCP on loopback)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose per-connection behaviour is a coroutine you supply."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> RawServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("raw server did not start")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def url(self, token: str = "t") -> str:
        return f"ws://127.0.0.1:{self.port}/api/sled-uplink?token={token}"

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await self._stop.wait()
                for writer in self._writers:
                    writer.transport.abort()

        asyncio.run(main())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the peer left, or the server is shutting down


async def never_answer(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Accept TCP, read the handshake, never reply (the uplink's open timeout fires)."""
    await reader.read(65536)
    await asyncio.sleep(3600)
