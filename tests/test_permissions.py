"""The permission lifecycle: every request gets exactly one decision.

Each rule is tested twice: on :class:`PermissionBook` directly (no threads, a
fake clock), and end to end through a real :class:`Uplink` against the real
test gateway.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

from actors import Uplink
from actors.logsetup import configure_logging
from actors.permissions import Pending, PermissionBook
from protocol import Decision, Envelope, Outcome, Reason
from tests.conftest import eventually, scaled
from tests.support.gateway import Gateway, Session

APPROVE = {"approved": True, "always_allow": False}
DENY = {"approved": False, "always_allow": False}


# ── book helpers ────────────────────────────────────────────────────────────


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A book with a fake clock that records what it sends and decides."""

    def __init__(
        self, *, timeout: float = 60.0, max_pending: int = 100, reuse_window: float = 3600.0
    ) -> None:
        self.clock = FakeClock()
        self.sent: list[tuple[int, Envelope]] = []
        self.decided: list[tuple[Pending, Outcome]] = []
        self.book = PermissionBook(
            timeout=timeout,
            max_pending=max_pending,
            send=lambda session, envelope: self.sent.append((session, envelope)),
            on_decided=lambda entry, outcome: self.decided.append((entry, outcome)),
            clock=self.clock,
            reuse_window=reuse_window,
        )

    def submit(
        self, request_id: str, tool: str = "Bash", tool_input: Any = None
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.book.submit(request_id, tool, {} if tool_input is None else tool_input, future)
        return future

    def sent_ids(self, session: int | None = None) -> list[str]:
        return [
            e.req_id
            for s, e in self.sent
            if (session is None or s == session) and e.type == "perm_request"
        ]

    def cancels(self) -> list[tuple[int, str, Any]]:
        """The perm_cancel frames sent: (session, req_id, payload)."""
        return [(s, e.req_id, e.payload) for s, e in self.sent if e.type == "perm_cancel"]


def _outcome(future: concurrent.futures.Future) -> tuple[Decision, Reason]:
    assert future.done(), "expected a decision"
    result = future.result(0)
    return result.decision, result.reason


# ── e2e helpers ─────────────────────────────────────────────────────────────


def _connected(gateway: Gateway, uplink: Uplink, number: int = 1) -> Session:
    session = gateway.session(number, timeout=scaled(5))
    gateway.frame(session, "identity", timeout=scaled(5))
    assert uplink.wait_connected(scaled(5))
    return session


def _perm_requests(session: Session) -> list[dict[str, Any]]:
    return session.of_type("perm_request")


def _wait_requests(gateway: Gateway, session: Session, count: int) -> list[dict[str, Any]]:
    return gateway.wait_until(
        lambda: _perm_requests(session) if len(_perm_requests(session)) >= count else None,
        timeout=scaled(5),
    )


def _result(future: concurrent.futures.Future, timeout: float = 5) -> tuple[Decision, Reason]:
    outcome = future.result(timeout=scaled(timeout))
    return outcome.decision, outcome.reason


def _decision_total(uplink: Uplink) -> int:
    return sum(uplink.status()["counters"].get("decisions", {}).values())


# ═══ PermissionBook: the rules without threads ══════════════════════════════


def test_book_submitted_while_connected_is_sent_at_once() -> None:
    h = Harness()
    h.book.open_session(7)
    future = h.submit("r1", "Bash", {"command": "ls"})
    assert len(h.sent) == 1
    session, envelope = h.sent[0]
    assert session == 7
    assert (envelope.type, envelope.req_id) == ("perm_request", "r1")
    assert envelope.payload == {"tool_name": "Bash", "tool_input": {"command": "ls"}}
    assert not future.done()
    assert not h.book.held


def test_book_submitted_while_disconnected_is_held_in_arrival_order() -> None:
    h = Harness()
    futures = [h.submit(f"r{i}") for i in range(5)]
    assert h.sent == []
    assert len(h.book.held) == 5
    h.book.open_session(3)
    assert h.sent_ids() == [f"r{i}" for i in range(5)]
    assert {s for s, _ in h.sent} == {3}
    assert not h.book.held
    assert not any(f.done() for f in futures)
    # Held once, sent once: a second session does not resend them.
    h.book.close_session(3)
    h.book.open_session(4)
    assert h.sent_ids(4) == []


def test_book_held_order_survives_a_reused_id_after_timeout() -> None:
    # x times out while held; a new x arrives after y: y must still go first.
    # (The id is refused for reuse_window seconds; here that is over by then.)
    h = Harness(timeout=60, reuse_window=50)
    old_x = h.submit("x")
    h.clock.advance(30)
    y = h.submit("y")
    h.clock.advance(31)
    h.book.expire()
    assert _outcome(old_x) == (Decision.DENY, Reason.TIMEOUT)
    new_x = h.submit("x")
    assert len(h.book.held) == 2, "a decided request must not stay counted as held"
    h.book.open_session(1)
    assert h.sent_ids() == ["y", "x"]
    assert not y.done()
    assert not new_x.done()


def test_book_session_end_denies_only_what_was_sent_on_it() -> None:
    h = Harness()
    h.book.open_session(1)
    sent_1 = [h.submit("a"), h.submit("b")]
    assert h.book.close_session(1) == 2
    for future in sent_1:
        assert _outcome(future) == (Decision.DENY, Reason.SESSION_ENDED)
    held = [h.submit("c"), h.submit("d")]
    # Failed connects end sessions that never came up: held ones stay.
    assert h.book.close_session(2) == 0
    assert h.book.close_session(1) == 0
    assert not any(f.done() for f in held)
    h.book.open_session(3)
    sent_3 = h.submit("e")
    # A late close of an older session leaves session 3's requests alone.
    assert h.book.close_session(2) == 0
    assert not any(f.done() for f in [*held, sent_3])
    assert h.book.session == 3
    assert h.book.close_session(3) == 3
    assert all(_outcome(f) == (Decision.DENY, Reason.SESSION_ENDED) for f in [*held, sent_3])


def test_book_timeout_counts_from_submission() -> None:
    h = Harness(timeout=60)
    held = h.submit("held")  # held at t=0
    h.clock.advance(50)
    h.book.open_session(1)  # sent at t=50: the clock does not restart
    answered = h.submit("answered")
    later = h.submit("later")  # t=50 → deadline t=110
    h.book.respond(1, "answered", APPROVE)
    assert h.book.expire() == pytest.approx(1060.0)  # the next deadline
    h.clock.advance(9.5)
    h.book.expire()
    assert not held.done()
    h.clock.advance(0.5)
    assert h.book.expire() == pytest.approx(1110.0)
    assert _outcome(held) == (Decision.DENY, Reason.TIMEOUT)
    assert not later.done()
    assert _outcome(answered) == (Decision.APPROVE, Reason.GATEWAY)
    h.clock.advance(50)
    assert h.book.expire() is None
    assert _outcome(later) == (Decision.DENY, Reason.TIMEOUT)
    assert not h.book.pending


def test_book_submission_already_past_its_deadline_is_denied() -> None:
    h = Harness(timeout=60)
    h.book.open_session(1)
    future: concurrent.futures.Future = concurrent.futures.Future()
    h.book.submit("stale", "Bash", {}, future, submitted_at=h.clock.now - 61)
    assert _outcome(future) == (Decision.DENY, Reason.TIMEOUT)
    assert h.sent == []
    assert not h.book.pending


def test_book_shutdown_denies_all_and_every_later_submission() -> None:
    h = Harness()
    h.book.open_session(1)
    sent = h.submit("sent")
    h.book.close_session(1)  # "sent" denied by the session end, not shutdown
    held = h.submit("held")
    waiting = h.submit("waiting")
    assert h.book.deny_all(Reason.SHUTDOWN, close=True) == 2
    assert _outcome(held) == (Decision.DENY, Reason.SHUTDOWN)
    assert _outcome(waiting) == (Decision.DENY, Reason.SHUTDOWN)
    assert _outcome(sent) == (Decision.DENY, Reason.SESSION_ENDED)
    h.book.open_session(2)
    after = h.submit("after")
    assert _outcome(after) == (Decision.DENY, Reason.SHUTDOWN)
    assert h.sent_ids(2) == []


def test_book_over_max_pending_denies_only_the_new_one() -> None:
    h = Harness(max_pending=3)
    h.book.open_session(1)
    first = [h.submit(f"r{i}") for i in range(3)]
    extra = h.submit("r3")
    assert _outcome(extra) == (Decision.DENY, Reason.OVER_LIMIT)
    assert not any(f.done() for f in first)
    assert h.sent_ids() == ["r0", "r1", "r2"]
    # Room again once one is decided.
    h.book.respond(1, "r0", APPROVE)
    again = h.submit("r4")
    assert not again.done()
    assert sorted(h.book.pending) == ["r1", "r2", "r4"]


def test_book_duplicate_id_denies_the_new_one_and_keeps_the_first() -> None:
    h = Harness()
    h.book.open_session(1)
    first = h.submit("dup", "Bash", {"n": 1})
    second = h.submit("dup", "Write", {"n": 2})
    assert _outcome(second) == (Decision.DENY, Reason.DUPLICATE_ID)
    assert not first.done()
    assert h.sent_ids() == ["dup"]
    h.book.respond(1, "dup", APPROVE)
    assert _outcome(first) == (Decision.APPROVE, Reason.GATEWAY)
    # Once decided, the id is still refused: the gateway may still show the first.
    third = h.submit("dup")
    assert _outcome(third) == (Decision.DENY, Reason.REUSED_ID)


def test_book_timeout_of_a_sent_request_sends_perm_cancel_on_its_session() -> None:
    h = Harness(timeout=10)
    h.book.open_session(1)
    sent = h.submit("t-1")
    h.clock.advance(11)
    h.book.expire()
    assert _outcome(sent) == (Decision.DENY, Reason.TIMEOUT)
    assert h.cancels() == [(1, "t-1", {"reason": "timeout"})]


def test_book_no_perm_cancel_for_what_no_gateway_saw_or_another_session_sent() -> None:
    h = Harness(timeout=10)
    held = h.submit("held")  # no session: never sent
    h.clock.advance(11)
    h.book.expire()
    assert _outcome(held) == (Decision.DENY, Reason.TIMEOUT)
    h.book.open_session(1)
    old = h.submit("old")
    h.book.open_session(2)  # a newer session, before session 1's end was handled
    h.clock.advance(11)
    h.book.expire()
    assert _outcome(old) == (Decision.DENY, Reason.TIMEOUT)
    assert h.cancels() == [], "never on a later session, never for a held request"


def test_book_abandon_denies_as_caller_gone_and_cancels_only_what_was_sent() -> None:
    h = Harness()
    held = h.submit("h-1")
    assert h.book.abandon("h-1") is not None
    assert _outcome(held) == (Decision.DENY, Reason.CALLER_GONE)
    assert h.book.held == {}
    h.book.open_session(3)
    sent = h.submit("s-1")
    assert h.book.abandon("s-1") is not None
    assert _outcome(sent) == (Decision.DENY, Reason.CALLER_GONE)
    assert h.cancels() == [(3, "s-1", {"reason": "caller_gone"})]
    assert h.book.abandon("s-1") is None  # already decided: nothing more
    assert h.book.abandon("nobody") is None
    assert h.book.respond(3, "s-1", APPROVE) is None  # a late answer changes nothing
    assert len(h.cancels()) == 1


def test_book_refuses_an_id_seen_within_the_window_decided_or_not() -> None:
    h = Harness(reuse_window=100)
    h.book.open_session(1)
    first = h.submit("r", "Bash", {"command": "ls"})
    h.book.respond(1, "r", DENY)
    assert _outcome(first) == (Decision.DENY, Reason.GATEWAY)
    h.clock.advance(99)
    again = h.submit("r", "Bash", {"command": "curl x | sh"})
    assert _outcome(again) == (Decision.DENY, Reason.REUSED_ID)
    assert "reused" in again.result(0).message
    assert h.sent_ids() == ["r"], "the reuse never reaches the gateway"
    h.clock.advance(2)  # the first sight is now older than the window
    later = h.submit("r")
    assert not later.done()


def test_book_remembers_at_most_reuse_memory_ids() -> None:
    h = Harness()
    h.book.reuse_memory = 3
    h.book.open_session(1)
    for request_id in ("a", "b", "c", "d"):
        h.submit(request_id)
        h.book.respond(1, request_id, DENY)
    assert list(h.book.seen) == ["b", "c", "d"]
    assert not h.submit("a").done(), "the oldest id was forgotten to stay within the cap"
    assert _outcome(h.submit("c")) == (Decision.DENY, Reason.REUSED_ID)


def test_book_remembers_a_long_id_by_its_digest_and_still_refuses_it() -> None:
    h = Harness()
    h.book.open_session(1)
    long_id = "x" * 1_000_000
    h.submit(long_id)
    h.book.respond(1, long_id, DENY)
    assert [len(key) for key in h.book.seen] == [16], "a megabyte id costs 16 bytes"
    assert _outcome(h.submit(long_id)) == (Decision.DENY, Reason.REUSED_ID)
    assert not h.submit(long_id + "y").done()


def test_book_duplicate_of_a_held_id_is_denied_too() -> None:
    h = Harness()
    first = h.submit("dup")
    second = h.submit("dup")
    assert _outcome(second) == (Decision.DENY, Reason.DUPLICATE_ID)
    h.book.open_session(1)
    assert h.sent_ids() == ["dup"]
    assert not first.done()


def test_book_late_unknown_and_repeated_responses_change_nothing() -> None:
    h = Harness(timeout=60)
    h.book.open_session(1)
    approved = h.submit("a")
    assert h.book.respond(1, "a", APPROVE) is not None
    assert h.book.respond(1, "a", DENY) is None  # twice
    assert _outcome(approved) == (Decision.APPROVE, Reason.GATEWAY)
    assert h.book.respond(1, "nobody", APPROVE) is None  # unknown
    timed_out = h.submit("t")
    h.clock.advance(61)
    h.book.expire()
    assert h.book.respond(1, "t", APPROVE) is None  # after the timeout
    assert _outcome(timed_out) == (Decision.DENY, Reason.TIMEOUT)
    assert len(h.decided) == 2


def test_book_response_on_another_session_is_ignored() -> None:
    h = Harness()
    h.book.open_session(1)
    on_1 = h.submit("one")
    assert h.book.respond(2, "one", APPROVE) is None
    assert not on_1.done()
    held = h.submit("held-later")  # sent on 1 too, since 1 is up
    h.book.close_session(1)
    assert _outcome(on_1) == (Decision.DENY, Reason.SESSION_ENDED)
    assert _outcome(held) == (Decision.DENY, Reason.SESSION_ENDED)
    waiting = h.submit("waiting")  # held: sent on no session yet
    assert h.book.respond(1, "waiting", APPROVE) is None
    assert h.book.respond(2, "waiting", APPROVE) is None
    assert not waiting.done()
    h.book.open_session(2)
    assert h.book.respond(1, "waiting", APPROVE) is None
    assert h.book.respond(2, "waiting", APPROVE) is not None
    assert _outcome(waiting) == (Decision.APPROVE, Reason.GATEWAY)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"approved": False, "always_allow": True}, (Decision.DENY, Reason.CONTRADICTORY)),
        ({"approved": True, "always_allow": True}, (Decision.ALWAYS_ALLOW, Reason.GATEWAY)),
        ({"always_allow": True}, (Decision.ALWAYS_ALLOW, Reason.GATEWAY)),
        ({"approved": True}, (Decision.APPROVE, Reason.GATEWAY)),
        ({"approved": "yes"}, (Decision.DENY, Reason.GATEWAY)),
        (None, (Decision.DENY, Reason.GATEWAY)),
    ],
)
def test_book_response_mapping(payload: Any, expected: tuple[Decision, Reason]) -> None:
    h = Harness()
    h.book.open_session(1)
    future = h.submit("r")
    h.book.respond(1, "r", payload)
    assert _outcome(future) == expected


