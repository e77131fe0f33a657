"""The MCP proxy actor: replays ``mcp_request`` frames and sends the answers back.

Replays run in the event loop (at most ``--mcp-concurrency`` at once, the
rest wait), so a slow local server never delays heartbeats or permission
traffic. An answer whose session has ended is dropped and logged: it must not
leak into the next session, whose gateway never asked for it.

It is an ``UplinkLoopActor``: a request frame reaches its handler in the
event loop the moment it is parsed, the replay runs there, and its books are
kept there too, so a replay wakes no other thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors.base import UplinkLoopActor, handles
from actors.context import Role, UplinkContext
from actors.mcp_client import LocalMcpClient
from actors.messages import EnvelopeIn, SessionClosed, SessionOpened
from actors.sink import FrameSink
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
        self.set_state("idle")

    def on_loop_stop(self) -> None:
        # In the loop thread: cancel what is left and close the pool without
        # waiting (a wait here would block the loop the close runs on).
        for task in list(self._tasks):  # replays outliving the uplink: cancel, not leak
            task.cancel()
        self._close_later()

    def fail_closed(self) -> None:
        # A crash of the books is no reason to drop replays under way: they
        # still answer on their own session; the pool closes after them.
        self._close_later()

    def _close_later(self) -> None:
        _closing.add(closing := asyncio.ensure_future(self._close(list(self._tasks))))
        closing.add_done_callback(_closing.discard)

    async def _close(self, replays: list[asyncio.Future[Any]]) -> None:
        await asyncio.gather(*replays, return_exceptions=True)
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
        """In the event loop, as the frame is parsed: start the replay at once."""
        if message.envelope.type != Kind.MCP_REQUEST:
            return
        task = asyncio.ensure_future(self._serve(message.session, message.envelope, message.sink))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.in_flight += 1
        self.ctx.stats.gauge("mcp_in_flight", self.in_flight)

    async def _serve(self, session: int, request: Envelope, sink: FrameSink) -> None:
        """Replay in the loop and answer from the loop: the sink drops the answer
        if the session has ended meanwhile, so it never reaches the next one."""
        try:
            try:
                payload = await self.client.replay(request.payload)
                text = serialize(mcp_response(request.req_id, payload))
            except Exception as exc:  # a bug, or an answer the wire cannot carry
                payload = error_object(None, INTERNAL_ERROR, f"replay failed: {exc!r}")
                text = serialize(mcp_response(request.req_id, payload))
            if sink.send_text(text):
                self.answered += 1
                self.ctx.stats.inc("frames_out", Kind.MCP_RESPONSE)
            else:
                self.dropped += 1
                self.log.warning(
                    "MCP answer {!r} dropped: its session {} has ended", request.req_id, session
                )
        finally:
            self.in_flight -= 1
            self.ctx.stats.gauge("mcp_in_flight", self.in_flight)


# Pool closes still running after their actor stopped (a reference keeps each alive).
_closing: set[asyncio.Future[None]] = set()
