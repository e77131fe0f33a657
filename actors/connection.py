"""The connection actor: one WebSocket session to the gateway.

The supervisor starts a fresh ``ConnectionActor`` for every session (session
numbers only grow) and stops it when the session ends, so "restart the
connection" is literal. The socket itself lives in the event loop (a
:class:`~actors.websocket.WebSocket`); this thin actor starts the session
task, closes it on request and cancels it when it stops or crashes.

The session task: connect, send ``identity`` first, report ``SessionUp``,
then hand every inbound message to the router as it is parsed, until the
socket ends. Whatever ends it, it reports ``SessionEnded`` exactly once,
which is what makes the registry fail closed. A close ``1012``/``1013`` with
the reason ``retry_after=<s>`` carries ``s`` along (:func:`retry_after_of`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import ssl
import time
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from actors.base import UplinkActor, handles
from actors.context import Role, UplinkContext
from actors.messages import CloseSession, SessionEnded, SessionUp
from actors.sink import FrameSink, Outbox
from actors.websocket import WebSocket, open_websocket
from protocol import identity, printable, redact, serialize


def describe_close(exc: ConnectionClosed) -> tuple[str, bool]:
    """Human words for how a session closed, and whether it closed cleanly."""
    received = exc.rcvd
    sent = exc.sent
    if received is not None and sent is not None and exc.rcvd_then_sent is False:
        words = f"connection closed (code {received.code}"  # we closed; the gateway agreed
        words += f", {received.reason!r})" if received.reason else ")"
        return words, received.code in (1000, 1001)
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


#: The close codes whose reason may say when to come back: 1012 (service
#: restart: a replica draining) and 1013 (try again later: it takes no sleds now).
RETRY_AFTER_CODES = (1012, 1013)
#: The longest ``retry_after`` honoured; a larger one is treated as malformed,
#: so a confused gateway cannot park the sled (whose agents wait) for hours.
MAX_RETRY_AFTER = 3600.0
_RETRY_AFTER = re.compile(r"retry_after=([0-9]{1,7}(?:\.[0-9]{1,6})?)")


def retry_after_of(exc: ConnectionClosed) -> tuple[float | None, str | None]:
    """``(seconds, None)`` when the gateway closed with 1012/1013 and ``retry_after=<s>``;
    ``(None, why)`` when that reason is malformed; ``(None, None)`` otherwise."""
    received = exc.rcvd
    if received is None or received.code not in RETRY_AFTER_CODES:
        return None, None
    reason = received.reason
    if not reason.startswith("retry_after"):
        return None, None
    match = _RETRY_AFTER.fullmatch(reason)
    if match is None:
        return None, f"malformed close reason {printable(reason, 80)!r}"
    seconds = float(match.group(1))
    if seconds > MAX_RETRY_AFTER:
        return None, f"retry_after={seconds:g} is over {MAX_RETRY_AFTER:g} s"
    return seconds, None


class _Connected:
    """Internal: the session task tells its actor that the socket is open."""

    __slots__ = ()


class ConnectionActor(UplinkActor):
    role = Role.CONNECTION

    def __init__(self, ctx: UplinkContext, session: int, url: str | None = None) -> None:
        self.session = session  # before super(): the logger is bound to the name
        super().__init__(ctx)
        # The gateway URL this session dials (the supervisor picks one of several).
        self.dial = url if url is not None else ctx.config.connect_url
        self.url = redact(self.dial)
        self._ws: WebSocket | None = None
        self._outbox: Outbox | None = None
        self._task: concurrent.futures.Future[None] | None = None
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

    @handles(CloseSession)
    def _on_close(self, message: CloseSession) -> None:
        ws = self._ws
        if ws is not None:
            self.set_state("closing", f"code {message.code}")
            self.ctx.loop.call_soon(ws.close, message.code, message.reason)
        elif self._task is not None:
            self._task.cancel()

    @handles(_Connected)
    def _on_connected(self, _: _Connected) -> None:
        self.set_state("connected")

    # ── the session, in the event loop ──────────────────────────────────

    async def _run_session(self) -> None:
        config = self.ctx.config
        up_at: float | None = None
        ended = SessionEnded(self.session, "connection attempt ended")
        router = self.ctx.router
        assert router is not None  # the router actor is started before any session
        ws: WebSocket | None = None
        try:
            ws = await open_websocket(
                self.dial,
                # identity is the first frame of every session, before anything else.
                first_text=serialize(identity(config.project, **config.identity_payload)),
                open_timeout=config.open_timeout,
                close_timeout=config.close_timeout,
                max_size=config.max_frame_bytes,
                user_agent=f"sled-uplink/{config.identity_extra.get('version', '0')}",
                ca_file=config.ca_file,
            )
            self._ws = ws
            up_at = time.monotonic()
            self._outbox = Outbox(self.ctx.loop, ws.send_text)
            sink = self._sink = FrameSink(self.session, self._outbox)
            route, session, log = router.dispatch, self.session, self.log

            def on_message(data: str | bytes) -> None:
                try:
                    route(session, data, sink)
                except Exception:  # a bug in a handler: drop the frame, keep the session
                    log.exception("dispatching an inbound frame failed; dropped it")

            ws.deliver_to(on_message)
            ws.keepalive(config.ping_interval, config.ping_timeout)
            self.ctx.directory.tell(Role.SUPERVISOR, SessionUp(self.session, sink))
            self.actor_ref.tell(_Connected())
            await asyncio.shield(ws.closed)
            if ws.dead_reason is not None:
                self.log.warning("{}; dropped the session", ws.dead_reason)
                ended = self._ended(up_at, ws.dead_reason)
            else:
                words, clean = describe_close(ws.close_exc)
                retry_after, bad = retry_after_of(ws.close_exc)
                if bad is not None:
                    self.log.warning("gateway close: {}; ignored, the back-off applies", bad)
                ended = self._ended(up_at, words, clean=clean, retry_after=retry_after)
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
            if ws is not None:
                ws.abort()  # the session task outlives no actor
            ended = self._ended(up_at, "session cancelled")
            raise
        except (OSError, WebSocketException, ssl.SSLError) as exc:
            ended = self._ended(up_at, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug; still end the session so requests fail closed
            self.log.exception("session task failed")
            if ws is not None:
                ws.abort()
            ended = self._ended(up_at, f"internal error: {exc!r}")
        finally:
            if self._outbox is not None:
                self._outbox.closed = True
            self._ws = None
            self._outbox = None
            self.ctx.directory.tell(Role.SUPERVISOR, ended)

    def _ended(
        self,
        up_at: float | None,
        reason: str,
        *,
        clean: bool = False,
        auth_failed: bool = False,
        retry_after: float | None = None,
    ) -> SessionEnded:
        up_for = None if up_at is None else time.monotonic() - up_at
        return SessionEnded(self.session, redact(reason), up_for, auth_failed, clean, retry_after)
