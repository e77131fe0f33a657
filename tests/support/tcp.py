"""A TCP server on 127.0.0.1:0 with its own event loop in a thread (tests only).

Subclasses implement ``handle(reader, writer)`` per connection. Leaving the
``with`` block stops the loop and aborts every connection still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class ThreadedTcpServer:
    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> ThreadedTcpServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

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
        self._writers.append(writer)
        # The peer leaving, or the server shutting down, ends a connection quietly.
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await self.handle(reader, writer)
