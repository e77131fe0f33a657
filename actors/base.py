"""The base of every uplink actor: typed dispatch, state logging, crash reporting.

Subclasses mark handlers with ``@handles(MessageType)``. ``set_state`` logs each
state change as one line bound to ``actor=<name>`` and publishes the actor's
snapshot to the status board. A crash in a ``tell``ed message is reported to
the supervisor after the actor's ``fail_closed`` hook has run (pykka has no
supervision of its own, so the uplink brings its own).

Everything here is pykka's public API: actors are plain ``ThreadingActor``s.
An :class:`UplinkLoopActor` keeps its pykka thread for its life cycle (start,
stop, snapshot) and has its handlers run in the event loop from a
:class:`LoopInbox` of its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
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


class LoopInbox:
    """The mailbox of an :class:`UplinkLoopActor`: any thread puts, the loop handles.

    Messages are handled one at a time, in order, in the event-loop thread.
    Only the first put after a drain wakes the loop (``call_soon``); a put
    made in the loop thread itself while the actor is idle and nothing is
    queued is handled at once (one turn of the loop fewer). Until
    :meth:`open` runs, puts only queue. After :meth:`close`, ``put``
    returns False: the caller learns at once that nobody will answer.
    """

    def __init__(self, loop: EventLoop, handle: Callable[[Any], None]) -> None:
        self._loop = loop
        self._handle = handle
        self._queue: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._armed = True  # not open yet: open() drains what came before it
        self._busy = False  # a message is being handled (no re-entry)
        self.dead = False

    def put(self, message: Any) -> bool:
        if (
            not self._armed
            and not self._busy
            and not self._queue
            and not self.dead
            and self._loop.in_loop_thread()
        ):
            self._busy = True
            try:
                self._handle(message)
            finally:
                self._busy = False
            return True
        with self._lock:
            if self.dead:
                return False
            self._queue.append(message)
            if self._armed:
                return True
            self._armed = True
        try:
            self._loop.call_soon(self.drain)
        except RuntimeError:  # the loop is closed: the uplink is stopping
            return False
        return True

    def open(self) -> None:
        """In the loop: start handling (what was queued first)."""
        self.drain()

    def drain(self, limit: int = 256) -> None:
        """In the loop: handle what is queued, ``limit`` at a time, then yield to I/O."""
        self._armed = False  # before draining: a later put schedules a new drain
        if self._busy:  # a handler's own put, handled after the handler returns
            self._armed = True
            self._loop.loop.call_soon(self.drain)
            return
        self._busy = True
        try:
            for _ in range(limit):
                try:
                    message = self._queue.popleft()
                except IndexError:
                    return
                self._handle(message)
            self._armed = True  # more may be waiting: let I/O run, then go on
            self._loop.loop.call_soon(self.drain)
        finally:
            self._busy = False

    def close(self) -> list[Any]:
        """In the loop: refuse later puts; return what was still queued."""
        with self._lock:
            self.dead = True
            left, self._queue = list(self._queue), collections.deque()
        return left


class UplinkLoopActor(UplinkActor):
    """An uplink actor whose handlers run in the event loop, not in its own thread.

    For an actor whose every message ends in network I/O: a frame in, a
    frame out, no thread hand-off between. Same semantics as the mailbox of
    a threading actor (one message at a time, in order; a crash in a
    handler runs ``fail_closed``, reports to the supervisor and stops the
    actor). Its pykka thread answers ``GetSnapshot`` and runs the life
    cycle; every other message told to it goes to the loop. Handlers must
    never block.

    ``directory.tell`` reaches the loop inbox directly. Messages queued when
    the actor stops or crashes are handed to it once more, after
    ``on_loop_stop``/``fail_closed``, when their type is in ``after_stop``
    (the registry denies the requests among them); the rest are dropped.
    """

    after_stop: ClassVar[tuple[type, ...]] = ()

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        self.inbox = LoopInbox(ctx.loop, self._handle_in_loop)
        self._loop_closed = False
        self._loop_done: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Here, in the thread that starts the actor, before anyone can tell it
        # anything: from now on the role's messages queue for this inbox.
        ctx.directory.set_inbox(self.role, self.inbox)

    # ── the pykka side ──────────────────────────────────────────────────

    def on_start(self) -> None:
        super().on_start()
        self.ctx.loop.call_soon(self._open_in_loop)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, GetSnapshot):
            return self.snapshot()
        self.inbox.put(message)  # InjectFault too: it is handled (and crashes) in the loop
        return None

    def on_stop(self) -> None:
        if not self._loop_closed:
            try:
                self.ctx.loop.call_soon(self._close_in_loop, None)
            except RuntimeError:  # no loop any more: nothing runs there to race with
                self._close_in_loop(None)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self._loop_done.result(timeout=5)
        super().on_stop()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A failure in the pykka thread (a told message it could not forward): fail closed in the
        # loop, where this actor's state lives, like a crash in a handler.
        crash = exception_value if isinstance(exception_value, Exception) else None
        crash = crash or RuntimeError(repr(exception_value))
        try:
            self.ctx.loop.call_soon(self._close_in_loop, crash)
        except RuntimeError:  # no loop any more: nothing runs there to race with
            self._close_in_loop(crash)

    def tell_self_later(self, delay: float, message: object) -> Timer:
        return self.ctx.loop.call_later(delay, lambda: self.inbox.put(message))

    # ── the loop side ───────────────────────────────────────────────────

    def on_loop_start(self) -> None:
        """In the loop, before the first message."""

    def on_loop_stop(self) -> None:
        """In the loop, when the actor stops (not after a crash: ``fail_closed`` runs)."""

    def _open_in_loop(self) -> None:
        try:
            self.on_loop_start()
        except Exception as exc:
            self._close_in_loop(exc)
            return
        self.inbox.open()

    def _handle_in_loop(self, message: Any) -> None:
        if self._loop_closed:
            if isinstance(message, self.after_stop):
                try:
                    super().on_receive(message)
                except Exception:  # nothing left to crash: log it, go on with the rest
                    self.log.exception("handling a late {} failed", type(message).__name__)
            return
        try:
            super().on_receive(message)
        except Exception as exc:
            self._close_in_loop(exc)

    def _close_in_loop(self, crash: Exception | None) -> None:
        """Stop (``crash`` None) or crash, in the loop: exactly once."""
        if self._loop_closed:
            return
        self._loop_closed = True
        try:
            if crash is None:
                self.on_loop_stop()
            else:
                self.log.opt(exception=crash).error("actor crashed in its handler: {!r}", crash)
                self.ctx.live.discard(self.actor_ref)
                self.fail_closed()
            for message in self.inbox.close():
                self._handle_in_loop(message)
        finally:
            self._loop_done.set_result(None)
            if crash is not None:
                self.set_state("crashed", repr(crash))
                # Dead before the supervisor hears of it, as pykka's own crash
                # handling leaves a threading actor: its restart never runs
                # beside it. (Its thread has nothing left to wait for here.)
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    self.actor_ref.stop(block=True, timeout=5)
                self.ctx.directory.tell(
                    Role.SUPERVISOR, ChildFailed(self.role, repr(crash), self.session_of())
                )
