"""The permission registry: every request gets exactly one decision (fail closed).

:class:`PermissionBook` holds the whole permission lifecycle and can be
driven by tests without threads; :class:`PermissionRegistryActor` is the thin
actor around it, whose handlers run in the event loop: a response frame
decides its request where it is parsed, and an asyncio caller in that loop
is answered without crossing a thread. The only ways out of the book are :meth:`_decide` (exactly
once per request, enforced by popping it) and nothing else.

Rules, each with its own deny reason:
- no session up → held in arrival order, sent right after the next identity;
- the session a request was sent on ends → denied (``session_ended``);
- not decided within the permission timeout from submission → ``timeout``;
- shutdown → ``shutdown``; too many undecided → ``over_limit``; undecided
  requests whose frames would together exceed ``max_pending_bytes`` →
  ``over_bytes`` (a count cap alone lets 10 000 one-MiB inputs pin 10 GB);
- an id already undecided → the new one is denied (``duplicate_id``);
- an id seen within the last hour, decided or not → denied (``reused_id``):
  the gateway may still show the first request under that id, and a person's
  answer to it must never answer a different one;
- the caller went away (:meth:`PermissionBook.abandon`) → ``caller_gone``.
When the book decides a request it has sent on a session that is still open
(``timeout``, ``caller_gone``), it tells the gateway on that session with a
``perm_cancel`` frame, so the gateway withdraws it from the people who see it.
A response is honoured only for an undecided request, and only when it
arrives on the session the request was sent on.

The ids seen are remembered in arrival order with their time, for
:data:`REUSE_WINDOW` seconds and at most :data:`REUSE_MEMORY` of them (the
oldest are forgotten first): about 20 MB at the cap. An id longer than 64
characters is remembered by its 16-byte BLAKE2 digest, so a caller's choice of
id length cannot grow that.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from actors.base import UplinkLoopActor, handles
from actors.context import Role, UplinkContext
from actors.loop import Timer
from actors.messages import (
    Abandon,
    DenyAll,
    EnvelopeIn,
    SessionClosed,
    SessionOpened,
    Settable,
    Submit,
    Sweep,
)
from actors.sink import FrameSink
from protocol import (
    JSON,
    Decision,
    Envelope,
    Kind,
    Outcome,
    PermRequest,
    Reason,
    decide,
    perm_cancel,
    serialize,
)

#: How long a request id stays refused after it was first seen (seconds).
REUSE_WINDOW = 3600.0
#: At most this many ids are remembered for :data:`REUSE_WINDOW`; past it the
#: oldest are forgotten first (a flood of ids cannot grow memory without bound).
REUSE_MEMORY = 100_000

# The reasons for which the book decides a sent request by itself while its
# session is still open; the gateway hears of each with a perm_cancel.
_CANCELLED = {Reason.TIMEOUT: "timeout", Reason.CALLER_GONE: "caller_gone"}

# Generated ids: a random per-process prefix and a counter (unique, and much
# cheaper than uuid4 on the hot path).
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id, for a caller that brought none."""
    return f"{_ID_PREFIX}-{next(_id_counter)}"


@dataclass(slots=True)
class Pending:
    request_id: str
    tool_name: str
    tool_input: JSON
    future: Settable[Outcome]
    deadline: float
    session: int | None = None  # the session it was sent on; None while held
    frame_text: str | None = None  # its perm_request frame, when the edge serialized it
    size: int = 0  # what it counts against max_pending_bytes


# Sends a perm_request on a session: an Envelope, or its text when already serialized.
SendFn = Callable[[int, Envelope | str], None]
DecidedFn = Callable[[Pending, Outcome], None]


