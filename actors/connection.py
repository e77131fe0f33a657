"""The connection actor: one WebSocket session to the gateway.

The supervisor starts a fresh ``ConnectionActor`` for every session (session
numbers only grow) and stops it when the session ends, so "restart the
connection" is literal. The socket itself lives in the event loop: the actor
starts the session task, and hands outbound frames to it through a queue.

The session task: connect, send ``identity`` first, report ``SessionUp``,
then forward every inbound message to the router and every queued frame to the
socket, until the socket ends. Whatever ends it, it reports ``SessionEnded``
exactly once, which is what makes the registry fail closed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import ssl
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import State

from actors.base import UplinkActor, handles
from actors.context import Role, UplinkContext
from actors.loop import EventLoop
from actors.messages import CloseSession, SendFrame, SessionEnded, SessionUp
from protocol import Envelope, LocalProtocolError, identity, redact, serialize

# websockets logs handshakes (URL and all) at DEBUG through this logger; the
# log setup routes it to loguru, whose sink redacts the token.
_ws_logger = logging.getLogger("websockets.client")


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store, plus ``ca_file`` when given; hostnames are verified."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def describe_close(exc: ConnectionClosed) -> tuple[str, bool]:
    """Human words for how a session closed, and whether it closed cleanly."""
    received = exc.rcvd
    sent = exc.sent
    if received is not None:
        words = f"gateway closed the connection (code {received.code}"
        words += f", {received.reason!r})" if received.reason else ")"
        return words, received.code in (1000, 1001)
    if sent is not None:
        return (
            f"uplink closed the connection (code {sent.code}: {sent.reason or 'no reason'})",
            False,
        )
    return "connection lost without a close frame", False


class Outbox:
    """Frames waiting for one session's socket: any thread puts, the loop writes.

    Puts from other threads are coalesced: only the first put after a drain
    wakes the event loop (one ``call_soon_threadsafe`` per burst, not per
    frame), and the writer sends everything queued in one go. A put made in
    the loop thread while nothing is queued or being written goes straight
    to the socket through ``send_now``, which keeps frames in order and
    saves the writer task two turns of the loop.
    """

    def __init__(self, loop: EventLoop, send_now: Callable[[str], bool] | None = None) -> None:
        self._loop = loop
        self._send_now = send_now
        self._frames: collections.deque[str] = collections.deque()
        self._armed = False
        self._ready = asyncio.Event()  # created in the loop thread
        self.writing = False  # the writer holds a batch it has not finished sending
        self.closed = False

    def put(self, text: str) -> bool:
        """Queue ``text`` from any thread; False if the session is over."""
        if self.closed:
            return False
        if (
            self._send_now is not None
            and not self._frames
            and not self._armed
            and not self.writing
            and self._loop.in_loop_thread()
            and self._send_now(text)
        ):
            return True
        self._frames.append(text)
        if not self._armed:
            self._armed = True
            try:
                self._loop.call_soon(self._wake)
            except RuntimeError:  # the loop is closed: the uplink is stopping
                return False
        return True

    def _wake(self) -> None:
        self._armed = False  # before draining: a later put arms a new wake
        self._ready.set()

    async def batch(self) -> list[str]:
        """Wait for frames; return all that are queued, in order."""
        self.writing = False
        while not self._frames:
            await self._ready.wait()
            self._ready.clear()
        frames = list(self._frames)
        for _ in frames:
            self._frames.popleft()
        self.writing = True
        return frames


class FrameSink:
    """Sends frames on one session from any thread, straight to its writer.

    Handed out in ``SessionUp``/``SessionOpened``. After the session ends it
    drops what it is given: the session's users are told ``SessionClosed``
    and fail closed what they had sent.
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


