"""The supervisor actor: owns the connection's life and restarts what crashes.

It starts one :class:`ConnectionActor` per session, and when a session ends
(clean close, error, or the connection actor's own crash) it tells every
session listener (the registry denies what was sent on it), stops that actor,
waits the back-off (or a random part of the gateway's ``retry_after``) and
starts the next, on the next of the gateway URLs (a shuffled order). A
crashed non-connection actor is restarted from its factory and told about
the live session. Its own state is the connection state the status shows:
``disabled``, ``connecting``, ``connected``, ``backoff``, ``stopping`` (then
``stopped``).
"""

from __future__ import annotations

import random
import time
from typing import Any

import pykka

from actors.backoff import Backoff
from actors.base import UplinkActor, handles
from actors.connection import ConnectionActor
from actors.context import Role, UplinkContext
from actors.loop import Timer
from actors.messages import (
    BackoffElapsed,
    ChildFailed,
    CloseSession,
    Reconnect,
    SessionClosed,
    SessionEnded,
    SessionOpened,
    SessionUp,
    Shutdown,
    Start,
    StatusTick,
)
from actors.sink import FrameSink
from protocol import redact


class SupervisorActor(UplinkActor):
    role = Role.SUPERVISOR

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        config = ctx.config
        self.backoff = Backoff(
            initial=config.backoff_initial,
            maximum=config.backoff_max,
            multiplier=config.backoff_multiplier,
            reset_after=config.backoff_reset_after,
        )
        # The gateway URLs in a shuffled order (a fleet spreads over the replicas);
        # each session dials the next one.
        self.urls = list(config.gateway_urls)
        random.shuffle(self.urls)
        self._next_url = 0
        self.dialed: str | None = None
        self.session = 0
        self.connection: pykka.ActorRef[Any] | None = None
        self.up_at: float | None = None
        self.sessions_up = 0
        self.last_end: str | None = None
        self.wait: float | None = None
        self._backoff_token = 0
        self._backoff_timer: Timer | None = None
        self._status_timer: Timer | None = None
        self._shutdown: Shutdown | None = None
        self.sink: FrameSink | None = None  # the live session's, for restarted listeners

    @property
    def name(self) -> str:
        return Role.SUPERVISOR

    def publish(self) -> None:
        # The supervisor's state machine *is* the connection state of /status.
        self.ctx.board.watch(Role.CONNECTION, self.snapshot)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "url": redact(self.dialed or self.ctx.config.connect_url),
            "session": self.session if self.connection is not None else None,
            "sessions_started": self.session,
            "sessions_up": self.sessions_up,
            "up_for": None if self.up_at is None else round(time.monotonic() - self.up_at, 3),
            "backoff": None if self.wait is None else round(self.wait, 3),
            "last_end": self.last_end,
        }

    def fail_closed(self) -> None:
        """A supervisor crash ends the session it was running: deny what it carried."""
        for timer in (self._backoff_timer, self._status_timer):
            if timer is not None:
                timer.cancel()
        if self.connection is not None:
            self._end_listeners(self.session, "supervisor crashed")
            self.connection.stop(block=False)
            self.connection = None

    def on_failure(self, *exc_info: Any) -> None:
        super().on_failure(*exc_info)
        # Nobody supervises the supervisor, so it replaces itself.
        factory = self.ctx.factories.get(Role.SUPERVISOR)
        if factory is not None and self._shutdown is None:
            self.log.warning("restarting the supervisor")
            replacement = factory()
            self.ctx.directory.set(Role.SUPERVISOR, replacement)
            replacement.tell(Start())

    def on_stop(self) -> None:
        for timer in (self._backoff_timer, self._status_timer):
            if timer is not None:
                timer.cancel()
        if self.connection is not None:
            self.connection.stop(block=False)
        super().on_stop()

    # ── lifecycle ───────────────────────────────────────────────────────

    @handles(Start)
    def _on_start(self, _: Start) -> None:
        self._status_timer = self.tell_self_later(self.ctx.config.status_interval, StatusTick())
        if not self.ctx.config.enabled:
            self.set_state("disabled", "no upstream gateway configured")
            return
        self._connect()

    @handles(Shutdown)
    def _on_shutdown(self, message: Shutdown) -> None:
        self._shutdown = message
        self._cancel_backoff()
        if self.connection is None:
            self.set_state("stopped")
            message.done.set_result(None)
            return
        self.set_state("stopping", f"closing with code {message.close_code}")
        self.connection.tell(CloseSession(message.close_code, "sled uplink shutting down"))

    @handles(Reconnect)
    def _on_reconnect(self, _: Reconnect) -> None:
        if self.state == "backoff":
            self.log.info("SIGHUP: ending the back-off wait, reconnecting now")
            self._cancel_backoff()
            self._connect()
        else:
            self.log.info("SIGHUP ignored: not waiting out a back-off (state {})", self.state)

    @handles(BackoffElapsed)
    def _on_backoff_elapsed(self, message: BackoffElapsed) -> None:
        if message.token == self._backoff_token and self.state == "backoff":
            self._connect()

    @handles(StatusTick)
    def _on_status_tick(self, _: StatusTick) -> None:
        from actors.status import log_snapshot  # late: status imports nothing actor-side

        log_snapshot(self.ctx)
        self._status_timer = self.tell_self_later(self.ctx.config.status_interval, StatusTick())

    # ── sessions ────────────────────────────────────────────────────────

    def _connect(self) -> None:
        self.session = self.ctx.next_session()
        url = None
        if self.urls:
            url = self.urls[self._next_url % len(self.urls)]
            self._next_url += 1
        self.dialed = url
        self.set_state("connecting", f"session {self.session}")
        self.connection = ConnectionActor.start(self.ctx, self.session, url)
        self.ctx.directory.set(Role.CONNECTION, self.connection)

    @handles(SessionUp)
    def _on_session_up(self, message: SessionUp) -> None:
        if message.session != self.session or self.connection is None:
            return
        self.up_at = time.monotonic()
        self.wait = None  # no back-off while connected
        self.sessions_up += 1
        self.ctx.stats.inc("sessions", "up")
        self.ctx.stats.inc("frames_out", "identity")
        self.set_state("connected", f"session {message.session} identified")
        self.sink = message.sink
        for role in self.ctx.session_listeners:
            self.ctx.directory.tell(role, SessionOpened(message.session, message.sink))

    @handles(SessionEnded)
    def _on_session_ended(self, message: SessionEnded) -> None:
        if message.session != self.session or self.connection is None:
            return  # a second report of a session already ended
        self._end_session(message.reason, message.auth_failed, message.retry_after)

    @handles(ChildFailed)
    def _on_child_failed(self, message: ChildFailed) -> None:
        self.ctx.stats.inc("actor_crashes", message.role)
        if message.role == Role.CONNECTION:
            if message.session == self.session and self.connection is not None:
                self._end_session(f"connection actor crashed: {message.error}", False)
            return
        factory = self.ctx.factories.get(message.role)
        if factory is None:
            self.log.error("{} crashed and has no factory; not restarted", message.role)
            return
        self.log.warning("{} crashed ({}); restarting it", message.role, message.error)
        ref = factory()
        self.ctx.directory.set(message.role, ref)
        if (
            self.state == "connected"
            and self.sink is not None
            and message.role in self.ctx.session_listeners
        ):
            self.ctx.directory.tell(message.role, SessionOpened(self.session, self.sink))

    def _end_session(
        self, reason: str, auth_failed: bool, retry_after: float | None = None
    ) -> None:
        session = self.session
        up_for = None if self.up_at is None else time.monotonic() - self.up_at
        self.up_at = None
        self.last_end = reason
        self.ctx.stats.inc("sessions", "ended")
        self._end_listeners(session, reason)
        if self.connection is not None:
            self.connection.stop(block=False)
            if self.ctx.directory.get(Role.CONNECTION) is self.connection:
                self.ctx.directory.set(Role.CONNECTION, None)
            self.connection = None
        if self._shutdown is not None:
            self.log.info("session {} closed for shutdown: {}", session, reason)
            self.set_state("stopped")
            if not self._shutdown.done.done():
                self._shutdown.done.set_result(None)
            return
        if retry_after is not None:
            # The gateway's window, fully jittered; the exponential state is untouched.
            self.wait = self.backoff.full_jitter(retry_after)
            self.log.warning(
                "session {} ended: {}; the gateway asks to retry within {:g}s: waiting {:.2f}s",
                session,
                reason,
                retry_after,
                self.wait,
            )
        elif auth_failed:
            self.wait = self.backoff.next_delay(up_for, auth_failed=True)
            self.log.error(
                "session {}: {}; waiting the maximum back-off ({:.1f}s) before retrying",
                session,
                reason,
                self.wait,
            )
        else:
            self.wait = self.backoff.next_delay(up_for)
            self.log.warning("session {} ended: {}", session, reason)
        self._backoff_token += 1
        self._backoff_timer = self.tell_self_later(self.wait, BackoffElapsed(self._backoff_token))
        self.set_state("backoff", f"reconnecting in {self.wait:.2f}s")

    def _end_listeners(self, session: int, reason: str) -> None:
        for role in self.ctx.session_listeners:
            self.ctx.directory.tell(role, SessionClosed(session, reason))

    def _cancel_backoff(self) -> None:
        self._backoff_token += 1
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
