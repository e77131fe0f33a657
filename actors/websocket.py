"""One WebSocket client connection: websockets' sans-I/O protocol on an asyncio transport.

websockets' documented :class:`~websockets.client.ClientProtocol` parses and
frames; this module owns the I/O, the way websockets builds its own asyncio
layer, but with what the uplink needs and nothing it would have to reach
around: every complete message is handed to ``on_message`` synchronously in
``data_received`` (in order, no queue, no reader task), the first frame after
the handshake is written before anything else can be, our keepalive aborts
at once on a missed pong, and a frame is written without waiting on a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable
from typing import cast

from loguru import logger
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

# websockets logs handshakes (URL and all) at DEBUG through this logger; the
# log setup routes it to loguru, whose sink redacts the token.
_ws_logger = logging.getLogger("websockets.client")
_log = logger.bind(actor="connection")

OnMessage = Callable[[str | bytes], None]


class WebSocket(asyncio.Protocol):
    """The client side of one connection, driven from the event loop only."""

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        first_text: str,
        user_agent: str,
        close_timeout: float,
    ) -> None:
        self.protocol = protocol
        self.first_text = first_text  # identity: written the moment the handshake succeeds
        self.on_message: OnMessage | None = None  # until deliver_to: messages wait in _early
        self._early: list[str | bytes] = []
        self.user_agent = user_agent
        self.close_timeout = close_timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.dead_reason: str | None = None  # set when our keepalive gave up on the path
        self._fragments: list[bytes] = []
        self._fragmented: Opcode | None = None
        self._write_paused = False
        self._corked = False  # a write went out this turn of the loop: hold the next ones
        self._held: list[bytes] = []  # held while corked or while the transport is paused
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._ping_numbers = itertools.count(1)
        self._ping_interval = self._pong_timeout = 0.0

    # ── asyncio.Protocol ────────────────────────────────────────────────

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always a subclass of asyncio.Transport
        # (uvloop's are not): create_connection made it.
        self.transport = cast(asyncio.Transport, transport)
        request = self.protocol.connect()
        request.headers.setdefault("User-Agent", self.user_agent)
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        events = self.protocol.events_received()
        self._flush()  # pongs and close echoes the protocol wrote for us
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Response):
                self._handshake_done()
        self._flush()
        self._watch_close()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self.protocol.events_received()
        self._flush()
        return None  # let the transport close: a WebSocket never writes after EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is CLOSED after it
        for timer in (self._close_timer, self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        if not self.opened.done():
            failure = self.protocol.handshake_exc or exc or ConnectionError("connection lost")
            self.opened.set_exception(failure)
            self.opened.exception()  # retrieved: the caller may be gone already
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._uncork()

    def deliver_to(self, on_message: OnMessage) -> None:
        """From now on hand every complete message to ``on_message``, in order,
        starting with any that arrived before this call."""
        early, self._early = self._early, []
        self.on_message = on_message
        for message in early:
            on_message(message)

    # ── sending ─────────────────────────────────────────────────────────

    def send_text(self, text: str) -> None:
        """Write one text frame now; dropped if the connection is no longer open."""
        if self.protocol.state is not State.OPEN:
            return
        try:
            self.protocol.send_text(text.encode())
            self._flush()
        except Exception:  # a send failure ends the session: what it carried is denied
            _log.exception("send failed; dropping the connection")
            self.abort()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; without one to start, drop the connection."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
            self._watch_close()
        elif self.transport is not None and self.protocol.state is State.CONNECTING:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, with no closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def close_exc(self) -> ConnectionClosed:
        return self.protocol.close_exc

    # ── keepalive ───────────────────────────────────────────────────────

    def keepalive(self, interval: float, timeout: float) -> None:
        """Ping every ``interval``; a pong later than ``timeout`` means a dead path.

        Ours rather than websockets': theirs would first wait out a close
        handshake that a dead path can never complete.
        """
        self._ping_interval, self._pong_timeout = interval, timeout
        self._ping_timer = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        if self.protocol.state is not State.OPEN:
            return
        self._ping_payload = next(self._ping_numbers).to_bytes(4, "big")
        self.protocol.send_ping(self._ping_payload)
        self._flush()
        self._pong_timer = self.loop.call_later(self._pong_timeout, self._pong_missed)

    def _pong_missed(self) -> None:
        self.dead_reason = (
            f"keepalive: no pong within {self._pong_timeout:g}s (half-open connection)"
        )
        # No close handshake over a dead path: deny in-flight requests now.
        self.abort()

    # ── internals ───────────────────────────────────────────────────────

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        if self.protocol.handshake_exc is not None:
            self.opened.set_exception(self.protocol.handshake_exc)
            return
        self.send_text(self.first_text)
        self.opened.set_result(None)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PONG:
            if frame.data == self._ping_payload and self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
                self._ping_timer = self.loop.call_later(self._ping_interval, self._ping)
            return
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragmented, self._fragments = opcode, [bytes(frame.data)]
                return
            self._deliver(opcode, bytes(frame.data))
        elif opcode is Opcode.CONT and self._fragmented is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                opcode, self._fragmented = self._fragmented, None
                data, self._fragments = b"".join(self._fragments), []
                self._deliver(opcode, data)

    def _deliver(self, opcode: Opcode, data: bytes) -> None:
        if self.protocol.state is not State.OPEN:
            return  # failed (1007 below) or closing: nothing more is processed
        message: str | bytes = data
        if opcode is Opcode.TEXT:
            try:
                message = data.decode()
            except UnicodeDecodeError as exc:  # RFC 6455 §8.1: fail the connection with 1007
                self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        if self.on_message is None:
            self._early.append(message)  # came with the handshake, before deliver_to
        else:
            self.on_message(message)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if not data:  # SEND_EOF: half-close when the transport can
                self._uncork()  # what is held goes before the end of the stream
                if transport.can_write_eof():
                    with contextlib.suppress(Exception):
                        transport.write_eof()
                else:
                    transport.close()
            elif self._write_paused or self._corked:
                self._held.append(data)
            else:
                transport.write(data)
                # The frames written later in this turn of the loop (a burst of
                # answers decided together) go out together, in one system
                # call, at the start of the next; a lone frame never waits.
                self._corked = True
                self.loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        self._corked = False
        if self._write_paused or not self._held or self.transport is None:
            return
        held, self._held = self._held, []
        try:
            self.transport.write(b"".join(held))
        except Exception:  # the transport is gone: the session is ending anyway
            _log.exception("writing held frames failed; dropping the connection")
            self.abort()

    def _watch_close(self) -> None:
        """Once a close is under way, the gateway gets ``close_timeout`` to finish it."""
        if self._close_timer is None and self.protocol.close_expected():
            self._close_timer = self.loop.call_later(self.close_timeout, self.abort)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store, plus ``ca_file`` when given; hostnames are verified."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


async def open_websocket(
    url: str,
    *,
    first_text: str,
    open_timeout: float,
    close_timeout: float,
    max_size: int,
    user_agent: str,
    ca_file: str | None = None,
) -> WebSocket:
    """Connect, complete the handshake and write ``first_text``, within ``open_timeout``.

    Messages that arrive meanwhile wait for :meth:`WebSocket.deliver_to`.

        Raises what stopped it: OSError (TCP, TLS), TimeoutError, or websockets'
        InvalidHandshake (InvalidStatus for a refused upgrade).
    """
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()

    def factory() -> WebSocket:
        # No extensions: frames are small JSON, and the Rust original negotiates
        # no compression either.
        protocol = ClientProtocol(uri, max_size=max_size, logger=_ws_logger)
        return WebSocket(
            protocol,
            first_text=first_text,
            user_agent=user_agent,
            close_timeout=close_timeout,
        )

    ws: WebSocket | None = None
    try:
        async with asyncio.timeout(open_timeout):
            _, ws = await loop.create_connection(
                factory,
                uri.host,
                uri.port,
                ssl=tls_context(ca_file) if uri.secure else None,
                server_hostname=uri.host if uri.secure else None,
            )
            await asyncio.shield(ws.opened)
    except BaseException:
        if ws is not None:
            ws.abort()
        raise
    return ws


__all__ = ["InvalidHandshake", "WebSocket", "open_websocket", "tls_context"]
