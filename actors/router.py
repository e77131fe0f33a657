"""The router: parses inbound frames and dispatches them by ``type``.

:class:`Router` is the logic: parse, look the kind up in the handler table
(``ctx.routes``: kind → role), count, and ``tell`` the handling actor through
the directory (a loop actor handles it right there, in the event loop). The
connection calls it from the event loop as each frame is parsed; nothing
else sends frames in. :class:`RouterActor` is the thin actor that supervises
it: it publishes the table and counts on the status board and is restarted
like any other actor. Malformed frames and unknown kinds are logged, counted
and dropped; the connection stays up.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from actors.base import UplinkActor
from actors.context import Role, UplinkContext
from actors.messages import EnvelopeIn
from actors.sink import FrameSink
from protocol import RemoteProtocolError, parse

# Floods of bad frames must not flood the log: after the first few of a
# reason, only every Nth is logged (all are counted).
_LOG_FIRST = 10
_LOG_EVERY = 1000


class Router:
    """Frame dispatch by kind; safe to call from the event-loop thread."""

    def __init__(self, ctx: UplinkContext) -> None:
        self.ctx = ctx
        self.routed = 0
        self.dropped = 0
        self.log = logger.bind(actor=Role.ROUTER)

    def dispatch(self, session: int, data: str | bytes, sink: FrameSink) -> None:
        stats = self.ctx.stats
        try:
            envelope = parse(data)
        except RemoteProtocolError as exc:
            self._drop(exc.reason, "malformed frame dropped ({})", exc)
            return
        role = self.ctx.routes.get(envelope.type)
        if role is None:
            stats.inc("frames_in", "unknown")
            self._drop("unknown_type", "frame of unknown type {!r} dropped", envelope.type)
            return
        stats.inc("frames_in", envelope.type)
        if self.ctx.directory.tell(role, EnvelopeIn(session, envelope, sink)):
            self.routed += 1
        else:
            self._drop("no_handler", "no live handler {} for {!r}; dropped", role, envelope.type)

    def snapshot(self) -> dict[str, Any]:
        return {"routes": dict(self.ctx.routes), "routed": self.routed, "dropped": self.dropped}

    def _drop(self, reason: str, template: str, *args: object) -> None:
        self.dropped += 1
        self.ctx.stats.inc("frames_dropped", reason)
        seen = self.ctx.stats.counter("frames_dropped", reason)
        if seen <= _LOG_FIRST or seen % _LOG_EVERY == 0:
            self.log.warning(template + " [{} so far]", *args, seen)


class RouterActor(UplinkActor):
    role = Role.ROUTER

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        # One Router per uplink, kept across restarts of this actor (its counts too).
        router = ctx.router
        if not isinstance(router, Router):
            router = ctx.router = Router(ctx)
        self.router = router

    def on_start(self) -> None:
        super().on_start()
        self.set_state("routing", ", ".join(f"{k}->{r}" for k, r in self.ctx.routes.items()))

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, **self.router.snapshot()}
