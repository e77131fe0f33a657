"""The one asyncio event loop that does all network I/O, in a helper thread.

Actors never block their mailboxes on sockets or HTTP (DESIGN.md principle 4):
they hand coroutines and timers to this loop, and the loop answers them with
``tell``. anyio's :class:`BlockingPortal` owns the thread.
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
    """A running asyncio loop in its own thread, with thread-safe entry points."""

    def __init__(self) -> None:
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.loop: asyncio.AbstractEventLoop = self.portal.call(asyncio.get_running_loop)
        self.thread_id: int = self.portal.call(threading.get_ident)
        self._closed = False

    def spawn(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` as a task in the loop; returns a thread-safe future."""
        return self.portal.start_task_soon(fn, *args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop thread soon, from any thread.

        From the loop thread itself this is a plain ``call_soon``: no write
        to the loop's wake-up pipe, no extra turn of the loop.
        """
        if threading.get_ident() == self.thread_id:
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        """Run ``fn()`` in the loop thread after ``delay`` seconds."""
        timer = Timer(self.loop)

        def arm() -> None:
            timer._handle = self.loop.call_later(max(0.0, delay), fn)

        self.loop.call_soon_threadsafe(arm)
        return timer

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Run a coroutine in the loop and wait (edges only) up to ``timeout``."""
        return self.spawn(fn, *args).result(timeout=timeout)

    def close(self) -> None:
        """Cancel what still runs in the loop and stop its thread."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.portal.call(self.portal.stop, True)
        with contextlib.suppress(Exception):
            self._portal_cm.__exit__(None, None, None)