class PermissionBook:
    """The registry's state and rules, free of threads and sockets."""

    def __init__(
        self,
        *,
        timeout: float,
        max_pending: int,
        max_pending_bytes: int | None = None,
        send: SendFn,
        on_decided: DecidedFn | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = logger,
        reuse_window: float = REUSE_WINDOW,
        reuse_memory: int = REUSE_MEMORY,
    ) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._send = send
        self._on_decided = on_decided
        self._clock = clock
        self._log = log
        self.pending: dict[str, Pending] = {}
        # Held ids in arrival order (a dict: a decided one leaves it at once).
        self.held: dict[str, None] = {}
        self.session: int | None = None
        self.closed = False
        self.closed_reason = Reason.SHUTDOWN  # what a submission to a closed book is told
        self._deadlines: list[tuple[float, str]] = []
        self.reuse_window = reuse_window
        self.reuse_memory = reuse_memory
        # id (or a long one's digest) → when it was first seen (monotonic), oldest first.
        self.seen: OrderedDict[str | bytes, float] = OrderedDict()

    # ── inputs ──────────────────────────────────────────────────────────

    def submit(
        self,
        request_id: str,
        tool_name: str,
        tool_input: JSON,
        future: Settable[Outcome],
        submitted_at: float | None = None,
        *,
        frame_text: str | None = None,
    ) -> None:
        if submitted_at is None:
            submitted_at = self._clock()
        entry = Pending(
            request_id, tool_name, tool_input, future, submitted_at + self.timeout, None, frame_text
        )
        if self.closed:
            self._answer(entry, Decision.DENY, self.closed_reason)
            return
        if request_id in self.pending:
            self._log.warning("request id {!r} is already waiting; denying the new one", request_id)
            self._answer(entry, Decision.DENY, Reason.DUPLICATE_ID)
            return
        if not self._first_sight(request_id):
            self._log.warning(
                "request id {!r} was already used within {:.0f} s; denying the new one",
                request_id,
                self.reuse_window,
            )
            self._answer(entry, Decision.DENY, Reason.REUSED_ID)
            return
        if len(self.pending) >= self.max_pending:
            self._log.warning(
                "{} requests already waiting; denying {!r}", len(self.pending), request_id
            )
            self._answer(entry, Decision.DENY, Reason.OVER_LIMIT)
            return
        if self.max_pending_bytes is not None:
            entry.size = _frame_size(entry)
            if self.pending_bytes + entry.size > self.max_pending_bytes:
                self._log.warning(
                    "{} requests already hold {} bytes (limit {}); denying {!r} ({} bytes)",
                    len(self.pending),
                    self.pending_bytes,
                    self.max_pending_bytes,
                    request_id,
                    entry.size,
                )
                self._answer(entry, Decision.DENY, Reason.OVER_BYTES)
                return
        if entry.deadline <= self._clock():
            self._answer(entry, Decision.DENY, Reason.TIMEOUT)
            return
        self.pending[request_id] = entry
        self.pending_bytes += entry.size
        heapq.heappush(self._deadlines, (entry.deadline, request_id))
        if self.session is None:
            self.held[request_id] = None
            self._log.debug("holding {!r} until a session is up", request_id)
        else:
            self._transmit(entry, self.session)

    def open_session(self, session: int) -> None:
        """A session is up and identified: send what was held, in arrival order."""
        self.session = session
        held, self.held = self.held, {}
        for request_id in held:
            entry = self.pending.get(request_id)
            if entry is not None and entry.session is None:
                self._transmit(entry, session)

    def close_session(self, session: int) -> int:
        """``session`` ended: deny everything sent on it. Returns how many."""
        if self.session == session:
            self.session = None
        lost = [e for e in self.pending.values() if e.session == session]
        for entry in lost:
            self._decide(entry, Decision.DENY, Reason.SESSION_ENDED)
        return len(lost)

    def respond(self, session: int, request_id: str, payload: JSON) -> Outcome | None:
        """A ``perm_response`` arrived on ``session``. Returns the outcome, if it decided one."""
        entry = self.pending.get(request_id)
        if entry is None:
            self._log.info("perm_response for unknown or already decided {!r} ignored", request_id)
            return None
        if entry.session != session:
            self._log.warning(
                "perm_response for {!r} came on session {}, but it was sent on {}; ignored",
                request_id,
                session,
                entry.session,
            )
            return None
        mapped = decide(payload)
        if mapped.warning:
            self._log.warning("{} (request {!r})", mapped.warning, request_id)
        return self._decide(entry, mapped.decision, mapped.reason)

    def abandon(self, request_id: str) -> Outcome | None:
        """The caller of ``request_id`` went away: deny it (``caller_gone``) if undecided."""
        entry = self.pending.get(request_id)
        if entry is None:
            return None
        return self._decide(entry, Decision.DENY, Reason.CALLER_GONE)

    def expire(self) -> float | None:
        """Deny what is past its deadline; return the next deadline, if any."""
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            entry = self.pending.get(request_id)
            if entry is not None and entry.deadline <= now:
                self._decide(entry, Decision.DENY, Reason.TIMEOUT)
        # Decided requests leave stale heap entries; compact so state never grows.
        if len(self._deadlines) > 2 * len(self.pending) + 64:
            self._deadlines = [(e.deadline, e.request_id) for e in self.pending.values()]
            heapq.heapify(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def deny_all(self, reason: Reason, *, close: bool = False) -> int:
        """Deny every undecided request; with ``close`` also every later one."""
        if close and not self.closed:
            self.closed_reason = reason
        self.closed = self.closed or close
        entries = list(self.pending.values())
        for entry in entries:
            self._decide(entry, Decision.DENY, reason)
        self.held.clear()
        return len(entries)

    # ── outputs ─────────────────────────────────────────────────────────

    def _first_sight(self, request_id: str) -> bool:
        """Remember ``request_id``; False if it was already seen within the window."""
        now = self._clock()
        key = _seen_key(request_id)
        seen = self.seen
        while seen:
            oldest, at = next(iter(seen.items()))
            if now - at <= self.reuse_window:
                break
            del seen[oldest]
        if key in seen:
            return False
        while len(seen) >= self.reuse_memory:
            seen.popitem(last=False)
        seen[key] = now
        return True

    def _transmit(self, entry: Pending, session: int) -> None:
        entry.session = session
        frame = entry.frame_text or PermRequest(entry.tool_name, entry.tool_input).envelope(
            entry.request_id
        )
        self._send(session, frame)

    def _decide(self, entry: Pending, decision: Decision, reason: Reason) -> Outcome:
        # Popping is what makes a decision final: no second path can find it.
        del self.pending[entry.request_id]
        self.pending_bytes -= entry.size
        self.held.pop(entry.request_id, None)
        if not self.pending:
            self._deadlines.clear()
            self.held.clear()
        outcome = self._answer(entry, decision, reason)
        cancel = _CANCELLED.get(reason)
        if cancel is not None and entry.session is not None and entry.session == self.session:
            # Only on the session it was sent on: a later session's gateway
            # never saw it (the one that did withdrew it when that session ended).
            try:
                self._send(entry.session, perm_cancel(entry.request_id, cancel))
            except Exception:
                self._log.exception("perm_cancel for {!r} could not be sent", entry.request_id)
        return outcome

    def _answer(self, entry: Pending, decision: Decision, reason: Reason) -> Outcome:
        outcome = Outcome(entry.request_id, decision, reason)
        if not entry.future.done():  # a caller may have cancelled its future
            entry.future.set_result(outcome)
        if self._on_decided is not None:
            self._on_decided(entry, outcome)
        return outcome


def _seen_key(request_id: str) -> str | bytes:
    """What the reuse memory keeps of an id: itself, or a long one's digest."""
    if len(request_id) <= 64:
        return request_id
    return hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _frame_size(entry: Pending) -> int:
    """UTF-8 bytes of the request's ``perm_request`` frame: what holding it costs."""
    text = entry.frame_text
    if text is None:
        text = serialize(PermRequest(entry.tool_name, entry.tool_input).envelope(entry.request_id))
    return len(text.encode("utf-8"))


class PermissionRegistryActor(UplinkLoopActor):
    role = Role.PERMISSIONS
    # Queued when it stops or crashes: the book is closed by then, so each
    # request among them is denied, never dropped.
    after_stop = (Submit, DenyAll)

    def __init__(self, ctx: UplinkContext) -> None:
        super().__init__(ctx)
        self.book = PermissionBook(
            timeout=ctx.config.permission_timeout,
            max_pending=ctx.config.max_pending,
            max_pending_bytes=ctx.config.max_pending_bytes,
            send=self._send,
            on_decided=self._on_decided,
            log=self.log,
        )
        self.decided = 0
        self.sink: FrameSink | None = None  # the live session's direct sender
        self._sweep_at: float | None = None
        self._sweep_timer: Timer | None = None

    def on_start(self) -> None:
        super().on_start()
        self.set_state("waiting_for_session")

    def on_loop_stop(self) -> None:
        # Nothing may be lost by stopping: whatever is left is denied.
        self.book.deny_all(Reason.SHUTDOWN, close=True)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()

    def fail_closed(self) -> None:
        self.book.deny_all(Reason.CRASH, close=True)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()

    def _submit(self, message: Submit) -> None:
        self.book.submit(
            message.request_id,
            message.tool_name,
            message.tool_input,
            message.future,
            message.submitted_at,
            frame_text=message.frame_text,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "session": self.book.session,
            "pending": len(self.book.pending),
            "pending_bytes": self.book.pending_bytes,
            "held": len(self.book.held),
            "decided": self.decided,
            "ids_remembered": len(self.book.seen),  # refused for reuse (bounded)
        }

    # ── messages ────────────────────────────────────────────────────────

    @handles(Submit)
    def _on_submit(self, message: Submit) -> None:
        self._submit(message)
        self._arm_sweep()

    @handles(EnvelopeIn)
    def _on_envelope(self, message: EnvelopeIn) -> None:
        if message.envelope.type == Kind.PERM_RESPONSE:
            self.book.respond(message.session, message.envelope.req_id, message.envelope.payload)

    @handles(Abandon)
    def _on_abandon(self, message: Abandon) -> None:
        self.book.abandon(message.request_id)

    @handles(SessionOpened)
    def _on_session_opened(self, message: SessionOpened) -> None:
        self.sink = message.sink
        held = len(self.book.held)
        self.book.open_session(message.session)
        self.set_state("forwarding", f"session {message.session}, sent {held} held")

    @handles(SessionClosed)
    def _on_session_closed(self, message: SessionClosed) -> None:
        if self.sink is not None and self.sink.session == message.session:
            self.sink = None
        denied = self.book.close_session(message.session)
        if denied:
            self.log.warning(
                "session {} ended ({}): denied {} unanswered request(s)",
                message.session,
                message.reason,
                denied,
            )
        if self.book.session is None and not self.book.closed:
            self.set_state("holding", f"session {message.session} ended")

    @handles(Sweep)
    def _on_sweep(self, _: Sweep) -> None:
        self._sweep_at = None
        self._arm_sweep()

    @handles(DenyAll)
    def _on_deny_all(self, message: DenyAll) -> int:
        count = self.book.deny_all(message.reason, close=message.close)
        if count:
            self.log.warning("denied all {} undecided request(s): {}", count, message.reason)
        if message.close:
            self.set_state("closed", str(message.reason))
        if not message.done.done():
            message.done.set_result(count)
        return count

    # ── helpers ─────────────────────────────────────────────────────────

    def _send(self, session: int, frame: Envelope | str) -> None:
        # The book sends only on the session it was opened with, whose sink this is.
        sink = self.sink
        assert sink is not None
        assert sink.session == session, (session, sink.session)
        if isinstance(frame, str):
            self.ctx.stats.inc("frames_out", Kind.PERM_REQUEST)
            sink.send_text(frame)
        else:
            self.ctx.stats.inc("frames_out", frame.type)
            sink.send(frame)

    def _on_decided(self, entry: Pending, outcome: Outcome) -> None:
        self.decided += 1
        self.ctx.stats.inc_each(
            ("decisions", outcome.decision.value), ("decision_reasons", outcome.reason.value)
        )
        level = "INFO" if outcome.reason is Reason.GATEWAY else "WARNING"
        self.log.log(
            level,
            "decided {!r} ({}): {} [{}]",
            entry.request_id,
            entry.tool_name,
            outcome.decision,
            outcome.reason,
        )

    def _arm_sweep(self) -> None:
        next_deadline = self.book.expire()
        if next_deadline is None:
            return
        if self._sweep_at is not None and self._sweep_at <= next_deadline:
            return  # an earlier sweep is already armed
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_at = next_deadline
        self._sweep_timer = self.tell_self_later(next_deadline - time.monotonic() + 0.001, Sweep())
