"""What every actor shares: config, event loop, directory, status board, counters.

The :class:`Directory` maps a role to the live actor for it, so that a
restarted actor is found under the same name. The :class:`StatusBoard` holds
each actor's last published state, so a snapshot never has to ``ask`` a busy
actor. :class:`Stats` keeps the counters that ``/status`` and ``/metrics``
show.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import pykka
from loguru import logger

from actors.config import UplinkConfig
from actors.loop import EventLoop
from actors.sink import FrameSink


class Role:
    SUPERVISOR: Final = "supervisor"
    CONNECTION: Final = "connection"
    ROUTER: Final = "router"
    PERMISSIONS: Final = "permissions"
    HEARTBEAT: Final = "heartbeat"
    MCP: Final = "mcp"


class Inbox(Protocol):
    """Where a loop actor's messages go (see ``actors.base.LoopInbox``)."""

    def put(self, message: Any) -> bool: ...


class FrameRouter(Protocol):
    """What a session needs of the router: one call per inbound message, in the loop."""

    def dispatch(self, session: int, data: str | bytes, sink: FrameSink) -> None: ...


class Directory:
    """role → live actor: the one way a message reaches an actor.

    ``tell`` puts it into the role's loop inbox when the actor runs in the
    event loop, else into its pykka mailbox; to a missing or dead actor it
    returns False.
    """

    def __init__(self) -> None:
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._inboxes: dict[str, Inbox] = {}
        self._lock = threading.Lock()

    def set(self, role: str, ref: pykka.ActorRef[Any] | None) -> None:
        with self._lock:
            if ref is None:
                self._refs.pop(role, None)
                self._inboxes.pop(role, None)
            else:
                self._refs[role] = ref

    def set_inbox(self, role: str, inbox: Inbox) -> None:
        with self._lock:
            self._inboxes[role] = inbox

    def get(self, role: str) -> pykka.ActorRef[Any] | None:
        return self._refs.get(role)

    def tell(self, role: str, message: object) -> bool:
        inbox = self._inboxes.get(role)
        if inbox is not None:
            return inbox.put(message)
        ref = self._refs.get(role)
        if ref is None:
            return False
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            logger.bind(actor="directory").debug(
                "{} is not running; dropped {}", role, type(message).__name__
            )
            return False
        return True


class StatusBoard:
    """Each actor's state, read without asking the actor (thread-safe).

    An actor either publishes a dict when its state changes, or registers a
    ``watch`` function that renders its state when a snapshot is taken, which
    keeps busy actors (the registry, the router) from rebuilding a dict per
    message. Watch functions only read plain attributes, which is safe from
    another thread.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Any] | Callable[[], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def publish(self, name: str, state: dict[str, Any]) -> None:
        with self._lock:
            self._states[name] = state

    def watch(self, name: str, render: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            self._states[name] = render

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            states = dict(self._states)
        return {name: _render(s) for name, s in states.items()}


def _render(state: dict[str, Any] | Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if not callable(state):
        return dict(state)
    try:
        return dict(state())
    except Exception as exc:  # read while its actor changed it: report, never fail /status
        return {"state": "unavailable", "error": repr(exc)}


class Stats:
    """Monotonic counters by (family, label) plus gauges; thread-safe."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter[str]] = {}
        self._gauges: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, family: str, label: str, amount: int = 1) -> None:
        with self._lock:
            counter = self._counters.get(family)
            if counter is None:
                counter = self._counters[family] = Counter()
            counter[label] += amount

    def inc_each(self, *pairs: tuple[str, str]) -> None:
        """``inc(family, label)`` for each pair, under one lock acquisition."""
        with self._lock:
            for family, label in pairs:
                counter = self._counters.get(family)
                if counter is None:
                    counter = self._counters[family] = Counter()
                counter[label] += 1

    def gauge(self, name: str, value: float) -> None:
        self._gauges[name] = value

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counters = {family: dict(c) for family, c in self._counters.items()}
            return {"counters": counters, "gauges": dict(self._gauges)}

    def counter(self, family: str, label: str) -> int:
        with self._lock:
            return self._counters.get(family, Counter())[label]


@dataclass(slots=True)
class UplinkContext:
    """The shared, long-lived pieces handed to every actor's constructor."""

    config: UplinkConfig
    loop: EventLoop
    directory: Directory = field(default_factory=Directory)
    board: StatusBoard = field(default_factory=StatusBoard)
    stats: Stats = field(default_factory=Stats)
    # kind → role of the actor that handles frames of that kind (the router's table).
    routes: dict[str, str] = field(default_factory=dict)
    # The router, called from the event loop for every inbound frame.
    router: FrameRouter | None = None
    # role → how to build a fresh actor for it (used by the supervisor to restart).
    factories: dict[str, Callable[[], pykka.ActorRef[Any]]] = field(default_factory=dict)
    # roles that want SessionOpened / SessionClosed, in start order.
    session_listeners: list[str] = field(default_factory=list)
    # Every actor of this uplink that is running, so stop() can find stragglers.
    live: set[pykka.ActorRef[Any]] = field(default_factory=set)
    # Session numbers only grow, even across a supervisor restart.
    last_session: int = 0

    def next_session(self) -> int:
        self.last_session += 1
        return self.last_session
