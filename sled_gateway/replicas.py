"""This gateway replica among the others sharing its database: leases, the sweep, the
read model of the whole fleet, and delivering decisions made elsewhere.

Used when the store is a server database (``--db postgresql://``), where several
replicas may be one gateway. The database is the system of record; the bus only
rings:

- ``gateway.changed`` (published after any change others should show: a sled up
  or down, a request pending, decided or withdrawn): every replica re-reads the
  fleet (:meth:`Replicas.resync`), coalescing a burst of rings into few reads;
- ``replica.<id>.deliver`` (published by a replica that decided a request another
  holds): the holder reads its decided rows and sends their ``perm_response``. The
  ring may carry the decision it just committed, sealed with an HMAC under a key
  kept in the database (:data:`DELIVERY_KEY_SETTING`): the holder then sends it
  without that read. A ring whose seal does not check, or that names no request
  the holder has pending as it says, is only a ring: the holder reads the store.

Correctness never depends on a ring arriving: the sweep, every
``--sweep-interval`` seconds, renews this replica's lease, releases the replicas
whose lease expired (their pending requests withdrawn, their decided ones marked
undelivered, each audited), withdraws this replica's own requests whose session
is gone (a withdrawal that failed to commit), delivers what is decided for this
replica, and re-reads the fleet. A reconnected bus triggers the same at once.

The whole fleet is read by every sweep only while rings may be missing: the bus
is away, or it reaches no other process (the in-process bus), or the last read
failed. Otherwise rings carry each change and one sweep in
:data:`FULL_READ_EVERY` reads it all, to bound what a dropped ring can leave
stale. A replica whose bus comes back rings the whole fleet, for the rings it
may have lost on the way out. At 10,000 sleds one whole read costs about 45 ms
of the store's writer thread and 10 ms of the event loop (docs/benchmarks.md),
which every commit behind it waited for.

A holder sends a ``perm_response`` only for a row the store says is ``decided``
(this replica's own decisions are sent right after their compare-and-set
commits; another replica's, from its sealed ring, which it sends only after its
compare-and-set committed that decision), and at most once per request:
:attr:`Replicas._sent` remembers what it sent until long after the row is marked
delivered.

Each read of the fleet also tells the hub which sleds it holds that the store gives
to another replica's newer session (:meth:`Hub.moved_away`): the sled reconnected
there, so the session here is half-open, and it is let go at once rather than after
its missed heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from loguru import logger

from protocol import Decision, printable
from sled_gateway.bus import Bus, Message, escape_token
from sled_gateway.events import (
    Events,
    FleetPermissionEnded,
    FleetPermissionRequested,
    PermissionDecided,
    PermissionWithdrawn,
    SledDown,
    SledUp,
)
from sled_gateway.principal import Principal
from sled_gateway.records import WITHDRAWN, DecisionRecord, PendingPermission
from sled_gateway.state import GatewayState, SledRecord
from sled_gateway.store import AuditEntry, SessionEnded
from sled_gateway.store.fleet import (
    DECIDED,
    PENDING,
    UNDELIVERED,
    FleetStore,
    PendingRow,
    SledRow,
    StateChanged,
)

if TYPE_CHECKING:
    from sled_gateway.hub import Hub

log = logger.bind(actor="replicas")

#: The subject every replica listens on to re-read the fleet.
CHANGED = "gateway.changed"
#: The audit's ``by`` of requests a survivor released for a replica whose lease expired.
LEASE_EXPIRED = "replica_lost"
#: The audit's ``by`` of requests a replica ended as it stopped cleanly.
STOPPED = "replica_stopped"
#: How long a stopping replica waits for its release to commit (the store is bounded too).
GIVE_UP_TIMEOUT = 3.0
#: Rows named by rings since the last re-read above which one read of the whole fleet
#: is cheaper than reading each.
REREAD_ALL_ABOVE = 500
#: With the bus connected, one sweep in this many re-reads the whole fleet (30 s at the
#: default ``--sweep-interval``): the bound on how long a dropped ring leaves the read
#: model stale. Decisions never depend on it: they are made against the store.
FULL_READ_EVERY = 15
#: Decisions at most waiting at once for the ring of their request (each a short wait).
MAX_AWAITED = 1_000
#: How many delivered requests a replica remembers, so none is sent twice.
SENT_MEMORY = 100_000
#: The ``settings`` row of the key that seals delivery rings: only a process that can
#: read the database (which could as well write a decision there) can seal one.
DELIVERY_KEY_SETTING = "replica_delivery_key"

Key = tuple[str, str, float]  # (project, req_id, requested_at): one request


def deliver_subject(replica: str) -> str:
    return f"replica.{escape_token(replica)}.deliver"


def delivery_seal(key: bytes, holder: str, fields: list[Any]) -> str:
    """The HMAC of a delivery ring's ``fields`` for ``holder`` (a ring to one replica
    cannot be replayed to another)."""
    text = json.dumps([holder, *fields], separators=(",", ":"), allow_nan=False)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def item_of(row: PendingRow) -> PendingPermission:
    """A pending row as the read model shows it."""
    offer = row.offer
    item = PendingPermission(
        row.project,
        row.req_id,
        row.tool_name,
        row.tool_input,
        row.requested_at,
        row.session,
        would_match=offer.get("would_match"),
        needs=row.needs,
        replica=row.replica,
    )
    # The holder computed the card's rules (with the sled's own suggestions, which the row
    # does not keep): show those rather than a second parse without them.
    rules = tuple((str(r[0]), str(r[1])) for r in offer.get("suggested_rules", ()))
    object.__setattr__(item, "_suggested", rules)
    return item


def record_of(row: PendingRow) -> DecisionRecord:
    """A row's outcome as the console's log shows it."""
    at = row.decided_at if row.decided_at is not None else time.time()
    return DecisionRecord(
        row.project,
        row.req_id,
        row.tool_name,
        row.decision or row.state,
        row.decided_by or "?",
        at,
        at - row.requested_at,
    )


class _Coalesced:
    """Run ``job`` once now, and once more after it if asked again meanwhile."""

    def __init__(self, job: Callable[[], Awaitable[None]], name: str) -> None:
        self._job = job
        self._name = name
        self._wanted = False
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                await self._job()
            except Exception as exc:
                log.warning("{} failed: {}", self._name, exc)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Replicas:
    """This replica's part in the fleet (everything on the gateway's event loop)."""

    def __init__(
        self,
        store: FleetStore,
        bus: Bus,
        state: GatewayState,
        events: Events,
        *,
        lease_seconds: float,
        sweep_interval: float,
    ) -> None:
        self.store = store
        self.bus = bus
        self.state = state
        self.events = events
        self.lease_seconds = lease_seconds
        self.sweep_interval = sweep_interval
        #: This process's name in the ``replicas`` table, new at each start.
        self.id = uuid.uuid4().hex[:16]
        self.started_at = time.time()
        self.hub: Hub | None = None
        self._sent: OrderedDict[Key, None] = OrderedDict()
        # Sleds held here: session, and when the store had committed its row (monotonic).
        self._held: dict[str, tuple[int, float]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._stops: list[Callable[[], None]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.resync = _Coalesced(self._resync, "re-reading the fleet")
        self.refresh = _Coalesced(self._refresh, "re-reading changed rows")
        self._dirty_sleds: set[str] = set()
        self._dirty_requests: set[tuple[str, str]] = set()
        self._awaited: dict[tuple[str, str], asyncio.Event] = {}
        #: The next sweep reads the whole fleet: a read or a sweep failed, or rings may
        #: have been missed (so from the start, until the first whole read).
        self._full_read_due = True
        self._sweeps_since_full_read = 0
        self.deliver = _Coalesced(self._deliver, "delivering decisions")
        self._delivery_key: bytes | None = None
        events.subscribe(SledUp, self._sled_up)
        events.subscribe(SledDown, self._sled_down)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, hub: Hub) -> None:
        """Take a lease, listen for rings, and sweep until :meth:`stop`."""
        self.hub = hub
        try:
            await self.store.renew_lease(self.id, self.started_at, time.time() + self.lease_seconds)
        except Exception as exc:  # the database is away: the sweep tries again
            log.warning("replica {}: lease not taken yet: {}", self.id, exc)
        await self._read_delivery_key()
        self._stops.append(self.bus.subscribe(CHANGED, self._rung))
        self._stops.append(self.bus.subscribe(deliver_subject(self.id), self._delivery_rung))
        self._stops.append(self.bus.on_reconnect(self._reconnected))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        log.info(
            "replica {} on the shared store (lease {:g} s, sweep every {:g} s)",
            self.id,
            self.lease_seconds,
            self.sweep_interval,
        )
        self.resync()

    def stop(self) -> None:
        for stop in self._stops:
            stop()
        self._stops.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.resync.cancel()
        self.refresh.cancel()
        self.deliver.cancel()

    async def give_up(self) -> None:
        """A clean stop (after :meth:`stop` and the sleds' sessions closed): end what this
        replica still holds and drop its lease at once, so the survivors need not wait
        ``--lease-seconds`` for it to expire. If this fails, the lease expires as for a
        dead replica: nothing is lost, it only takes longer."""
        pending = [t for t in self._background if not t.done()]
        if pending:  # deliveries and withdrawals already on their way settle first
            await asyncio.wait(pending, timeout=1.0)
        by = Principal.gateway(STOPPED)
        try:
            withdrawn, undelivered = await asyncio.wait_for(
                self.store.release_replica(
                    self.id,
                    time.time(),
                    by.by,
                    by.who,
                    by.channel.value,
                    what_happened="stopped",
                ),
                GIVE_UP_TIMEOUT,
            )
        except Exception as exc:
            log.warning("replica {}: lease not given up ({}); it will expire", self.id, exc)
            return
        log.info(
            "replica {} stopped: lease given up ({} pending request(s) withdrawn, "
            "{} decided but undelivered)",
            self.id,
            withdrawn,
            undelivered,
        )
        self.ring()

    def _let_go_of_moved(self, sleds: Iterable[SledRow], read_began: float) -> None:
        """A sled held here that the store gives to another replica's newer session has
        moved there: :meth:`Hub.moved_away` lets this replica's session of it go.

        Newer by the database's own order, not by clocks: a sled has one row, and each
        holder replaces it. A read begun after this replica's row for its session had
        committed, that names another replica, read a row committed after that one."""
        hub = self.hub
        if hub is None:
            return
        for row in sleds:
            held = self._held.get(row.project)
            if held is not None and row.replica != self.id and held[1] < read_began:
                hub.moved_away(row.project, held[0], row.replica)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- rings ------------------------------------------------------------------------------

    def ring(self, *, sled: str | None = None, request: tuple[str, str] | None = None) -> None:
        """Tell every replica to re-read: only ``sled``'s row or ``request``'s when it
        says which changed, else the whole fleet. The ring names rows, never their
        content: what a replica shows and decides is always read from the store."""
        message: dict[str, Any] = {"from": self.id}
        if sled is not None:
            message["sleds"] = [sled]
        if request is not None:
            message["requests"] = [list(request)]
        try:
            self.bus.publish(CHANGED, message)
        except Exception as exc:  # a lost ring only delays: a whole read catches it
            log.debug("ring not sent: {}", exc)

    def ring_holder(self, item: PendingPermission, record: DecisionRecord) -> None:
        """Tell the replica holding ``item`` that it was decided (``record``, committed)."""
        replica = item.replica
        assert replica is not None
        message: dict[str, Any] = {"from": self.id}
        key = self._delivery_key
        if key is not None:
            fields = self._delivery_fields(item, record)
            message["decided"] = fields
            message["seal"] = delivery_seal(key, replica, fields)
        try:
            self.bus.publish(deliver_subject(replica), message)
        except Exception as exc:
            log.debug("ring to {} not sent: {}", replica, exc)
        self.ring(request=(item.project, item.req_id))

    @staticmethod
    def _delivery_fields(item: PendingPermission, record: DecisionRecord) -> list[Any]:
        return [
            item.project,
            item.req_id,
            item.received_at,
            record.decision,
            record.by,
            record.decided_at,
        ]

    async def _read_delivery_key(self) -> None:
        if self._delivery_key is not None:
            return
        try:
            text = await self.store.setting(  # type: ignore[attr-defined]
                DELIVERY_KEY_SETTING, lambda: secrets.token_hex(32)
            )
            self._delivery_key = bytes.fromhex(text)
        except Exception as exc:  # rings go unsealed meanwhile: holders read the store
            log.warning("replica {}: delivery key not read yet: {}", self.id, exc)

    def _delivery_rung(self, message: Message) -> None:
        """A ring to deliver: sent at once from a sealed ring that names a request held
        here as pending, else by reading the store."""
        sealed = self._unsealed(message)
        if sealed is None:
            self.deliver()
            return
        item, decision, record = sealed
        self._spawn(self._send_decided(item, decision, record))

    def _unsealed(
        self, message: Message
    ) -> tuple[PendingPermission, Decision, DecisionRecord] | None:
        key = self._delivery_key
        fields = message.get("decided")
        seal = message.get("seal")
        if key is None or fields is None:
            return None
        try:
            project, req_id, requested_at, decision, by, at = fields
            if not (
                isinstance(seal, str)
                and hmac.compare_digest(seal, delivery_seal(key, self.id, fields))
            ):
                raise ValueError("its seal does not check")
            verdict = Decision(decision)
        except (TypeError, ValueError) as exc:
            log.warning("a delivery ring was not believed ({}); reading the store", exc)
            return None
        item = self.state.pending_or_none(project, req_id)
        if item is None or item.replica is not None or item.received_at != requested_at:
            return None  # not (or no longer) pending here as it says: the store knows
        record = DecisionRecord(
            project, req_id, item.tool_name, decision, by, at, at - item.received_at
        )
        return item, verdict, record

    async def _send_decided(
        self, item: PendingPermission, decision: Decision, record: DecisionRecord
    ) -> None:
        """Send the answer of ``item``, held here and decided elsewhere (once)."""
        hub = self.hub
        if hub is None or not self.claim_send(item):
            return
        session = hub.sessions.get(item.session)
        sent = False
        if session is not None and session.project == item.project:
            sent = await hub.answer(item.session, item.req_id, decision)
        log.info(
            "permission '{}' of sled '{}': {} decided by {} elsewhere; {}",
            printable(item.req_id, 120),
            printable(item.project, 120),
            record.decision,
            record.by,
            "sent" if sent else "its session is gone (undelivered)",
        )
        self.after_send(item, decision, sent)
        if self.state.pending_or_none(item.project, item.req_id) is not None:
            self.events.publish(PermissionDecided(record))

    def _rung(self, message: Message) -> None:
        if message.get("from") == self.id:
            return
        sleds = message.get("sleds", [])
        requests = message.get("requests", [])
        named = (
            isinstance(sleds, list)
            and isinstance(requests, list)
            and (sleds or requests)
            and all(isinstance(p, str) for p in sleds)
            and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
                for r in requests
            )
        )
        if not named:  # the whole fleet (or a ring this replica cannot read: re-read all)
            self.resync()
            return
        self._dirty_sleds.update(sleds)
        self._dirty_requests.update((r[0], r[1]) for r in requests)
        if len(self._dirty_sleds) + len(self._dirty_requests) > REREAD_ALL_ABOVE:
            self._dirty_sleds.clear()
            self._dirty_requests.clear()
            self.resync()  # a burst (a reconnect storm): one read of all is cheaper
            return
        self.refresh()

    async def _refresh(self) -> None:
        """Re-read the rows rings named since the last refresh."""
        projects, self._dirty_sleds = self._dirty_sleds, set()
        requests, self._dirty_requests = self._dirty_requests, set()
        if not projects and not requests:
            return
        try:
            read_began = time.monotonic()
            sleds, rows = await self.store.fleet_part(projects, requests)
        except Exception:
            self._full_read_due = True  # those rows are read with all the others
            raise
        mono = time.monotonic()
        before = self._remote_items() if requests else {}
        self.state.update_fleet(
            projects,
            [
                SledRecord(
                    project=s.project,
                    session=s.session,
                    remote=s.remote or "?",
                    connected_at=s.connected_at,
                    beat_mono=mono,
                    info=s.info,
                    replica=s.replica,
                )
                for s in sleds
                if s.replica != self.id
            ],
            requests,
            [item_of(r) for r in rows if r.state == PENDING and r.replica != self.id],
        )
        self._let_go_of_moved(sleds, read_began)
        if requests:
            self._tell_transports(before)
        for row in rows:
            awaited = self._awaited.pop((row.project, row.req_id), None)
            if awaited is not None:
                awaited.set()

    async def rung_for(self, project: str, req_id: str, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for a ring naming that request: a decision may
        reach this replica before the ring of the request it answers."""
        key = (project, req_id)
        event = self._awaited.get(key)
        if event is None:
            if len(self._awaited) >= MAX_AWAITED:
                return  # a flood of decisions for requests nobody rang: do not hold them
            event = self._awaited[key] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            if self._awaited.get(key) is event:
                del self._awaited[key]

    def _reconnected(self) -> None:
        # Rings may have been lost while the bus was away, both ways: this replica
        # re-reads, and tells the others to.
        self.resync()
        self.deliver()
        self.ring()

    # -- sleds ------------------------------------------------------------------------------

    def _sled_up(self, event: SledUp) -> None:
        self._spawn(self._hold(event))

    async def _hold(self, event: SledUp) -> None:
        def still_held() -> bool:  # in the store's writer thread
            hub = self.hub
            return hub is None or hub.serving(event.project, event.session) is not None

        try:
            await self.store.hold_sled(
                event.project,
                self.id,
                event.session,
                event.remote,
                event.info,
                still_held=still_held,
            )
        except SessionEnded:
            log.debug(
                "sled {!r}: session {} ended before its row committed; not recorded",
                event.project,
                event.session,
            )
        except Exception as exc:
            log.warning("sled {!r} not recorded as held here: {}", event.project, exc)
        else:
            self._held[event.project] = (event.session, time.monotonic())
        self.ring(sled=event.project)

    def _sled_down(self, event: SledDown) -> None:
        if event.project is not None:
            self._spawn(self._let_go(event.project, event.session, not event.said_goodbye))

    async def _let_go(self, project: str, session: int, returning: bool) -> None:
        try:
            await self.store.let_go_sled(project, self.id, session, returning=returning)
        except Exception as exc:
            log.warning("sled {!r} not recorded as gone: {}", project, exc)
        # After the store's answer: its hold (queued before) has answered by then.
        if self._held.get(project, (None,))[0] == session:
            del self._held[project]
        self.ring(sled=project)

    # -- requests ---------------------------------------------------------------------------

    async def add_pending(self, item: PendingPermission) -> None:
        """Record ``item`` as pending here (raises if it could not be)."""
        await self.store.add_pending(
            item.project,
            item.req_id,
            item.received_at,
            replica=self.id,
            session=item.session,
            tool_name=item.tool_name,
            tool_input=item.tool_input,
            needs=item.needs,
            offer={
                "suggested_rules": [list(r) for r in item.suggested_rules],
                "would_match": item.would_match,
            },
        )
        awaited = self._awaited.pop((item.project, item.req_id), None)
        if awaited is not None:  # a decision here came before the request: it may go on
            awaited.set()

    async def find(self, project: str, req_id: str) -> PendingRow | None:
        """The request's row as the store has it now."""
        return await self.store.pending_row(project, req_id)

    def claim_send(self, item: PendingPermission) -> bool:
        """Whether this replica may send ``item``'s answer now (never twice)."""
        key = (item.project, item.req_id, item.received_at)
        if key in self._sent:
            return False
        self._sent[key] = None
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        return True

    def after_send(self, item: PendingPermission, decision: Decision, sent: bool) -> None:
        """Record how the answer of a decided request went: delivered, or (its session
        gone) undelivered, audited so."""
        self._spawn(self._settle_delivery(item, decision.value, sent))

    async def _settle_delivery(self, item: PendingPermission, decision: str, sent: bool) -> None:
        try:
            if sent:
                await self.store.delivered(item.project, item.req_id, item.received_at)
            else:
                await self.mark_undelivered(item, decision)
        except Exception as exc:
            log.warning("request {!r}: delivery not recorded: {}", item.req_id, exc)

    async def mark_undelivered(self, item: PendingPermission, decision: str) -> None:
        """A decided request whose sled's session ended before its answer went out."""
        by = Principal.gateway("sled_disconnected")
        now = time.time()
        with contextlib.suppress(StateChanged):  # delivered or ended meanwhile
            await self.store.end_pending(
                AuditEntry(
                    item.project,
                    item.session,
                    item.req_id,
                    item.tool_name,
                    item.audit_input,
                    UNDELIVERED,
                    by.by,
                    f"decided {decision}, but the sled's session ended before it got the answer",
                    item.received_at,
                    now,
                    who=by.who,
                    channel=by.channel.value,
                ),
                DECIDED,
                UNDELIVERED,
            )

    # -- the sweep ---------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._full_read_due = True
                log.warning("sweep failed: {}", exc)

    async def sweep(self) -> None:
        now = time.time()
        await self.store.renew_lease(self.id, self.started_at, now + self.lease_seconds)
        await self._read_delivery_key()
        for replica in await self.store.expired_replicas(now):
            if replica == self.id:
                continue  # late, but alive: renewed above
            by = Principal.gateway(LEASE_EXPIRED)
            withdrawn, undelivered = await self.store.release_replica(
                replica, now, by.by, by.who, by.channel.value
            )
            log.warning(
                "replica {}'s lease expired: released it ({} pending request(s) withdrawn, "
                "{} decided but undelivered)",
                replica,
                withdrawn,
                undelivered,
            )
            self.ring()
        await self._deliver()
        self._sweeps_since_full_read += 1
        if (
            self._full_read_due
            or not self.bus.connected
            or self._sweeps_since_full_read >= FULL_READ_EVERY
        ):
            await self._resync()

    async def _deliver(self) -> None:
        """Send the answers of requests held here that another replica decided."""
        hub = self.hub
        if hub is None:
            return
        for row in await self.store.decided_for(self.id):
            decision = Decision(row.decision or Decision.DENY.value)
            await self._send_decided(item_of(row), decision, record_of(row))

    async def _resync(self) -> None:
        self._full_read_due = True  # until this read is in
        read_began = time.monotonic()
        sleds, pending = await self.store.fleet()
        self._full_read_due = False
        self._sweeps_since_full_read = 0
        mono = time.monotonic()
        hub = self.hub
        others = [
            SledRecord(
                project=s.project,
                session=s.session,
                remote=s.remote or "?",
                connected_at=s.connected_at,
                beat_mono=mono,
                info=s.info,
                replica=s.replica,
            )
            for s in sleds
            if s.replica != self.id
        ]
        remote = [item_of(r) for r in pending if r.replica != self.id]
        before = self._remote_items()
        self.state.set_fleet(others, remote)
        self._let_go_of_moved(sleds, read_began)
        self._tell_transports(before)
        if hub is None:
            return
        # A withdrawal that could not commit leaves a row pending for a session long gone.
        for row in pending:
            if (
                row.replica == self.id
                and row.session not in hub.sessions
                and time.time() - row.requested_at > self.sweep_interval
            ):
                self._spawn(self._withdraw_orphan(row))
        # Released by a survivor while alive (a lease renewal late, the database slow):
        # this replica's sleds are listed again, and its requests that the store has
        # ended leave its read model (their sleds get no answer: they time out, denied).
        # Not a sled another replica holds: its row there is newer than this session's
        # (a half-open one here), and claiming it back would have that replica let go
        # of the live session.
        held = {s.project for s in sleds}
        for project, session in list(hub.by_project.items()):
            if (
                project not in held
                and not session.moved
                and time.time() - self.started_at > self.sweep_interval
            ):
                self._spawn(
                    self._hold(
                        SledUp(session.id, project, session.remote, self.state.sled_info(project))
                    )
                )
        still = {(r.project, r.req_id, r.requested_at) for r in pending if r.replica == self.id}
        for item in self.state.pending_items():
            if (
                item.replica is None
                and (item.project, item.req_id, item.received_at) not in still
                and time.time() - item.received_at > 2 * self.sweep_interval
            ):
                self._spawn(self._forget_ended(item))

    def _tell_transports(self, before: dict[Key, PendingPermission]) -> None:
        """The transports (Matrix, the terminal) follow the whole fleet's requests: tell
        them which of the other replicas' requests appeared or ended since ``before``."""
        after = self._remote_items()
        for key in after.keys() - before.keys():
            self.events.publish(FleetPermissionRequested(after[key]))
        for key in before.keys() - after.keys():
            self._spawn(self._remote_ended(before[key]))

    def _remote_items(self) -> dict[Key, PendingPermission]:
        return {
            (i.project, i.req_id, i.received_at): i
            for i in self.state.pending_items()
            if i.replica is not None
        }

    async def _remote_ended(self, item: PendingPermission) -> None:
        """Tell the transports how another replica's request ended, as the store says."""
        try:
            row = await self.store.pending_row(item.project, item.req_id)
        except Exception as exc:  # the outcome line is cosmetic: the request is gone anyway
            log.debug("outcome of {!r} not read: {}", item.req_id, exc)
            row = None
        if row is not None and row.requested_at == item.received_at and row.state != PENDING:
            record = record_of(row)
        else:
            now = time.time()
            record = DecisionRecord(
                item.project,
                item.req_id,
                item.tool_name,
                WITHDRAWN,
                "?",
                now,
                now - item.received_at,
            )
        self.events.publish(FleetPermissionEnded(item, record))

    async def _forget_ended(self, item: PendingPermission) -> None:
        row = await self.store.pending_row(item.project, item.req_id)
        if (
            row is not None
            and row.requested_at == item.received_at
            and row.state
            in (
                PENDING,
                DECIDED,
            )
        ):
            return  # still open (or being delivered): nothing to forget
        if self.state.pending_or_none(item.project, item.req_id) is not item:
            return
        now = time.time()
        record = (
            record_of(row)
            if row is not None and row.requested_at == item.received_at
            else DecisionRecord(
                item.project,
                item.req_id,
                item.tool_name,
                WITHDRAWN,
                "?",
                now,
                now - item.received_at,
            )
        )
        log.warning(
            "permission '{}' of sled '{}' ended in the store ({}) while pending here",
            printable(item.req_id, 120),
            printable(item.project, 120),
            record.decision,
        )
        self.events.publish(PermissionWithdrawn(item, record))

    async def _withdraw_orphan(self, row: PendingRow) -> None:
        by = Principal.gateway("sled_disconnected")
        item = item_of(row)
        try:
            await self.store.end_pending(
                AuditEntry(
                    row.project,
                    row.session,
                    row.req_id,
                    row.tool_name,
                    item.audit_input,
                    WITHDRAWN,
                    by.by,
                    "the sled's session had ended",
                    row.requested_at,
                    time.time(),
                    who=by.who,
                    channel=by.channel.value,
                ),
                PENDING,
                WITHDRAWN,
            )
        except StateChanged:
            return
        now = time.time()
        record = DecisionRecord(
            row.project, row.req_id, row.tool_name, WITHDRAWN, by.by, now, now - row.requested_at
        )
        self.events.publish(PermissionWithdrawn(item, record))
        self.ring()
