"""``GET /api/events``: the read model pushed to the console as Server-Sent Events.

Each stream opens with the whole ``/api/state`` document (the catch-up after a
reconnect), then carries a new one whenever the read model changes, as
``event: state``. Changes are coalesced: one snapshot is built per burst, at
most one every ``min_interval`` seconds, and shared by every stream. A stream
holds one slot, not a queue: a newer document replaces one a slow reader has
not taken yet, so a slow reader costs one document, and a reader whose socket
takes no data for ``stall_timeout`` seconds is dropped. A comment every
``keepalive`` seconds keeps proxies from closing an idle stream and lets the
server notice a client that went away.

At most ``max_streams`` streams are open at once; one more is answered ``503``
with a JSON error, as is every stream asked for once the gateway shuts down.
:meth:`LiveStreams.close_all` ends every stream (the gateway's shutdown calls
it), so a console left open never holds the server's graceful shutdown.

The request guard authenticates this path like any other, and uvicorn's
whole-request deadline (``actors/http_guard.py``) disarms once a request head
with no body is in, so it never cuts a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loguru import logger

from sled_gateway.http.errors import error

log = logger.bind(actor="gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: What one stream's reader may see of the document (None: all of it).
View = Callable[[dict[str, Any]], dict[str, Any]]

EVENTS_PATH = "/api/events"
#: Streams open at once, per gateway.
MAX_STREAMS = 32
#: At most this many documents per second go out, however fast the state changes.
MIN_INTERVAL = 0.1
KEEPALIVE = 15.0
STALL_TIMEOUT = 30.0
#: What EventSource waits before it reconnects (the SSE ``retry:`` field), in ms.
RETRY_MS = 1000


class _Stream:
    """One open stream: a wake-up and the one document it has yet to send."""

    def __init__(self, view: View | None = None) -> None:
        self.view = view
        self.wake = asyncio.Event()
        self.latest: bytes | None = None
        self.closed = False

    def offer(self, frame: bytes) -> None:
        self.latest = frame
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


def state_frame(document: dict[str, Any]) -> bytes:
    data = json.dumps(document, separators=(",", ":"), ensure_ascii=True)
    return f"event: state\nid: {document.get('version', '')}\ndata: {data}\n\n".encode()


class LiveStreams:
    """The open event streams, and the ASGI app that serves one."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        *,
        max_streams: int = MAX_STREAMS,
        min_interval: float = MIN_INTERVAL,
        keepalive: float = KEEPALIVE,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self._snapshot = snapshot
        self.max_streams = max_streams
        self.min_interval = min_interval
        self.keepalive = keepalive
        self.stall_timeout = stall_timeout
        self._streams: set[_Stream] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._scheduled = False
        self._last_sent = 0.0
        self._closed = False

    @property
    def open_count(self) -> int:
        return len(self._streams)

    def changed(self) -> None:
        """The read model changed (any thread; called under its lock, so quick)."""
        loop = self._loop
        if loop is None or not self._streams:
            return
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        wait = self._last_sent + self.min_interval - loop.time()
        if wait > 0:
            loop.call_later(wait, self._broadcast, loop)
        else:
            self._broadcast(loop)

    def _broadcast(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._scheduled = False
        self._last_sent = loop.time()
        if not self._streams:
            return
        document = self._snapshot()
        frame: bytes | None = None
        for stream in self._streams:
            if stream.view is not None:
                stream.offer(state_frame(stream.view(document)))
                continue
            if frame is None:
                frame = state_frame(document)
            stream.offer(frame)

    def close_all(self) -> None:
        """End every stream and refuse new ones (on the loop)."""
        self._closed = True
        for stream in self._streams:
            stream.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, send)

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, view: View | None = None
    ) -> None:
        """One stream; ``view`` cuts each document down to what its reader may see."""
        if self._closed:
            await error(503, "the gateway is shutting down")(scope, receive, send)
            return
        if len(self._streams) >= self.max_streams:
            await error(
                503,
                f"too many event streams open ({self.max_streams}); poll GET /api/state instead",
                headers={"Retry-After": "5"},
            )(scope, receive, send)
            return
        self._loop = asyncio.get_running_loop()
        stream = _Stream(view)
        document = self._snapshot()
        stream.offer(state_frame(view(document) if view is not None else document))
        self._streams.add(stream)
        watcher = asyncio.create_task(_watch_disconnect(receive, stream))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            frame: bytes | None = f"retry: {RETRY_MS}\n\n".encode()
            while not stream.closed:
                if frame is not None:
                    try:
                        await asyncio.wait_for(
                            send({"type": "http.response.body", "body": frame, "more_body": True}),
                            self.stall_timeout,
                        )
                    except TimeoutError:
                        # Returning with the response unfinished makes uvicorn close the socket.
                        log.warning("event stream dropped: its reader took nothing for a while")
                        return
                try:
                    await asyncio.wait_for(stream.wake.wait(), self.keepalive)
                except TimeoutError:
                    frame = b": keep-alive\n\n"
                    continue
                stream.wake.clear()
                frame, stream.latest = stream.latest, None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._streams.discard(stream)
            watcher.cancel()


async def _watch_disconnect(receive: Receive, stream: _Stream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.close()
            return
