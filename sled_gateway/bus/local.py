"""The in-process :class:`~sled_gateway.bus.Bus`: dicts of handlers, on the caller's loop.

A request is a direct ``await`` of the server's responder (no task, no
queue, no copy), bounded by ``asyncio.timeout``: the gateway's MCP relay
costs no extra hop on one process. Everything runs on the gateway's event
loop; nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger

from sled_gateway.bus import Handler, Message, NoResponders, Responder, StopServing

log = logger.bind(actor="gateway")


class LocalBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[Handler]] = {}
        self._servers: dict[str, Responder] = {}

    def open(self) -> None:
        """Nothing to connect to in one process."""

    def close(self) -> None:
        self._subscribers.clear()
        self._servers.clear()

    def publish(self, subject: str, message: Message) -> None:
        for handler in self._subscribers.get(subject, ()):
            try:
                handler(message)
            except Exception:
                log.exception("bus subscriber of {} failed", subject)

    def subscribe(self, subject: str, handler: Handler) -> Callable[[], None]:
        handlers = self._subscribers.setdefault(subject, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)
            if not handlers:
                self._subscribers.pop(subject, None)

        return unsubscribe

    async def request(self, subject: str, message: Message, timeout: float) -> Message:
        responder = self._servers.get(subject)
        if responder is None:
            raise NoResponders(subject)
        async with asyncio.timeout(timeout):
            answer = await responder(message)
        if answer is None:  # it defers to another server, and none is reachable from here
            raise NoResponders(subject)
        return answer

    def serve(self, subject: str, responder: Responder) -> StopServing:
        self._servers[subject] = responder

        def stop(*, quiet: bool = False) -> None:
            # Quiet or not: once stopped, nothing reaches this server in one process.
            if self._servers.get(subject) is responder:
                del self._servers[subject]

        return stop

    @property
    def connected(self) -> bool:
        """It reaches no other process (see :attr:`Bus.connected`)."""
        return False

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """One process never loses its bus: ``callback`` is never called."""
        return lambda: None
