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
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import pykka
from loguru import logger

from actors.context import Role, UplinkContext
from actors.loop import EventLoop, Timer
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
        """Put this actor on the status board; the board reads ``snapshot`` live."""
        self.ctx.board.watch(self.name, self.snapshot)

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


class _LoopInbox:
    """A pykka inbox whose messages are handled in the event-loop thread.

    Any thread may ``put``; only the first put after a drain schedules one
    (``call_soon_threadsafe``). A put made in the loop thread itself, while
    the actor is idle and nothing is queued, is handled at once: the same
    one-at-a-time order, one turn of the loop fewer. ``get``/``empty`` are
    what pykka's teardown and the registry's crash drain use.
    """

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.armed = False
        self.busy = False  # a message of this actor is being handled (no re-entry)
        self.loop: EventLoop | None = None
        self.wake: Callable[[], object] | None = None
        self.handle_now: Callable[[Any], None] | None = None

    def put(self, envelope: Any) -> None:
        if (
            not self.armed
            and not self.busy
            and self.handle_now is not None
            and self.loop is not None
            and self.loop.in_loop_thread()
            and self.queue.empty()
        ):
            self.handle_now(envelope)
            return
        self.queue.put(envelope)
        if not self.armed and self.wake is not None:
            self.armed = True
            self.wake()

    def get(self) -> Any:
        return self.queue.get_nowait()

    def empty(self) -> bool:
        return self.queue.empty()


class UplinkLoopActor(UplinkActor):
    """An uplink actor scheduled on the event loop instead of its own thread.

    Same mailbox semantics as a pykka ``ThreadingActor`` (one message at a
    time, in order; ``on_failure`` and a stop after a crash in a ``tell``ed
    message; ``ask`` and blocking ``stop`` from other threads), but each
    message runs as a callback in the uplink's event loop. An actor whose
    every message ends in network I/O saves two thread hand-offs per round
    trip this way. Its handlers must never block, and nobody may ``ask`` it
    from the event-loop thread.

    It drives pykka's own ``_handle_receive``/``_handle_failure``/teardown
    (pinned to pykka 4), so the semantics stay pykka's.
    """

    _BATCH = 256  # messages per loop turn before yielding to I/O

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _LoopInbox()

    def _start_actor_loop(self) -> None:
        loop = self.ctx.loop
        inbox: _LoopInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.loop = loop
        inbox.wake = lambda: loop.call_soon(self._drain)
        inbox.handle_now = self._handle_now
        inbox.armed = True  # the setup callback drains what came before it
        loop.call_soon(self._setup_then_drain)

    def _setup_then_drain(self) -> None:
        self._actor_loop_setup()  # on_start, with pykka's failure handling
        self._drain()

    def _handle_now(self, envelope: Any) -> None:
        """Handle one message put from the loop thread while the actor was idle."""
        inbox: _LoopInbox = self.actor_inbox  # type: ignore[assignment]
        if self.actor_stopped.is_set():
            inbox.queue.put(envelope)  # pykka's teardown answers it, as for any late message
            return
        inbox.busy = True
        try:
            self._handle_envelope(envelope)
            if self.actor_stopped.is_set():
                self._teardown_once()
        finally:
            inbox.busy = False

    def _drain(self) -> None:
        inbox: _LoopInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.armed = False  # before draining: a later put schedules a new drain
        inbox.busy = True
        try:
            for _ in range(self._BATCH):
                if self.actor_stopped.is_set():
                    break
                try:
                    envelope = inbox.queue.get_nowait()
                except queue.Empty:
                    return
                self._handle_envelope(envelope)
            else:
                inbox.armed = True  # more may be waiting: let I/O run, then continue
                self.ctx.loop.loop.call_soon(self._drain)
                return
            self._teardown_once()
        finally:
            inbox.busy = False

    def _teardown_once(self) -> None:
        if not getattr(self, "_torn_down", False):
            self._torn_down = True
            self._actor_loop_teardown()  # answer queued asks with ActorDeadError

    def _handle_envelope(self, envelope: Any) -> None:
        # pykka's ThreadingActor loop body, for one message.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
