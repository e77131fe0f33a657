"""The router actor: parses inbound frames and dispatches them by ``type``.

Its table (``ctx.routes``: kind → role) is the one place a new envelope kind
is registered. Malformed frames and unknown kinds are logged, counted and
dropped; the connection stays up.
"""

from __future__ import annotations

from typing import Any

from actors.base import UplinkActor, handles
from actors.context import Role, UplinkContext
from actors.messages import EnvelopeIn, FrameIn
from protocol import RemoteProtocolError, parse

# Floods of bad frames must not flood the log: after the first few of a
# reason, only every Nth is logged (all are counted).
_LOG_FIRST = 10
_LOG_EVERY = 1000


class RouterActor(UplinkActor):
    role = Role.ROUTER

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        self.routed = 0
        self.dropped = 0

    def on_start(self) -> None:
        super().on_start()
        self.set_state("routing", ", ".join(f"{k}->{r}" for k, r in self.ctx.routes.items()))

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "routes": dict(self.ctx.routes),
            "routed": self.routed,
            "dropped": self.dropped,
        }

    @handles(FrameIn)
    def _on_frame(self, message: FrameIn) -> None:
        stats = self.ctx.stats
        try:
            envelope = parse(message.data)
        except RemoteProtocolError as exc:
            self._drop(exc.reason, "malformed frame dropped ({})", exc)
            return
        role = self.ctx.routes.get(envelope.type)
        if role is None:
            stats.inc("frames_in", "unknown")
            self._drop("unknown_type", "frame of unknown type {!r} dropped", envelope.type)
            return
        stats.inc("frames_in", envelope.type)
        if self.ctx.directory.tell(role, EnvelopeIn(message.session, envelope)):
            self.routed += 1
        else:
            self._drop("no_handler", "no live handler {} for {!r}; dropped", role, envelope.type)

    def _drop(self, reason: str, template: str, *args: object) -> None:
        self.dropped += 1
        self.ctx.stats.inc("frames_dropped", reason)
        seen = self.ctx.stats.counter("frames_dropped", reason)
        if seen <= _LOG_FIRST or seen % _LOG_EVERY == 0:
            self.log.warning(template + " [{} so far]", *args, seen)
        if self.dropped % 100 == 1:
            self.publish()