def test_book_every_submission_gets_exactly_one_decision_randomized() -> None:
    rng = random.Random(20240611)
    # A short reuse window: ids come back both inside it and after it.
    h = Harness(timeout=10, max_pending=40, reuse_window=15)
    futures: list[concurrent.futures.Future] = []
    session = 0
    ids = [f"id{n}" for n in range(60)]  # few ids: duplicates happen
    for _ in range(5000):
        op = rng.random()
        if op < 0.40:
            future: concurrent.futures.Future = concurrent.futures.Future()
            h.book.submit(rng.choice(ids), "Bash", {}, future)
            futures.append(future)
        elif op < 0.70:
            payload = rng.choice([APPROVE, DENY, {"approved": False, "always_allow": True}, None])
            on = (
                h.book.session
                if rng.random() < 0.8 and h.book.session
                else rng.randint(1, session + 1)
            )
            h.book.respond(on, rng.choice(ids), payload)
        elif op < 0.80:
            h.clock.advance(rng.uniform(0, 3))
            h.book.expire()
        elif op < 0.90:
            if h.book.session is None:
                session += 1
                h.book.open_session(session)
            else:
                h.book.close_session(h.book.session)
        elif op < 0.95:
            h.book.close_session(rng.randint(1, session + 1))  # stale or failed sessions
        else:
            h.book.expire()
        assert len(h.book.pending) <= 40
    h.book.deny_all(Reason.SHUTDOWN, close=True)

    per_future = Counter(id(entry.future) for entry, _ in h.decided)
    assert len(h.decided) == len(futures)
    assert all(per_future[id(f)] == 1 for f in futures)
    for entry, outcome in h.decided:
        assert entry.future.result(0) is outcome
    reasons = Counter(o.reason for _, o in h.decided)
    # The scenario really exercised the rules it claims to.
    for reason in (
        Reason.GATEWAY,
        Reason.SESSION_ENDED,
        Reason.TIMEOUT,
        Reason.DUPLICATE_ID,
        Reason.REUSED_ID,
        Reason.SHUTDOWN,
    ):
        assert reasons[reason] > 0, reasons


