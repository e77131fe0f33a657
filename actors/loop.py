"""The one asyncio event loop that does all network I/O.

Actors never block their mailboxes on sockets or HTTP :
they hand coroutines and timers to this loop, and the loop answers them with
``tell``. Either anyio's :class:`BlockingPortal` runs the loop in a helper
thread (``EventLoop()``, on uvloop where it is installed), or an asyncio
application lends the uplink its own running loop (``await EventLoop.adopt()``),
so that its awaits reach the socket without crossing threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's where it is installed (a dependency on every platform
    but Windows), else asyncio's. The uplink's and the gateway's hot paths are each two
    sockets' reads and writes a request, and uvloop takes 4-10 % of the CPU off them
    (docs/benchmarks.md, targets 1 and 4)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Timer:
    """A cancellable one-shot timer; ``cancel`` may be called from any thread."""

    __slots__ = ("_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: nothing to cancel
            self._loop.call_soon_threadsafe(self._cancel_in_loop)

    def _cancel_in_loop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class EventLoop:
    """A running asyncio loop with thread-safe entry points."""

    def __init__(self) -> None:
        self._portal_cm: Any = start_blocking_portal(
            backend="asyncio", backend_options={"loop_factory": new_event_loop}
        )
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.loop: asyncio.AbstractEventLoop = self.portal.call(asyncio.get_running_loop)
        self.thread_id: int = self.portal.call(threading.get_ident)
        self._holder: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def adopt(cls) -> EventLoop:
        """Use the running loop (the caller's) instead of starting a thread.

        The portal lives in a task of its own, so that whichever task later
        closes the uplink, anyio's task group is entered and left by one task.
        """
        self = cls.__new__(cls)
        self._portal_cm = None
        self.loop = asyncio.get_running_loop()
        self.thread_id = threading.get_ident()
        self._closed = False
        ready: asyncio.Future[BlockingPortal] = self.loop.create_future()

        async def hold() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        self._holder = self.loop.create_task(hold(), name="sled-uplink portal")
        self.portal = await ready
        return self

    @property
    def adopted(self) -> bool:
        """True when the loop belongs to the application, not to a helper thread."""
        return self._portal_cm is None

    def in_loop_thread(self) -> bool:
        """True in the loop's own thread, where a blocking wait on it would deadlock."""
        return threading.get_ident() == self.thread_id

    def spawn(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` as a task in the loop; returns a thread-safe future."""
        return self.portal.start_task_soon(fn, *args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop thread soon, from any thread.

        From the loop thread itself this is a plain ``call_soon``: no write
        to the loop's wake-up pipe, no extra turn of the loop.
        """
        if self.in_loop_thread():
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        """Run ``fn()`` in the loop thread after ``delay`` seconds."""
        timer = Timer(self.loop)

        def arm() -> None:
            timer._handle = self.loop.call_later(max(0.0, delay), fn)

        self.call_soon(arm)
        return timer

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Run a coroutine in the loop and wait (edges only) up to ``timeout``."""
        if self.in_loop_thread():
            raise RuntimeError("EventLoop.run would block the event loop it waits on")
        return self.spawn(fn, *args).result(timeout=timeout)

    def close(self) -> None:
        """Cancel what still runs in the loop; stop the helper thread, if it is ours.

        Not from the loop thread: an adopted loop is closed by :meth:`aclose`.
        """
        if self._closed:
            return
        if self.in_loop_thread():
            raise RuntimeError("EventLoop.close would block the event loop; use aclose")
        self._closed = True
        with contextlib.suppress(Exception):
            self.portal.call(self.portal.stop, True)
        if self._portal_cm is not None:
            with contextlib.suppress(Exception):
                self._portal_cm.__exit__(None, None, None)

    async def aclose(self) -> None:
        """Close an adopted loop's portal from inside that loop."""
        if not self._closed:
            self._closed = True
            await self.portal.stop(cancel_remaining=True)
        if self._holder is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._holder
