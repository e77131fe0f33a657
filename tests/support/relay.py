"""A TCP relay that can go silent: the test's model of a half-open connection.

It forwards bytes both ways between a client and an upstream port until
``freeze()``; then it stops forwarding in both directions but keeps both
sockets open, exactly as a dead NAT or a pulled cable looks to each side.
``heal()`` forwards again (for new connections).

``pause()`` is a slow path rather than a dead one: bytes are held, not
swallowed, until ``resume()`` delivers them in order, as a stalled link that
recovers does (a database's connection stuck for seconds, say).
"""

from __future__ import annotations

import asyncio

from tests.support.tcp import ThreadedTcpServer


class FreezableRelay(ThreadedTcpServer):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.frozen = False
        self.paused = False
        self.connections = 0

    def __enter__(self) -> FreezableRelay:
        super().__enter__()
        return self

    def freeze(self) -> None:
        self.frozen = True

    def heal(self) -> None:
        self.frozen = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:  # a dead path: accept nothing through
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.frozen:
                    continue  # swallow: both sockets stay open, nothing gets through
                while self.paused:  # hold: delivered, in order, on resume
                    await asyncio.sleep(0.005)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.frozen:
                writer.close()
