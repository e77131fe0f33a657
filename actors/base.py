"""The base of every uplink actor: typed dispatch, state logging, crash reporting.

Subclasses mark handlers with ``@handles(MessageType)``. ``set_state`` logs each
state change as one line bound to ``actor=<name>`` and publishes the actor's
snapshot to the status board. A crash in a ``tell``ed message is reported to
the supervisor after the actor's ``fail_closed`` hook has run (pykka has no
supervision of its own: DESIGN.md principle 7).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import pykka
from loguru import logger

from actors.context import Role, UplinkContext
from actors.loop import Timer
from actors.messages import ChildFailed, GetSnapshot, InjectFault

F = TypeVar("F", bound=Callable[..., Any])


class InjectedFault(RuntimeError):
    """Raised by an actor that received :class:`InjectFault` (tests only)."""


def handles(*message_types: type) -> Callable[[F], F]:
    """Mark a method as the handler of ``message_types``."""

    def mark(fn: F) -> F:
        fn._handles = message_types  # type: ignore[attr-defined]
        return fn

    return mark


class UplinkActor(pykka.ThreadingActor):
    role: ClassVar[str]
    _dispatch: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[type, str] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                for message_type in getattr(attr, "_handles", ()):
                    table[message_type] = name
        cls._dispatch = table

    @staticmethod
    def _create_actor_inbox() -> Any:
        # SimpleQueue (C, lock-free put) instead of queue.Queue: pykka only
        # needs put/get/empty, and every hand-off on the hot path is cheaper.
        return queue.SimpleQueue()

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.state = "starting"
        self.log = logger.bind(actor=self.name)

    @property
    def name(self) -> str:
        return self.role

    # ── state ───────────────────────────────────────────────────────────

    def set_state(self, state: str, why: str = "") -> None:
        if state != self.state:
            previous, self.state = self.state, state
            self.log.info("state {} -> {}{}", previous, state, f" ({why})" if why else "")
        self.publish()

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state}

    def publish(self) -> None:
        self.ctx.board.publish(self.name, self.snapshot())

    # ── pykka hooks ─────────────────────────────────────────────────────

    def on_start(self) -> None:
        self.ctx.live.add(self.actor_ref)
        self.log.debug("started")
        self.publish()

    def on_stop(self) -> None:
        self.ctx.live.discard(self.actor_ref)
        self.log.debug("stopped")

    def on_receive(self, message: Any) -> Any:
        handler = self._dispatch.get(type(message))
        if handler is None:
            self.log.warning("ignored unexpected message {}", type(message).__name__)
            return None
        return getattr(self, handler)(message)

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # pykka's own "Unhandled exception" line (routed to loguru) has the traceback.
        self.log.error("actor crashed in its handler: {!r}", exception_value)
        self.ctx.live.discard(self.actor_ref)
        try:
            self.fail_closed()
        finally:
            self.set_state("crashed", repr(exception_value))
            self.ctx.directory.tell(
                Role.SUPERVISOR, ChildFailed(self.role, repr(exception_value), self.session_of())
            )

    def fail_closed(self) -> None:
        """Release whatever this actor holds on a crash (deny, cancel, close)."""

    def session_of(self) -> int | None:
        return None

    def tell_self_later(self, delay: float, message: object) -> Timer:
        """Deliver ``message`` to this actor after ``delay`` seconds (a loop timer)."""
        ref = self.actor_ref

        def deliver() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

        return self.ctx.loop.call_later(delay, deliver)

    # ── common messages ─────────────────────────────────────────────────

    @handles(GetSnapshot)
    def _on_get_snapshot(self, _: GetSnapshot) -> dict[str, Any]:
        return self.snapshot()

    @handles(InjectFault)
    def _on_inject_fault(self, message: InjectFault) -> None:
        raise InjectedFault(message.note)
