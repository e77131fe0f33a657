"""A TCP relay that can go silent: the test's model of a half-open connection.

It forwards bytes both ways between a client and an upstream port until
``freeze()``; then it stops forwarding in both directions but keeps both
sockets open, exactly as a dead NAT or a pulled cable looks to each side.
``heal()`` forwards again (for new connections).
"""

from __future__ import annotations

import asyncio
import threading


class FreezableRelay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.frozen = False
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> FreezableRelay:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("relay did not start")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def freeze(self) -> None:
        self.frozen = True

    def heal(self) -> None:
        self.frozen = False

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

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
        if self.frozen:  # a dead path: accept nothing through
            self._writers.append(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers += [writer, up_writer]
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (asyncio.CancelledError, OSError):
            pass  # the relay is shutting down, or upstream is gone

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.frozen:
                    continue  # swallow: both sockets stay open, nothing gets through
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.frozen:
                writer.close()