def test_book_deadline_heap_stays_bounded_over_many_round_trips() -> None:
    h = Harness(timeout=60)
    h.book.open_session(1)
    keeper = h.submit("keeper")  # one long-lived request keeps the book non-empty
    for n in range(5000):
        h.submit(f"r{n}")
        h.book.expire()  # what the actor does after every submission
        h.book.respond(1, f"r{n}", APPROVE)
        h.clock.advance(0.001)
    assert len(h.book.pending) == 1
    assert len(h.book._deadlines) <= 2 * len(h.book.pending) + 64
    assert len(h.book.held) == 0
    assert not keeper.done()
    assert len(h.decided) == 5000


# ═══ end to end: a real Uplink against the test gateway ═════════════════════


def test_e2e_submitted_while_connected_is_sent_at_once(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = _connected(gateway, uplink)
    future = uplink.request_permission("Bash", {"command": "echo hi"}, request_id="now-1")
    frame = gateway.frame(session, "perm_request", timeout=scaled(2))
    assert frame == {
        "type": "perm_request",
        "req_id": "now-1",
        "payload": {"tool_name": "Bash", "tool_input": {"command": "echo hi"}},
    }
    assert not future.done()
    gateway.respond(session, "now-1", APPROVE)
    assert _result(future) == (Decision.APPROVE, Reason.GATEWAY)


def test_e2e_held_while_disconnected_then_sent_after_identity_in_order(
    gateway: Gateway, make_uplink
) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=0.05, backoff_max=0.2)
    first = _connected(gateway, uplink)
    gateway.stop()  # the gateway goes away; connects are refused meanwhile
    gateway.wait_until(lambda: first.closed, timeout=scaled(5))
    eventually(lambda: uplink.status()["connection"]["state"] != "connected", 5, "disconnect")
    ids = [f"held-{n}" for n in range(4)]
    futures = [uplink.request_permission("Bash", {"n": n}, request_id=i) for n, i in enumerate(ids)]
    # Several failed connects end several sessions: held requests are not denied.
    started = uplink.status()["connection"]["sessions_started"]
    eventually(
        lambda: uplink.status()["connection"]["sessions_started"] >= started + 2, 5, "retries"
    )
    assert not any(f.done() for f in futures)
    assert uplink.status()["permissions"]["held"] == 4

    gateway.start(gateway.port)
    second = gateway.session(2, timeout=scaled(5))
    _wait_requests(gateway, second, 4)
    assert [f["type"] for f in second.frames[:5]] == ["identity"] + ["perm_request"] * 4
    assert [f["req_id"] for f in second.frames[1:5]] == ids
    assert [f["payload"]["tool_input"] for f in second.frames[1:5]] == [{"n": n} for n in range(4)]
    for i in ids:
        gateway.respond(second, i, APPROVE)
    assert [_result(f) for f in futures] == [(Decision.APPROVE, Reason.GATEWAY)] * 4


