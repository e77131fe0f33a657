"""The heartbeat actor: one ``heartbeat`` frame per interval while a session is up.

The first beat goes one interval after the session opens (never before
identity), ticks are scheduled against a fixed grid so they do not drift, and
each tick carries its session and generation, so a tick from an ended session
never leaks into the next one.
"""

from __future__ import annotations

import time
from typing import Any

from actors.base import UplinkActor, handles
from actors.context import Role, UplinkContext
from actors.loop import Timer
from actors.messages import SessionClosed, SessionOpened, Tick
from actors.sink import FrameSink
from protocol import HEARTBEAT, serialize

_HEARTBEAT_TEXT = serialize(HEARTBEAT)


class HeartbeatActor(UplinkActor):
    role = Role.HEARTBEAT

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        self.session: int | None = None
        self.sink: FrameSink | None = None
        self.generation = 0
        self.sent = 0
        self._next_at = 0.0
        self._timer: Timer | None = None

    def on_start(self) -> None:
        super().on_start()
        self.set_state("idle")

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "session": self.session,
            "interval": self.ctx.config.heartbeat_interval,
            "sent": self.sent,
        }

    def on_stop(self) -> None:
        self._cancel()
        super().on_stop()

    @handles(SessionOpened)
    def _on_opened(self, message: SessionOpened) -> None:
        self._cancel()
        self.session = message.session
        self.sink = message.sink
        self.generation += 1
        self._next_at = time.monotonic() + self.ctx.config.heartbeat_interval
        self._schedule()
        self.set_state("beating", f"session {message.session}")

    @handles(SessionClosed)
    def _on_closed(self, message: SessionClosed) -> None:
        if message.session == self.session:
            self._cancel()
            self.session = None
            self.sink = None
            self.generation += 1
            self.set_state("idle", f"session {message.session} ended")

    @handles(Tick)
    def _on_tick(self, tick: Tick) -> None:
        if tick.session != self.session or tick.generation != self.generation:
            return  # a stale tick from an ended session
        if self.sink is None:
            return
        self.sink.send_text(_HEARTBEAT_TEXT)
        self.ctx.stats.inc("frames_out", HEARTBEAT.type)
        self.sent += 1
        self.log.debug("heartbeat {} on session {}", self.sent, tick.session)
        self.publish()
        interval = self.ctx.config.heartbeat_interval
        self._next_at += interval
        now = time.monotonic()
        if self._next_at < now:  # we fell behind (suspended?): skip, do not burst
            self._next_at = now + interval
        self._schedule()

    def _schedule(self) -> None:
        tick = Tick(self.session or 0, self.generation)
        delay = self._next_at - time.monotonic()
        self._timer = self.tell_self_later(delay, tick)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
