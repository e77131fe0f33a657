"""The MCP proxy actor: replays ``mcp_request`` frames and sends the answers back.

Replays run in the event loop (at most ``--mcp-concurrency`` at once, the
rest wait), so a slow local server never delays heartbeats or permission
traffic. An answer whose session has ended is dropped and logged: it must not
leak into the next session, whose gateway never asked for it.

The actor registers a loop handler with the router, so a request starts its
replay in the event loop the moment it arrives (no round trip through the
mailbox); the actor keeps the books from ``McpStarted``/``McpDone``. It is an
``UplinkLoopActor``: its work is all I/O in the loop, and its books are kept
there too, so a replay wakes no other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pykka

from actors.base import UplinkLoopActor, handles
from actors.connection import FrameSink
from actors.context import Role, UplinkContext
from actors.mcp_client import LocalMcpClient
from actors.messages import (
    EnvelopeIn,
    McpDone,
    McpStarted,
    SendFrame,
    SessionClosed,
    SessionOpened,
)
from protocol import Envelope, Kind, mcp_response, serialize
from protocol.jsonrpc import INTERNAL_ERROR, error_object


class McpProxyActor(UplinkLoopActor):
    role = Role.MCP

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        config = ctx.config
        self.client = LocalMcpClient(
            config.local_mcp_url,
            timeout=config.mcp_timeout,
            concurrency=config.mcp_concurrency,
            max_response_bytes=config.mcp_max_response_bytes,
            log=self.log,
        )
        self.session: int | None = None
        self.sink: FrameSink | None = None
        self.in_flight = 0
        self._tasks: set[asyncio.Future[Any]] = set()  # replays started in the loop
        self.answered = 0
        self.dropped = 0

    def on_start(self) -> None:
        super().on_start()
        self.ctx.loop_handlers[Kind.MCP_REQUEST] = self._start_in_loop
        self.set_state("idle")

    def on_stop(self) -> None:
        # In the loop thread: cancel what is left and close the pool without
        # waiting (a wait here would block the loop the close runs on).
        if self.ctx.loop_handlers.get(Kind.MCP_REQUEST) == self._start_in_loop:
            del self.ctx.loop_handlers[Kind.MCP_REQUEST]
        for task in list(self._tasks):  # replays outliving the uplink: cancel, not leak
            task.cancel()
        _closing.add(closing := asyncio.ensure_future(self._close()))
        closing.add_done_callback(_closing.discard)
        super().on_stop()

    async def _close(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # closing a pool must never trouble shutdown
            self.log.debug("closing the HTTP client: {!r}", exc)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "session": self.session,
            "in_flight": self.in_flight,
            "answered": self.answered,
            "dropped_after_session_end": self.dropped,
            "local_session": self.client.session_id is not None,
            "protocol_version": self.client.protocol_version,
        }

    @handles(SessionOpened)
    def _on_opened(self, message: SessionOpened) -> None:
        self.session = message.session
        self.sink = message.sink
        self.set_state("serving", f"session {message.session}")

    @handles(SessionClosed)
    def _on_closed(self, message: SessionClosed) -> None:
        if message.session == self.session:
            self.session = None
            self.sink = None
            self.set_state("idle", f"session {message.session} ended")

    @handles(EnvelopeIn)
    def _on_request(self, message: EnvelopeIn) -> None:
        """The mailbox path (a frame told to this actor rather than started in the loop)."""
        if message.envelope.type != Kind.MCP_REQUEST:
            return
        # Answer on the session the request came on, whatever this actor has heard yet.
        sink = message.sink
        if sink is None and self.sink is not None and self.sink.session == message.session:
            sink = self.sink
        self._start_in_loop(message.session, message.envelope, sink)

    def _start_in_loop(self, session: int, request: Envelope, sink: FrameSink | None) -> None:
        """Router → here, in the event-loop thread: start the replay at once."""
        task = asyncio.ensure_future(self._serve(session, request, sink))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(McpStarted(session))  # idle and in the loop: handled at once

    @handles(McpStarted)
    def _started(self, _: McpStarted) -> None:
        self.in_flight += 1
        self.ctx.stats.gauge("mcp_in_flight", self.in_flight)

    async def _serve(self, session: int, request: Envelope, sink: FrameSink | None) -> None:
        """Replay in the loop and answer from the loop: the sink drops the answer
        if the session has ended meanwhile, so it never reaches the next one."""
        try:
            payload = await self.client.replay(request.payload)
            text = serialize(mcp_response(request.req_id, payload))
        except Exception as exc:  # a bug, or an answer the wire cannot carry
            payload = error_object(None, INTERNAL_ERROR, f"replay failed: {exc!r}")
            text = serialize(mcp_response(request.req_id, payload))
        sent = sink.send_text(text) if sink is not None else False
        with contextlib.suppress(pykka.ActorDeadError):  # stopped meanwhile
            self.actor_ref.tell(
                McpDone(session, request.req_id, None if sent else payload, sent, sink is not None)
            )

    @handles(McpDone)
    def _on_done(self, message: McpDone) -> None:
        self.in_flight -= 1
        self.ctx.stats.gauge("mcp_in_flight", self.in_flight)
        if message.sent:
            self.answered += 1
            self.ctx.stats.inc("frames_out", Kind.MCP_RESPONSE)
        elif message.payload is not None and not message.had_sink:
            # No sink came with the request: the connection actor of that
            # session sends it, or drops it if the session is gone.
            self.answered += 1
            self.ctx.stats.inc("frames_out", Kind.MCP_RESPONSE)
            envelope = mcp_response(message.req_id, message.payload)
            self.ctx.directory.tell(Role.CONNECTION, SendFrame(message.session, envelope))
        else:
            self.dropped += 1
            self.log.warning(
                "MCP answer {!r} dropped: its session {} has ended", message.req_id, message.session
            )


# Pool closes still running after their actor stopped (a reference keeps each alive).
_closing: set[asyncio.Future[None]] = set()