def test_e2e_session_end_denies_sent_requests_at_once_and_not_held_ones(
    gateway: Gateway, make_uplink
) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=30.0, backoff_max=60.0)
    first = _connected(gateway, uplink)
    sent = [uplink.request_permission("Bash", request_id=f"s{n}") for n in range(3)]
    _wait_requests(gateway, first, 3)
    started = time.monotonic()
    gateway.abort(first)
    for future in sent:
        assert _result(future, 5) == (Decision.DENY, Reason.SESSION_ENDED)
    assert time.monotonic() - started < scaled(1.5), "the session end must deny at once"
    eventually(lambda: uplink.status()["connection"]["state"] == "backoff", 5, "backoff")

    held = uplink.request_permission("Write", request_id="held")
    uplink.reconnect()  # end the 30 s back-off now
    second = _connected(gateway, uplink, 2)
    frame = gateway.frame(second, "perm_request", timeout=scaled(5))
    assert frame["req_id"] == "held"
    assert second.frames[0]["type"] == "identity"
    assert not held.done()
    gateway.respond(second, "held", APPROVE)
    assert _result(held) == (Decision.APPROVE, Reason.GATEWAY)


def test_e2e_timeout_from_submission(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, permission_timeout=0.3)
    session = _connected(gateway, uplink)
    started = time.monotonic()
    slow = uplink.request_permission("Bash", request_id="slow")
    quick = uplink.request_permission("Bash", request_id="quick")
    _wait_requests(gateway, session, 2)
    gateway.respond(session, "quick", APPROVE)
    assert _result(quick) == (Decision.APPROVE, Reason.GATEWAY)
    assert _result(slow) == (Decision.DENY, Reason.TIMEOUT)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < scaled(2.0), elapsed
    # A response after the timeout changes nothing.
    gateway.respond(session, "slow", APPROVE)
    gateway.respond(session, "quick", DENY)
    # A round trip after them proves they were handled (frames are routed in order).
    probe = uplink.request_permission("Bash", request_id="probe")
    gateway.frame(session, "perm_request", 2, timeout=scaled(2))
    gateway.respond(session, "probe", APPROVE)
    assert _result(probe) == (Decision.APPROVE, Reason.GATEWAY)
    assert _result(slow) == (Decision.DENY, Reason.TIMEOUT)
    assert _result(quick) == (Decision.APPROVE, Reason.GATEWAY)
    assert _decision_total(uplink) == 3


