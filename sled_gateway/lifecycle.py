"""Start the gateway's parts in order, stop them in reverse, in one place.

As mopidy's ``_app`` does: each part is a name with a ``start`` and a
``stop``; :meth:`Lifecycle.start` starts them in the order they were added,
:meth:`Lifecycle.stop` stops the started ones last-first. When a start
fails, the parts already started are stopped (in reverse) and the error is
raised; when a stop fails, the failure is logged and the other parts are
still stopped. A part added while running is started at once, and stopped
first.

The gateway's order (:class:`~sled_gateway.server.Gateway` adds them)::

    socket → store → loop → bus → hub → HTTP → transports

- **socket**: the address, bound (and listening, not yet served) first, so a
  taken port fails before anything else starts or logs.
- **store**: the audit log and rules; opened before anything can decide,
  closed after the loop ends, when the sessions' final audit rows are queued.
- **loop**: the event loop thread every async part runs on; when it stops it
  lets the HTTP server close the connections left (keep-alive requests) and
  end, then ends every task still on it.
- **bus**: events, and requests to whoever holds sled X; up before the hub
  publishes on it, down after.
- **hub**: the sled sessions (today ``GatewayApp``'s monitor and shutdown);
  stopping it fails the relays (503) and closes each session with 1001,
  before the HTTP server would close them with 1012.
- **HTTP**: the listening socket; stopping it stops accepting connections.
- **transports**: the terminal prompt, the Matrix bot (anything registered
  with ``Gateway.add_transport``); stopped first, while the gateway still runs.

Adding a part is one ``lifecycle.add(name, start, stop)`` line, at its place
in that order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

log = logger.bind(actor="gateway")


@dataclass(frozen=True, slots=True)
class Part:
    """One thing to start and stop; ``start``/``stop`` may block, and raise."""

    name: str
    start: Callable[[], object]
    stop: Callable[[], object]


class Lifecycle:
    """Parts started in order and stopped in reverse. Thread-safe; stop is idempotent."""

    def __init__(self) -> None:
        self._parts: list[Part] = []
        self._started: list[Part] = []
        self._running = False
        self._lock = threading.RLock()

    def add(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        """Add a part after the others; started at once if the lifecycle runs."""
        part = Part(name, start, stop)
        with self._lock:
            self._parts.append(part)
            if self._running:
                part.start()
                self._started.append(part)

    @property
    def started(self) -> list[str]:
        """The names of the parts running now, in the order they started."""
        with self._lock:
            return [part.name for part in self._started]

    def start(self) -> None:
        """Start every part in order; on a failure, stop the started ones and raise it."""
        with self._lock:
            if self._running:
                raise RuntimeError("already started")
            self._running = True
            for part in self._parts:
                try:
                    part.start()
                except BaseException:
                    log.debug("starting {} failed: stopping what started", part.name)
                    self.stop()
                    raise
                self._started.append(part)

    def stop(self) -> None:
        """Stop the started parts, last-first; each failure is logged, the rest still stop."""
        with self._lock:
            self._running = False
            while self._started:
                part = self._started.pop()
                try:
                    part.stop()
                except Exception as exc:
                    log.opt(exception=exc).error("stopping {} failed: {!r}", part.name, exc)
