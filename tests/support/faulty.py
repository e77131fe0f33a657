"""Misbehaving gateways for the fault-injection suite (raw TCP on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.support.tcp import ThreadedTcpServer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer(ThreadedTcpServer):
    """A TCP server whose per-connection behaviour is a coroutine you supply."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.accepted = 0

    def __enter__(self) -> RawServer:
        super().__enter__()
        return self

    def url(self, token: str = "t") -> str:
        return f"ws://127.0.0.1:{self.port}/api/sled-uplink?token={token}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self.handler(reader, writer)


async def never_answer(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Accept TCP, read the handshake, never reply (the uplink's open timeout fires)."""
    await reader.read(65536)
    await asyncio.sleep(3600)
