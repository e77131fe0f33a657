"""The frame sink: the one way a frame leaves the uplink, from any thread.

A session's :class:`FrameSink` is handed out in ``SessionUp``/``SessionOpened``
and in every ``EnvelopeIn``; whoever holds it writes frames on that session
and no other. It lives in a module of its own so that the message types can
name it without importing the WebSocket code (and websockets with it).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from actors.loop import EventLoop
from protocol import Envelope, serialize


class Outbox:
    """Frames for one session's socket: any thread puts, the loop writes.

    A put made in the loop thread while nothing is queued goes to the socket
    at once (``write``). Puts from other threads are coalesced: only the
    first after a flush wakes the loop (one ``call_soon_threadsafe`` per
    burst, not per frame), and the flush writes everything queued, in order.
    """

    def __init__(self, loop: EventLoop, write: Callable[[str], None]) -> None:
        self._loop = loop
        self._write = write
        self._frames: collections.deque[str] = collections.deque()
        self._armed = False
        self._lock = threading.Lock()
        self.closed = False

    def put(self, text: str) -> bool:
        """Queue ``text`` from any thread; False if the session is over."""
        if self.closed:
            return False
        if not self._armed and not self._frames and self._loop.in_loop_thread():
            self._write(text)
            return True
        with self._lock:
            self._frames.append(text)
            if self._armed:
                return True
            self._armed = True
        try:
            self._loop.call_soon(self._flush)
        except RuntimeError:  # the loop is closed: the uplink is stopping
            return False
        return True

    def _flush(self) -> None:
        with self._lock:
            self._armed = False
            frames, self._frames = self._frames, collections.deque()
        if self.closed:
            return
        for text in frames:
            self._write(text)


class FrameSink:
    """Sends frames on one session from any thread, straight to its socket.

    After the session ends it drops what it is given: the session's users
    are told ``SessionClosed`` and fail closed what they had sent.
    """

    __slots__ = ("_outbox", "session")

    def __init__(self, session: int, outbox: Outbox) -> None:
        self.session = session
        self._outbox = outbox

    @property
    def closed(self) -> bool:
        return self._outbox.closed

    def send(self, envelope: Envelope) -> bool:
        """Serialize and send; LocalProtocolError if the envelope is not legal."""
        return self._outbox.put(serialize(envelope))

    def send_text(self, text: str) -> bool:
        """Send already-serialized frame text; False if the session is over."""
        return self._outbox.put(text)