class _DirectConnection(ClientConnection):
    """websockets' client connection, handing each complete text frame to the
    router as soon as it is parsed (in ``data_received``), not through a
    ``recv()`` that resumes a reader task one turn of the loop later.

    Anything else (binary, fragmented or undecodable messages, and every
    frame that arrives while one of those waits in websockets' own queue)
    takes the usual ``recv()`` path, so the order of messages never changes
    and websockets still answers bad UTF-8 with close code 1007.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_text: Callable[[str], None] | None = None
        self.queued_messages = 0  # complete messages left for recv()

    def process_event(self, event: Any) -> None:
        if (
            self.on_text is not None
            and self.queued_messages == 0
            and isinstance(event, Frame)
            and event.opcode is Opcode.TEXT
            and event.fin
        ):
            try:
                text = str(event.data, "utf-8")
            except UnicodeDecodeError:
                pass  # recv() fails the connection with 1007, as websockets does
            else:
                self.on_text(text)
                return
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES and event.fin:
            self.queued_messages += 1
        super().process_event(event)


class _Connected:
    """Internal: the session task tells its actor that the socket is open."""

    __slots__ = ()


class ConnectionActor(UplinkActor):
    role = Role.CONNECTION

    def __init__(self, ctx: UplinkContext, session: int) -> None:
        self.session = session  # before super(): the logger is bound to the name
        super().__init__(ctx)
        self.url = redact(ctx.config.connect_url)
        self._ws: ClientConnection | None = None
        self._outbox: Outbox | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._dead_reason: str | None = None
        self._sink: FrameSink | None = None

    @property
    def name(self) -> str:
        return f"connection#{self.session}"

    def session_of(self) -> int | None:
        return self.session

    def publish(self) -> None:
        """Not on the board: the supervisor publishes the connection state."""

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "session": self.session, "url": self.url}

    def on_start(self) -> None:
        super().on_start()
        self.set_state("connecting", self.url)
        self._task = self.ctx.loop.spawn(self._run_session)

    def on_stop(self) -> None:
        # The session task outlives no actor: cancelling it closes the socket.
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_stop()

    def fail_closed(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # ── messages ────────────────────────────────────────────────────────

    @handles(SendFrame)
    def _on_send_frame(self, message: SendFrame) -> None:
        if message.session != self.session or self._outbox is None:
            self.log.debug("dropped {} for session {}", message.envelope.type, message.session)
            return
        try:
            text = serialize(message.envelope)
        except LocalProtocolError:  # a bug upstream; never worth the session
            self.log.exception("dropped an unencodable {} frame", message.envelope.type)
            return
        self._outbox.put(text)

    @handles(CloseSession)
    def _on_close(self, message: CloseSession) -> None:
        ws = self._ws
        if ws is not None:
            self.set_state("closing", f"code {message.code}")
            self.ctx.loop.spawn(ws.close, message.code, message.reason)
        elif self._task is not None:
            self._task.cancel()

    # ── the session, in the event loop ──────────────────────────────────

    async def _run_session(self) -> None:
        config = self.ctx.config
        up_at: float | None = None
        ended = SessionEnded(self.session, "connection attempt ended")
        try:
            async with connect(
                config.connect_url,
                open_timeout=config.open_timeout,
                # Our own keepalive (below) aborts at once on a missed pong;
                # websockets' would first wait out a close handshake.
                ping_interval=None,
                close_timeout=config.close_timeout,
                max_size=config.max_frame_bytes,
                max_queue=64,
                # Frames are small JSON; the Rust original negotiates no compression.
                compression=None,
                ssl=tls_context(config.ca_file) if config.connect_url.startswith("wss:") else None,
                user_agent_header=f"sled-uplink/{config.identity_extra.get('version', '0')}",
                proxy=None,
                logger=_ws_logger,
                create_connection=_DirectConnection,
            ) as ws:
                self._ws = ws
                # identity is the first frame of every session, before anything queued.
                await ws.send(serialize(identity(config.project, **config.identity_extra)))
                up_at = time.monotonic()
                self._outbox = Outbox(self.ctx.loop, partial(self._send_now, ws))
                sink = self._sink = FrameSink(self.session, self._outbox)
                self.ctx.directory.tell(Role.SUPERVISOR, SessionUp(self.session, sink))
                self.actor_ref.tell(_Connected())
                writer = asyncio.create_task(self._write(ws, self._outbox))
                keepalive = asyncio.create_task(self._keepalive(ws))
                try:
                    await self._read(cast(_DirectConnection, ws))  # create_connection
                finally:
                    writer.cancel()
                    keepalive.cancel()
            # The reader ends quietly only after a normal close handshake.
            code = ws.close_code
            words = f"connection closed (code {code}"
            words += f", {ws.close_reason!r})" if ws.close_reason else ")"
            ended = self._ended(up_at, words, clean=code in (1000, 1001))
        except ConnectionClosed as exc:
            words, clean = describe_close(exc)
            ended = self._ended(up_at, self._dead_reason or words, clean=clean)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                ended = self._ended(
                    up_at,
                    f"gateway refused the token (HTTP {status}): check the token in the "
                    "--upstream-gateway URL",
                    auth_failed=True,
                )
            else:
                ended = self._ended(up_at, f"gateway refused the handshake (HTTP {status})")
        except TimeoutError:
            ended = self._ended(up_at, f"handshake timed out after {config.open_timeout:g}s")
        except asyncio.CancelledError:
            ended = self._ended(up_at, "session cancelled")
            raise
        except (OSError, websockets.exceptions.WebSocketException, ssl.SSLError) as exc:
            ended = self._ended(up_at, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug; still end the session so requests fail closed
            self.log.exception("session task failed")
            ended = self._ended(up_at, f"internal error: {exc!r}")
        finally:
            if self._outbox is not None:
                self._outbox.closed = True
            self._ws = None
            self._outbox = None
            self.ctx.directory.tell(Role.SUPERVISOR, ended)

    def _ended(
        self, up_at: float | None, reason: str, *, clean: bool = False, auth_failed: bool = False
    ) -> SessionEnded:
        up_for = None if up_at is None else time.monotonic() - up_at
        return SessionEnded(self.session, redact(reason), up_for, auth_failed, clean)

    async def _read(self, ws: _DirectConnection) -> None:
        # Dispatch in the loop: one hand-off per frame (loop → handler actor),
        # complete text frames straight from data_received (_DirectConnection).
        dispatch, sink, session = self.ctx.router.dispatch, self._sink, self.session

        def on_text(text: str) -> None:
            try:
                dispatch(session, text, sink)
            except Exception:  # a bug in a handler: drop the frame, keep the session
                self.log.exception("dispatching an inbound frame failed; dropped it")

        ws.on_text = on_text
        try:
            async for data in ws:
                ws.queued_messages -= 1
                dispatch(session, data, sink)
        finally:
            ws.on_text = None

    async def _keepalive(self, ws: ClientConnection) -> None:
        """Ping every interval; a pong later than the timeout means a dead path."""
        interval, timeout = self.ctx.config.ping_interval, self.ctx.config.ping_timeout
        while True:
            await asyncio.sleep(interval)
            try:
                pong = await ws.ping()
            except ConnectionClosed:
                return
            try:
                async with asyncio.timeout(timeout):
                    await pong
            except TimeoutError:
                self._dead_reason = f"keepalive: no pong within {timeout:g}s (half-open connection)"
                self.log.warning("{}; dropping the session", self._dead_reason)
                # No close handshake over a dead path: deny in-flight requests now.
                ws.transport.abort()
                return

    async def _write(self, ws: ClientConnection, outbox: Outbox) -> None:
        while True:
            for text in await outbox.batch():
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    return  # the reader sees the same close and ends the session
                except Exception:
                    self._send_failed(ws)
                    return

    def _send_now(self, ws: ClientConnection, text: str) -> bool:
        """Write one frame at once, from the loop thread, if nothing is in its way.

        This is ``ws.send`` without its waits: it declines (and the frame
        takes the writer's queue) while the socket is not open, a send is in
        progress, or the transport asked us to pause writing.
        """
        if (
            ws.protocol.state is not State.OPEN
            or getattr(ws, "send_in_progress", None) is not None
            or getattr(ws, "fragmented_send_waiter", None) is not None
            or getattr(ws, "paused", True)
        ):
            return False
        try:
            ws.protocol.send_text(text.encode())
            ws.send_data()
        except Exception:
            self._send_failed(ws)
        return True

    def _send_failed(self, ws: ClientConnection) -> None:
        """A send failure ends the session: what it carried is then denied."""
        self.log.exception("send failed; closing the session")
        ws.transport.abort()

    @handles(_Connected)
    def _on_connected(self, _: _Connected) -> None:
        self.set_state("connected")