def test_e2e_held_request_times_out_while_disconnected(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(
        gateway.url, permission_timeout=0.3, backoff_initial=30.0, backoff_max=60.0
    )
    first = _connected(gateway, uplink)
    gateway.close(first, 1000)
    eventually(lambda: uplink.status()["connection"]["state"] == "backoff", 5, "backoff")
    future = uplink.request_permission("Bash", request_id="never-sent")
    assert _result(future) == (Decision.DENY, Reason.TIMEOUT)
    eventually(lambda: uplink.status()["permissions"]["held"] == 0, 5, "held count back to 0")
    uplink.reconnect()
    second = _connected(gateway, uplink, 2)
    # The timed-out request is not sent on the new session.
    probe = uplink.request_permission("Bash", request_id="probe")
    frame = gateway.frame(second, "perm_request", timeout=scaled(5))
    assert frame["req_id"] == "probe"
    gateway.respond(second, "probe", APPROVE)
    assert _result(probe)[0] is Decision.APPROVE
    assert [f["req_id"] for f in _perm_requests(second)] == ["probe"]


def test_e2e_shutdown_denies_all_and_later_submissions(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = _connected(gateway, uplink)
    futures = [uplink.request_permission("Bash", request_id=f"p{n}") for n in range(3)]
    _wait_requests(gateway, session, 3)
    uplink.stop()
    for future in futures:
        assert _result(future, 1) == (Decision.DENY, Reason.SHUTDOWN)
    after = uplink.request_permission("Bash", request_id="after")
    assert _result(after, 0.1) == (Decision.DENY, Reason.SHUTDOWN)
    assert uplink.decide("Bash", timeout=1).reason is Reason.SHUTDOWN
    gateway.wait_until(lambda: session.closed, timeout=scaled(5))
    assert session.close_code in (1000, 1001)


def test_e2e_shutdown_denies_held_requests_too(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=30.0, backoff_max=60.0)
    first = _connected(gateway, uplink)
    gateway.close(first, 1000)
    eventually(lambda: uplink.status()["connection"]["state"] == "backoff", 5, "backoff")
    held = uplink.request_permission("Bash", request_id="held")
    eventually(lambda: uplink.status()["permissions"]["held"] == 1, 5, "held")
    uplink.stop()
    assert _result(held, 1) == (Decision.DENY, Reason.SHUTDOWN)


def test_e2e_over_max_pending(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, max_pending=3)
    session = _connected(gateway, uplink)
    first = [uplink.request_permission("Bash", request_id=f"m{n}") for n in range(3)]
    _wait_requests(gateway, session, 3)
    extra = uplink.request_permission("Bash", request_id="m3")
    assert _result(extra) == (Decision.DENY, Reason.OVER_LIMIT)
    assert not any(f.done() for f in first)
    assert [f["req_id"] for f in _perm_requests(session)] == ["m0", "m1", "m2"]
    for n in range(3):
        gateway.respond(session, f"m{n}", APPROVE)
    assert [_result(f) for f in first] == [(Decision.APPROVE, Reason.GATEWAY)] * 3


def test_e2e_duplicate_id(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = _connected(gateway, uplink)
    first = uplink.request_permission("Bash", {"n": 1}, request_id="dup")
    second = uplink.request_permission("Write", {"n": 2}, request_id="dup")
    assert _result(second) == (Decision.DENY, Reason.DUPLICATE_ID)
    assert not first.done()
    frame = gateway.frame(session, "perm_request", timeout=scaled(2))
    assert frame["payload"] == {"tool_name": "Bash", "tool_input": {"n": 1}}
    gateway.respond(session, "dup", {"approved": True, "always_allow": True})
    assert _result(first) == (Decision.ALWAYS_ALLOW, Reason.GATEWAY)
    assert len(_perm_requests(session)) == 1


def test_e2e_repeated_and_unknown_responses_change_nothing(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = _connected(gateway, uplink)
    future = uplink.request_permission("Bash", request_id="twice")
    gateway.frame(session, "perm_request", timeout=scaled(2))
    gateway.respond(session, "twice", APPROVE)
    gateway.respond(session, "twice", DENY)
    gateway.respond(session, "unknown", APPROVE)
    assert _result(future) == (Decision.APPROVE, Reason.GATEWAY)
    # A round trip after them proves they were all handled, and harmlessly.
    probe = uplink.request_permission("Bash", request_id="probe")
    gateway.frame(session, "perm_request", 1, timeout=scaled(2))
    gateway.respond(session, "probe", DENY)
    assert _result(probe) == (Decision.DENY, Reason.GATEWAY)
    assert _decision_total(uplink) == 2
    eventually(lambda: uplink.status()["permissions"]["pending"] == 0, 5, "nothing pending")


def test_e2e_response_on_a_later_session_is_ignored(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=0.05)
    first = _connected(gateway, uplink)
    lost = uplink.request_permission("Bash", request_id="lost")
    gateway.frame(first, "perm_request", timeout=scaled(2))
    gateway.abort(first)
    assert _result(lost) == (Decision.DENY, Reason.SESSION_ENDED)
    second = _connected(gateway, uplink, 2)
    gateway.respond(second, "lost", APPROVE)  # answered on the wrong session
    probe = uplink.request_permission("Bash", request_id="probe")
    gateway.frame(second, "perm_request", timeout=scaled(2))
    gateway.respond(second, "probe", APPROVE)
    assert _result(probe) == (Decision.APPROVE, Reason.GATEWAY)
    assert _result(lost) == (Decision.DENY, Reason.SESSION_ENDED)
    assert _decision_total(uplink) == 2


def test_e2e_contradictory_response_denies(gateway: Gateway, make_uplink) -> None:
    from loguru import logger

    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        uplink = make_uplink(gateway.url)
        session = _connected(gateway, uplink)
        future = uplink.request_permission("Bash", request_id="odd")
        gateway.frame(session, "perm_request", timeout=scaled(2))
        gateway.respond(session, "odd", {"approved": False, "always_allow": True})
        assert _result(future) == (Decision.DENY, Reason.CONTRADICTORY)
    finally:
        logger.remove(sink)
    assert any("contradictory" in w for w in warnings), warnings


def test_e2e_every_request_gets_exactly_one_decision_randomized(
    gateway: Gateway, make_uplink
) -> None:
    rng = random.Random(7)
    gw_rng = random.Random(8)  # the gateway answers from its own thread
    answers = [
        APPROVE,
        DENY,
        {"approved": True, "always_allow": True},
        {"approved": False, "always_allow": True},
        None,  # no answer: times out, or dies with its session
    ]

    def chaotic(session: Session, frame: dict[str, Any]) -> None:
        choice = gw_rng.choice(answers)
        if choice is not None:
            gateway.send_in_loop(session, "perm_response", frame["req_id"], choice)
            if gw_rng.random() < 0.2:  # and sometimes again
                gateway.send_in_loop(session, "perm_response", frame["req_id"], DENY)
        elif gw_rng.random() < 0.05:
            session.ws.transport.abort()

    gateway.auto = chaotic
    uplink = make_uplink(
        gateway.url, permission_timeout=0.4, max_pending=25, backoff_initial=0.02, backoff_max=0.1
    )
    _connected(gateway, uplink)
    calls: Counter[int] = Counter()
    futures: list[concurrent.futures.Future] = []
    ids = [f"r{n}" for n in range(150)]
    for n in range(300):
        future = uplink.request_permission("Bash", {"n": n}, request_id=rng.choice(ids))
        future.add_done_callback(lambda f, n=n: calls.update([n]))
        futures.append(future)
        if rng.random() < 0.3:
            time.sleep(0.005)
    # Let most settle on their own (answers, timeouts, session ends) ...
    eventually(lambda: sum(f.done() for f in futures) >= 200, 10, "most decisions")
    # ... and the shutdown decides the rest.
    uplink.stop()
    assert all(f.done() for f in futures)
    assert len(calls) == len(futures)
    assert set(calls.values()) == {1}
    # The registry's own count agrees: one decision per submission, no more.
    assert _decision_total(uplink) == len(futures)
    reasons = Counter(f.result(0).reason for f in futures)
    assert reasons[Reason.GATEWAY] > 0
    assert reasons[Reason.TIMEOUT] + reasons[Reason.SESSION_ENDED] > 0


def test_e2e_deadline_heap_stays_bounded_over_5000_round_trips(
    gateway: Gateway, make_uplink
) -> None:
    configure_logging("WARNING")  # 5,000 INFO lines would only slow this down

    def approve_but_keeper(session: Session, frame: dict[str, Any]) -> None:
        if frame["req_id"] != "keeper":
            gateway.send_in_loop(session, "perm_response", frame["req_id"], APPROVE)

    gateway.auto = approve_but_keeper
    uplink = make_uplink(gateway.url)
    _connected(gateway, uplink)
    keeper = uplink.request_permission("Bash", request_id="keeper")
    for batch in range(50):
        futures = [
            uplink.request_permission("Bash", request_id=f"b{batch}-{n}") for n in range(100)
        ]
        for future in futures:
            assert future.result(timeout=scaled(10)).decision is Decision.APPROVE
    registry = uplink.context.directory.get("permissions")
    assert registry is not None
    book: PermissionBook = registry.proxy().book.get()  # public pykka: a proxy attribute
    assert list(book.pending) == ["keeper"]
    # Bounded by how many were in flight at once (100), not by the 5,000 round trips.
    assert len(book._deadlines) <= 2 * 101 + 64, len(book._deadlines)
    # The next submission compacts what the decided ones left behind.
    assert uplink.decide("Bash", request_id="last", timeout=scaled(5)).decision is Decision.APPROVE
    assert len(book._deadlines) <= 2 * len(book.pending) + 64, len(book._deadlines)
    assert len(book.held) == 0
    assert not keeper.done()


def test_e2e_requests_queued_behind_the_registry_stop_are_denied(
    gateway: Gateway, make_uplink
) -> None:
    uplink = make_uplink(gateway.url)
    _connected(gateway, uplink)
    registry = uplink.context.directory.get("permissions")
    assert registry is not None
    # Hold the event loop (where the registry runs) so that the stop and the
    # requests all wait in its mailbox, the requests behind the stop.
    release = threading.Event()
    uplink.context.loop.call_soon(release.wait, scaled(5))
    registry.stop(block=False)
    # pykka would drop these unanswered when the stop is handled.
    futures = [uplink.request_permission("Bash", request_id=f"late-{n}") for n in range(100)]
    release.set()
    done, not_done = concurrent.futures.wait(futures, timeout=scaled(5))
    assert not not_done, f"{len(not_done)} request(s) never got a decision"
    assert {f.result().reason for f in done} == {Reason.SHUTDOWN}
