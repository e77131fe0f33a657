"""Supervision: sessions end and come back, crashed actors restart.

Every session end (clean close, abort, error close, the connection actor's own
crash) brings a new session with identity first, and denies what was sent on
the old one. A crash of any other actor is repaired by the supervisor (or, for
the supervisor itself, by its own replacement) and the uplink serves again.
No actor thread outlives ``Uplink.stop()``.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import pykka
import pytest

from actors import Uplink
from actors.messages import InjectFault
from protocol import Decision, Reason
from tests.conftest import closed_port, eventually, non_daemon_threads, scaled
from tests.support.gateway import Gateway, Session

APPROVE = {"approved": True, "always_allow": False}


def _connected(gateway: Gateway, uplink: Uplink, number: int = 1) -> Session:
    session = gateway.session(number, timeout=scaled(5))
    gateway.frame(session, "identity", timeout=scaled(5))
    eventually(
        lambda: (
            uplink.status()["connection"]["state"] == "connected"
            and uplink.status()["connection"]["session"] is not None
        ),
        5,
        f"session {number} connected",
    )
    return session


def _in_flight(
    gateway: Gateway, uplink: Uplink, session: Session, *ids: str
) -> list[concurrent.futures.Future]:
    futures = [uplink.request_permission("Bash", {"id": i}, request_id=i) for i in ids]
    wanted = set(ids)
    gateway.wait_until(
        lambda: wanted <= {f["req_id"] for f in session.of_type("perm_request")}, timeout=scaled(5)
    )
    assert not any(f.done() for f in futures)
    return futures


def _result(future: concurrent.futures.Future, timeout: float = 5) -> tuple[Decision, Reason]:
    outcome = future.result(timeout=scaled(timeout))
    return outcome.decision, outcome.reason


def _round_trip(gateway: Gateway, uplink: Uplink, session: Session, request_id: str) -> None:
    """A permission round trip on ``session`` that must approve."""
    future = uplink.request_permission("Bash", {"probe": True}, request_id=request_id)
    gateway.wait_until(
        lambda: any(f["req_id"] == request_id for f in session.of_type("perm_request")),
        timeout=scaled(5),
    )
    gateway.respond(session, request_id, APPROVE)
    assert _result(future) == (Decision.APPROVE, Reason.GATEWAY)


def _end(gateway: Gateway, uplink: Uplink, session: Session, how: str) -> None:
    if how == "close_1000":
        gateway.close(session, 1000, "bye")
    elif how == "close_1011":
        gateway.close(session, 1011, "internal error")
    elif how == "abort":
        gateway.abort(session)
    elif how == "connection_crash":
        connection = uplink.context.directory.get("connection")
        assert connection is not None
        connection.tell(InjectFault())
    else:  # pragma: no cover
        raise AssertionError(how)


def _restarted(uplink: Uplink, role: str, old: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
    def fresh() -> pykka.ActorRef[Any] | None:
        ref = uplink.context.directory.get(role)
        return ref if ref is not None and ref is not old and ref.is_alive() else None

    return eventually(fresh, 5, f"{role} restarted")


# ── session ends ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("how", ["close_1000", "abort", "close_1011", "connection_crash"])
def test_session_end_restarts_the_connection(gateway: Gateway, make_uplink, how: str) -> None:
    uplink = make_uplink(gateway.url)
    first = _connected(gateway, uplink)
    futures = _in_flight(gateway, uplink, first, "a", "b")
    _end(gateway, uplink, first, how)
    for future in futures:
        assert _result(future) == (Decision.DENY, Reason.SESSION_ENDED)
    second = _connected(gateway, uplink, 2)
    assert second.frames[0] == {
        "type": "identity",
        "req_id": "identity",
        "payload": {"project": "test-proj", "version": second.frames[0]["payload"]["version"]},
    }
    gateway.wait_closed(first, timeout=scaled(5))
    _round_trip(gateway, uplink, second, "after")
    assert [f["req_id"] for f in second.of_type("perm_request")] == ["after"]
    status = uplink.status()["connection"]
    assert (status["sessions_started"], status["sessions_up"]) == (2, 2)
    if how == "close_1011":
        assert "1011" in status["last_end"], status
    if how == "connection_crash":
        assert uplink.status()["counters"]["actor_crashes"] == {"connection": 1}


def test_every_session_end_in_a_row_denies_its_own_requests(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, backoff_max=0.2)
    session = _connected(gateway, uplink)
    for number, how in enumerate(
        ["close_1000", "abort", "close_1011", "connection_crash"], start=1
    ):
        futures = _in_flight(gateway, uplink, session, f"s{number}-a", f"s{number}-b")
        _end(gateway, uplink, session, how)
        for future in futures:
            assert _result(future) == (Decision.DENY, Reason.SESSION_ENDED), how
        session = _connected(gateway, uplink, number + 1)
        assert session.frames[0]["type"] == "identity"
        # Nothing of the old session is resent on the new one.
        assert session.of_type("perm_request") == []
    _round_trip(gateway, uplink, session, "last")
    assert len(gateway.sessions) == 5


# ── actor crashes ───────────────────────────────────────────────────────────


@pytest.mark.parametrize("role", ["permissions", "heartbeat", "mcp", "router", "supervisor"])
def test_a_crashed_actor_is_restarted_and_the_uplink_serves_again(
    gateway: Gateway, make_uplink, role: str
) -> None:
    uplink = make_uplink(
        gateway.url,
        heartbeat_interval=0.1,
        local_mcp_url=f"http://127.0.0.1:{closed_port()}/mcp",
        mcp_timeout=2.0,
    )
    first = _connected(gateway, uplink)
    [in_flight] = _in_flight(gateway, uplink, first, "in-flight")
    old = uplink.context.directory.get(role)
    assert old is not None
    old.tell(InjectFault(f"test crash of {role}"))
    fresh = _restarted(uplink, role, old)
    assert not old.is_alive()

    session = first
    if role == "permissions":
        assert _result(in_flight) == (Decision.DENY, Reason.CRASH)
    elif role == "supervisor":
        # The supervisor's crash ends the session it ran; its replacement opens a new one.
        assert _result(in_flight) == (Decision.DENY, Reason.SESSION_ENDED)
        session = _connected(gateway, uplink, 2)
    else:
        assert not in_flight.done()
        gateway.respond(first, "in-flight", APPROVE)
        assert _result(in_flight) == (Decision.APPROVE, Reason.GATEWAY)
        assert len(gateway.sessions) == 1
        assert not first.closed

    _round_trip(gateway, uplink, session, "after-crash")
    if role != "supervisor":
        assert uplink.status()["counters"]["actor_crashes"] == {role: 1}
    assert fresh.is_alive()

    if role == "heartbeat":
        beats = len(session.of_type("heartbeat"))
        gateway.wait_until(
            lambda: len(session.of_type("heartbeat")) >= beats + 2, timeout=scaled(3)
        )
    if role == "mcp":
        body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
        gateway.send(session, "mcp_request", "m-1", {"body": body})
        answer = gateway.frame(session, "mcp_response", timeout=scaled(5))
        assert answer["req_id"] == "m-1"
        assert answer["payload"]["id"] == 7
        assert answer["payload"]["error"]["code"] == -32603


def test_registry_crash_denies_held_requests_too(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=30.0, backoff_max=60.0)
    first = _connected(gateway, uplink)
    gateway.close(first, 1000)
    eventually(lambda: uplink.status()["connection"]["state"] == "backoff", 5, "backoff")
    held = uplink.request_permission("Bash", request_id="held")
    eventually(lambda: uplink.status()["permissions"]["held"] == 1, 5, "held")
    old = uplink.context.directory.get("permissions")
    assert old is not None
    old.tell(InjectFault())
    assert _result(held) == (Decision.DENY, Reason.CRASH)
    _restarted(uplink, "permissions", old)
    # The new registry holds new requests and sends them on the next session.
    waiting = uplink.request_permission("Bash", request_id="waiting")
    uplink.reconnect()
    second = _connected(gateway, uplink, 2)
    gateway.wait_until(lambda: second.of_type("perm_request"), timeout=scaled(5))
    assert [f["req_id"] for f in second.of_type("perm_request")] == ["waiting"]
    gateway.respond(second, "waiting", APPROVE)
    assert _result(waiting) == (Decision.APPROVE, Reason.GATEWAY)


def test_requests_racing_a_registry_crash_all_get_a_decision(gateway: Gateway, make_uplink) -> None:
    gateway.auto = "approve"
    uplink = make_uplink(gateway.url)
    _connected(gateway, uplink)
    registry = uplink.context.directory.get("permissions")
    assert registry is not None
    futures = []
    registry.tell(InjectFault())
    for n in range(200):  # some land in the dying registry's mailbox
        futures.append(uplink.request_permission("Bash", request_id=f"race-{n}"))
    done, not_done = concurrent.futures.wait(futures, timeout=scaled(5))
    assert not not_done, f"{len(not_done)} request(s) never got a decision"
    reasons = {f.result().reason for f in done}
    assert reasons <= {Reason.GATEWAY, Reason.CRASH, Reason.SHUTDOWN}


# ── no leaks ────────────────────────────────────────────────────────────────


def test_no_actor_threads_leak_after_crashes_and_stop(gateway: Gateway, make_uplink) -> None:
    baseline = len(pykka.ActorRegistry.get_all())
    threads_before = non_daemon_threads()
    uplink = make_uplink(gateway.url)
    session = _connected(gateway, uplink)
    assert len(pykka.ActorRegistry.get_all()) > baseline
    for number, role in enumerate(
        ["connection", "permissions", "heartbeat", "mcp", "router", "supervisor"], start=1
    ):
        sessions_before = len(gateway.sessions)
        old = uplink.context.directory.get(role)
        assert old is not None
        old.tell(InjectFault())
        _restarted(uplink, role, old)
        if role in ("connection", "supervisor"):
            session = _connected(gateway, uplink, sessions_before + 1)
        _round_trip(gateway, uplink, session, f"probe-{number}")
    uplink.stop()
    assert len(pykka.ActorRegistry.get_all()) == baseline, pykka.ActorRegistry.get_all()
    eventually(lambda: non_daemon_threads() <= threads_before, 5, "actor threads gone")


def test_a_request_while_the_registry_is_down_is_denied_as_a_crash(
    gateway: Gateway, make_uplink
) -> None:
    uplink = make_uplink(gateway.url)
    gateway.frame(gateway.session(1), "identity")
    registry = uplink.context.directory.get("permissions")
    assert registry is not None
    registry.stop()  # dead, and (unlike a crash) nobody restarts it
    outcome = uplink.request_permission("Bash", {}).result(timeout=scaled(2))
    assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.CRASH)
