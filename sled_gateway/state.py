"""The gateway's read model: sleds, pending permission requests, recent decisions.

No I/O and no asyncio. :meth:`GatewayState.follow` subscribes it to the
gateway's events (:mod:`sled_gateway.events`), which the hub and the
approvals service publish on the event loop. Any thread may take a
:meth:`~GatewayState.snapshot` or block in :meth:`~GatewayState.wait_for`
until something changes. One re-entrant lock
guards everything, and a Condition on it wakes waiters on every change, so
tests and the terminal prompt wait on events instead of sleeping.

Sessions are numbered: a sled record and each pending
request remember the session that produced them, so the late end of a replaced
session cannot touch its successor.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol import JSON
from sled_gateway.events import (
    Events,
    FrameReceived,
    PermissionDecided,
    PermissionRequested,
    PermissionVoted,
    PermissionWithdrawn,
    SledDown,
    SledHeartbeat,
    SledUp,
)
from sled_gateway.records import (
    AlreadyDecided,
    DecisionRecord,
    PendingPermission,
    UnknownRequest,
    iso,
)

#: A sled is stale after this many missed heartbeat intervals.
STALE_AFTER_INTERVALS = 3
#: How many decided request keys are remembered to answer 409 (not 404).
DECIDED_MEMORY = 10_000
#: How many decisions the console's log shows.
RECENT_DECISIONS = 200


class SledState(enum.StrEnum):
    CONNECTED = "connected"
    STALE = "stale"
    DISCONNECTED = "disconnected"


@dataclass(slots=True)
class SledRecord:
    """What the gateway knows of one project's sled (the newest session wins).

    Slotted: a replica keeps one for every sled of the fleet, its own and the others'.
    """

    project: str
    session: int
    remote: str
    connected_at: float  # wall clock
    beat_mono: float  # monotonic time of the last heartbeat (or of identity)
    info: dict[str, JSON] = field(default_factory=dict)  # identity's extra keys
    last_heartbeat: float | None = None  # wall clock
    disconnected_at: float | None = None
    disconnected_mono: float | None = None  # for forgetting it after a while
    close_code: int | None = None
    frames_in: int = 0
    frames_dropped: int = 0
    reported: SledState = SledState.CONNECTED  # last state announced in the log
    #: The gateway replica holding its session; None: this process.
    replica: str | None = None

    def state_at(self, mono_now: float, stale_after: float) -> SledState:
        if self.disconnected_at is not None:
            return SledState.DISCONNECTED
        if mono_now - self.beat_mono > stale_after:
            return SledState.STALE
        return SledState.CONNECTED


def tally_states(
    records: Iterable[SledRecord], mono_now: float, stale_after: float
) -> dict[SledState, int]:
    """How many of ``records`` are in each state: :meth:`SledRecord.state_at`'s rule,
    inlined, because a console's poll counts every sled of the fleet and a call a sled
    was most of its cost."""
    disconnected = stale = total = 0
    for rec in records:
        total += 1
        if rec.disconnected_at is not None:
            disconnected += 1
        elif mono_now - rec.beat_mono > stale_after:
            stale += 1
    return {
        SledState.CONNECTED: total - disconnected - stale,
        SledState.STALE: stale,
        SledState.DISCONNECTED: disconnected,
    }


Key = tuple[str, str]  # (project, req_id)


class GatewayState:
    """Thread-safe registry of sleds, pending requests and recent decisions."""

    def __init__(
        self,
        heartbeat_interval: float,
        *,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = STALE_AFTER_INTERVALS * heartbeat_interval
        self._mono = mono
        self._wall = wall
        # Changes and reads take the RLock itself (its enter and exit are C); only
        # wait_for goes through the Condition's Python methods, on the same lock.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._sleds: dict[str, SledRecord] = {}
        # The projects of ``_sleds`` by name, kept until one comes or goes: a console's
        # poll lists the first of thousands, and sorting them each time cost it more than
        # the rest of the document.
        self._projects_in_order: list[str] | None = None
        self._pending: OrderedDict[Key, PendingPermission] = OrderedDict()
        # Tool-input bytes the pending requests hold, per project and in all.
        self._pending_bytes: dict[str, int] = {}
        self._pending_bytes_total = 0
        self._decided: OrderedDict[Key, DecisionRecord] = OrderedDict()
        self._recent: deque[DecisionRecord] = deque(maxlen=RECENT_DECISIONS)
        self._version = 0  # bumped on every change; lets waiters see "something happened"
        # What other replicas hold, as last read from the shared store (set_fleet).
        self._remote_sleds: set[str] = set()
        self._remote_pending: set[Key] = set()
        self._listeners: list[Callable[[], None]] = []

    # -- changes: events from the loop ------------------------------------------

    def follow(self, events: Events) -> None:
        """Keep this read model up to date from ``events`` (subscribe once, before serving)."""
        events.subscribe(SledUp, self._on_sled_up)
        events.subscribe(SledHeartbeat, self._on_heartbeat)
        events.subscribe(FrameReceived, self._on_frame)
        events.subscribe(SledDown, self._on_sled_down)
        events.subscribe(PermissionRequested, self._on_requested)
        events.subscribe(PermissionDecided, self._on_decided)
        events.subscribe(PermissionWithdrawn, self._on_withdrawn)
        events.subscribe(PermissionVoted, self._on_voted)

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change, under the lock, on the changing
        thread: it must be quick and must not call back into this object."""
        self._listeners.append(callback)

    def _put_sled(self, rec: SledRecord) -> None:
        if rec.project not in self._sleds:
            self._projects_in_order = None
        self._sleds[rec.project] = rec

    def _drop_sled(self, project: str) -> None:
        del self._sleds[project]
        self._projects_in_order = None

    def _ordered_projects(self) -> list[str]:
        if self._projects_in_order is None:
            self._projects_in_order = sorted(self._sleds)
        return self._projects_in_order

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()
        for callback in self._listeners:
            callback()

    def _on_sled_up(self, event: SledUp) -> None:
        with self._lock:
            self._remote_sleds.discard(event.project)
            self._put_sled(
                SledRecord(
                    project=event.project,
                    session=event.session,
                    remote=event.remote,
                    connected_at=self._wall(),
                    beat_mono=self._mono(),
                    info=event.info,
                )
            )
            self._changed()

    def _on_sled_down(self, event: SledDown) -> None:
        with self._lock:
            project = event.project
            rec = self._sleds.get(project) if project is not None else None
            # The late end of a replaced session must not touch its successor.
            if (
                rec is not None
                and rec.replica is None
                and rec.session == event.session
                and rec.disconnected_at is None
            ):
                rec.disconnected_at = self._wall()
                rec.disconnected_mono = self._mono()
                rec.close_code = event.close_code
                rec.reported = SledState.DISCONNECTED
            self._changed()

    def _on_requested(self, event: PermissionRequested) -> None:
        item = event.item
        key = (item.project, item.req_id)
        with self._lock:
            self._decided.pop(key, None)  # a reused id (sled restarted) is a new request
            self._unpend(key)
            self._remote_pending.discard(key)
            self._pending[key] = item
            self._pending_bytes[item.project] = (
                self._pending_bytes.get(item.project, 0) + item.input_bytes
            )
            self._pending_bytes_total += item.input_bytes
            self._changed()

    def _on_voted(self, event: PermissionVoted) -> None:
        item = event.item
        key = (item.project, item.req_id)
        with self._lock:
            current = self._pending.get(key)
            if current is None or current.received_at != item.received_at:
                return  # decided, withdrawn or replaced meanwhile
            self._pending[key] = item  # the same input: its bytes are counted already
            self._changed()

    def _unpend(self, key: Key) -> None:
        item = self._pending.pop(key, None)
        if item is None:
            return
        if item.replica is not None:
            self._remote_pending.discard(key)
            return  # another replica's: its bytes are that replica's to count
        left = self._pending_bytes.get(item.project, 0) - item.input_bytes
        if left > 0:
            self._pending_bytes[item.project] = left
        else:
            self._pending_bytes.pop(item.project, None)
        self._pending_bytes_total -= item.input_bytes

    def _on_decided(self, event: PermissionDecided) -> None:
        record = event.record
        with self._lock:
            self._unpend((record.project, record.req_id))
            self._remember(record)
            self._changed()

    def _on_withdrawn(self, event: PermissionWithdrawn) -> None:
        self._on_decided(PermissionDecided(event.record))

    def _on_heartbeat(self, event: SledHeartbeat) -> None:
        with self._lock:
            rec = self._sleds.get(event.project)
            if rec is None or rec.session != event.session or rec.replica is not None:
                return
            rec.last_heartbeat = self._wall()
            rec.beat_mono = self._mono()
            rec.reported = SledState.CONNECTED
            self._changed()

    def _on_frame(self, event: FrameReceived) -> None:
        with self._lock:
            project = event.project
            rec = self._sleds.get(project) if project is not None else None
            if rec is None or rec.session != event.session or rec.replica is not None:
                return
            rec.frames_in += 1
            if event.dropped:
                rec.frames_dropped += 1

    def _remember(self, record: DecisionRecord) -> None:
        key = (record.project, record.req_id)
        self._decided[key] = record
        self._decided.move_to_end(key)
        while len(self._decided) > DECIDED_MEMORY:
            self._decided.popitem(last=False)
        self._recent.appendleft(record)

    def set_fleet(self, sleds: list[SledRecord], pending: list[PendingPermission]) -> None:
        """What the other replicas hold now (read from the shared store): their sleds and
        pending requests replace the ones read before. This process's own sessions and
        requests win over anything read (they are newer than any read can be)."""
        with self._lock:
            changed = False
            seen_sleds = set()
            for rec in sleds:
                mine = self._sleds.get(rec.project)
                if mine is not None and mine.replica is None and mine.disconnected_at is None:
                    continue
                seen_sleds.add(rec.project)
                if mine is None or mine.replica != rec.replica or mine.session != rec.session:
                    self._put_sled(rec)
                    changed = True
                else:
                    mine.beat_mono = rec.beat_mono  # its holder renews its lease: alive
            for project in self._remote_sleds - seen_sleds:
                gone = self._sleds.get(project)
                if gone is not None and gone.replica is not None:
                    self._drop_sled(project)
                    changed = True
            self._remote_sleds = seen_sleds
            seen_pending = set()
            for item in pending:
                key = (item.project, item.req_id)
                held = self._pending.get(key)
                if held is not None and held.replica is None:
                    continue
                seen_pending.add(key)
                if held is None or held.received_at != item.received_at:
                    if held is not None:
                        self._unpend(key)
                    self._pending[key] = item
                    changed = True
            for key in self._remote_pending - seen_pending:
                held = self._pending.get(key)
                if held is not None and held.replica is not None:
                    self._unpend(key)
                    changed = True
            self._remote_pending = seen_pending
            if changed:
                self._changed()

    def update_fleet(
        self,
        projects: Iterable[str],
        sleds: list[SledRecord],
        requests: Iterable[Key],
        pending: list[PendingPermission],
    ) -> None:
        """Part of :meth:`set_fleet`: of the sleds ``projects`` and the requests
        ``requests`` (keys) that changed, the ones other replicas still hold now are
        ``sleds`` and ``pending``; the others are no longer theirs."""
        with self._lock:
            changed = False
            found_sleds = {rec.project: rec for rec in sleds}
            for project in projects:
                mine = self._sleds.get(project)
                if mine is not None and mine.replica is None and mine.disconnected_at is None:
                    continue  # held here: this process knows best
                rec = found_sleds.get(project)
                if rec is not None:
                    self._remote_sleds.add(project)
                    if mine is None or mine.replica != rec.replica or mine.session != rec.session:
                        self._put_sled(rec)
                        changed = True
                    else:
                        mine.beat_mono = rec.beat_mono
                elif project in self._remote_sleds:
                    self._remote_sleds.discard(project)
                    if mine is not None and mine.replica is not None:
                        self._drop_sled(project)
                        changed = True
            found_pending = {(item.project, item.req_id): item for item in pending}
            for key in requests:
                held = self._pending.get(key)
                if held is not None and held.replica is None:
                    continue  # held here
                item = found_pending.get(key)
                if item is not None:
                    self._remote_pending.add(key)
                    if held is None or held.received_at != item.received_at:
                        if held is not None:
                            self._unpend(key)
                        self._pending[key] = item
                        changed = True
                elif key in self._remote_pending:
                    self._remote_pending.discard(key)
                    if held is not None:
                        self._unpend(key)
                        changed = True
            if changed:
                self._changed()

    def sled_info(self, project: str) -> dict[str, JSON]:
        """The identity's extra keys of ``project``'s sled (empty when unknown)."""
        with self._lock:
            rec = self._sleds.get(project)
            return dict(rec.info) if rec is not None else {}

    def forget_disconnected(self, older_than: float) -> list[str]:
        """Drop the records of sleds disconnected more than ``older_than`` s ago.

        Without this, every project name a sled ever used stays in memory and
        in ``/api/state`` for as long as the gateway runs.
        """
        with self._lock:
            now = self._mono()
            gone = [
                project
                for project, rec in self._sleds.items()
                if rec.disconnected_mono is not None and now - rec.disconnected_mono > older_than
            ]
            for project in gone:
                self._drop_sled(project)
            if gone:
                self._changed()
            return gone

    def pending_count(self, project: str) -> int:
        """How many requests of ``project`` wait for a decision."""
        with self._lock:
            return sum(1 for p in self._pending.values() if p.project == project)

    def pending_bytes(self, project: str | None = None) -> int:
        """Tool-input bytes (canonical JSON) that ``project``'s pending requests hold,
        or every sled's when None."""
        with self._lock:
            if project is None:
                return self._pending_bytes_total
            return self._pending_bytes.get(project, 0)

    def refresh(self) -> list[tuple[SledRecord, SledState]]:
        """Find sleds whose state changed since last announced (e.g. went stale)."""
        with self._lock:
            now = self._mono()
            changes = []
            for rec in self._sleds.values():
                current = rec.state_at(now, self.stale_after)
                if current is not rec.reported:
                    rec.reported = current
                    changes.append((rec, current))
            if changes:
                self._changed()
            return changes

    # -- reads (any thread) ---------------------------------------------------

    def is_pending(self, project: str, req_id: str) -> bool:
        with self._lock:
            return (project, req_id) in self._pending

    def pending_item(self, project: str, req_id: str) -> PendingPermission:
        """The pending request itself. Raises :class:`UnknownRequest` or :class:`AlreadyDecided`."""
        key = (project, req_id)
        with self._lock:
            item = self._pending.get(key)
            if item is not None:
                return item
            done = self._decided.get(key)
            if done is not None:
                raise AlreadyDecided(done)
            raise UnknownRequest(f"no permission request {req_id!r} from sled {project!r}")

    def pending_or_none(self, project: str, req_id: str) -> PendingPermission | None:
        """The pending request, or None if it is not pending."""
        with self._lock:
            return self._pending.get((project, req_id))

    def pending_of_session(self, session: int) -> list[PendingPermission]:
        """This process's requests from its session ``session``."""
        with self._lock:
            return [p for p in self._pending.values() if p.session == session and p.replica is None]

    def sled_state(self, session: int, project: str) -> SledState | None:
        """The state of ``project``'s sled if ``session`` is its session, else None."""
        with self._lock:
            rec = self._sleds.get(project)
            if rec is None or rec.session != session or rec.replica is not None:
                return None
            return rec.state_at(self._mono(), self.stale_after)

    def is_connected(self, project: str) -> bool:
        """Whether ``project``'s sled is identified and its session open."""
        with self._lock:
            rec = self._sleds.get(project)
            return rec is not None and rec.disconnected_at is None

    def pending_items(self) -> list[PendingPermission]:
        with self._lock:
            return list(self._pending.values())

    def decision_for(self, project: str, req_id: str) -> DecisionRecord | None:
        """The remembered decision (or withdrawal) of one request, if any."""
        with self._lock:
            return self._decided.get((project, req_id))

    def snapshot(self, limit: int | None = None) -> dict[str, Any]:
        """The JSON document ``GET /api/state`` serves.

        ``limit`` bounds the sleds (first by project name) and the pending
        requests (oldest first) listed; ``counts`` always has the totals, so a
        console over thousands of sleds stays cheap to poll.
        """
        with self._lock:
            now_mono, now_wall = self._mono(), self._wall()
            pending_per_project: dict[str, int] = {}
            for p in self._pending.values():
                pending_per_project[p.project] = pending_per_project.get(p.project, 0) + 1
            by_state = tally_states(self._sleds.values(), now_mono, self.stale_after)
            projects = self._ordered_projects()
            if limit is None:
                chosen = [self._sleds[p] for p in projects]
                pending = list(self._pending.values())
            else:
                chosen = [self._sleds[p] for p in projects[:limit]]
                pending = list(itertools.islice(self._pending.values(), limit))
            sleds = []
            for rec in chosen:
                sleds.append(
                    {
                        "project": rec.project,
                        "state": rec.state_at(now_mono, self.stale_after).value,
                        "session": rec.session,
                        "remote": rec.remote,
                        "connected_at": iso(rec.connected_at),
                        "last_heartbeat": iso(rec.last_heartbeat),
                        "since_heartbeat_s": round(now_mono - rec.beat_mono, 3),
                        "disconnected_at": iso(rec.disconnected_at),
                        "close_code": rec.close_code,
                        "info": rec.info,
                        "frames_in": rec.frames_in,
                        "frames_dropped": rec.frames_dropped,
                        "pending": pending_per_project.get(rec.project, 0),
                        "replica": rec.replica,
                    }
                )
            return {
                "now": iso(now_wall),
                "version": self._version,
                "heartbeat_interval_s": self.heartbeat_interval,
                "stale_after_s": round(self.stale_after, 6),
                "counts": {
                    "sleds": len(self._sleds),
                    **{state.value: count for state, count in by_state.items()},
                    "pending": len(self._pending),
                },
                "sleds": sleds,
                "pending": [p.to_json() for p in pending],
                "decisions": [r.to_json() for r in self._recent],
            }

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Block until ``predicate(snapshot)`` holds; return that snapshot.

        Re-checks on every change and at least every 50 ms (staleness is a
        function of time, not only of changes). Raises ``TimeoutError``.
        The predicate runs without the state's lock: it may ask the gateway's
        loop for something (the audit), and the loop takes that lock to change
        the state, so holding it here would stall both until a timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snap = self.snapshot()
                seen = self._version
            if predicate(snap):
                return snap
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gateway state did not reach the condition in {timeout} s")
            with self._cond:
                if self._version == seen:  # else it changed while the predicate ran
                    self._cond.wait(min(left, 0.05))
