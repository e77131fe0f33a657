"""The original Rust module's tests, ported (reference/sled_uplink.rs.txt).

Pure ones drive the registry's logic and the router through real actors; the
two integration tests run the real uplink against a real WebSocket gateway.
"""

from __future__ import annotations

import concurrent.futures
import time

from actors import Uplink, UplinkConfig
from actors.permissions import PermissionBook
from protocol import Decision, Envelope, Reason, parse, serialize
from tests.conftest import scaled
from tests.support.gateway import Gateway


def _book() -> tuple[PermissionBook, list[tuple[int, Envelope]]]:
    sent: list[tuple[int, Envelope]] = []
    book = PermissionBook(timeout=60, max_pending=100, send=lambda s, e: sent.append((s, e)))
    book.open_session(1)
    return book, sent


def _submit(book: PermissionBook, request_id: str) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    book.submit(request_id, "Bash", {}, future)
    return future


def test_uplink_envelope_roundtrips_json() -> None:
    env = Envelope("perm_request", "req-1", {"tool_name": "Bash", "tool_input": {}})
    back = parse(serialize(env))
    assert back.type == "perm_request"
    assert back.req_id == "req-1"
    assert back.payload["tool_name"] == "Bash"


def test_resolve_perm_response_approve() -> None:
    book, _ = _book()
    future = _submit(book, "r1")
    book.respond(1, "r1", {"approved": True, "always_allow": False})
    assert not book.pending
    assert future.result(0).decision is Decision.APPROVE


def test_resolve_perm_response_deny() -> None:
    book, _ = _book()
    future = _submit(book, "r2")
    book.respond(1, "r2", {"approved": False})
    assert future.result(0).decision is Decision.DENY
    assert future.result(0).reason is Reason.GATEWAY


def test_resolve_perm_response_always_allow() -> None:
    book, _ = _book()
    future = _submit(book, "r3")
    book.respond(1, "r3", {"approved": True, "always_allow": True})
    assert future.result(0).decision is Decision.ALWAYS_ALLOW


def test_resolve_perm_response_unknown_req_id_is_noop() -> None:
    book, _ = _book()
    other = _submit(book, "known")
    assert book.respond(1, "missing", {"approved": True}) is None
    assert not other.done()
    assert list(book.pending) == ["known"]


def test_fail_close_all_denies_all_pending() -> None:
    book, _ = _book()
    a, b = _submit(book, "a"), _submit(book, "b")
    assert book.close_session(1) == 2
    assert not book.pending
    assert a.result(0).decision is Decision.DENY
    assert b.result(0).decision is Decision.DENY
    assert a.result(0).reason is Reason.SESSION_ENDED


def test_on_gateway_text_ignores_unknown_type(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    gateway.send(session, "future_type", "x", {})
    gateway.send_raw(session, "not-json")
    # The connection stays up and still works.
    gateway.auto = "approve"
    outcome = uplink.decide("Bash", {}, timeout=scaled(5))
    assert outcome.decision is Decision.APPROVE
    counters = uplink.status()["counters"]["frames_dropped"]
    assert counters == {"unknown_type": 1, "not_json": 1}
    assert len(gateway.sessions) == 1 and not session.closed


def test_spawn_uplink_task_noop_when_url_empty() -> None:
    uplink = Uplink(UplinkConfig(upstream_url="", project="test")).start()
    try:
        assert uplink.status()["connection"]["state"] == "disabled"
        outcome = uplink.decide("Bash", {}, timeout=1)
        assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.DISABLED)
    finally:
        uplink.stop()


def test_integration_perm_request_approved_via_uplink(gateway: Gateway, make_uplink) -> None:
    def approve(session, frame):  # the mock gateway of the original test
        assert session.frames[0]["type"] == "identity"
        assert session.frames[0]["payload"]["project"] == "test-proj"
        assert frame["payload"]["tool_name"] == "Bash"
        gateway.send_in_loop(
            session, "perm_response", frame["req_id"], {"approved": True, "always_allow": False}
        )

    gateway.auto = approve
    uplink = make_uplink(gateway.url)
    outcome = uplink.decide(
        "Bash", {"command": "echo hello"}, request_id="req-test-1", timeout=scaled(5)
    )
    assert outcome.decision is Decision.APPROVE
    assert outcome.request_id == "req-test-1"


def test_integration_reconnects_after_disconnect(gateway: Gateway, make_uplink) -> None:
    # backoff_initial 1 s as in the original; the second request must wait for it.
    uplink = make_uplink(gateway.url, backoff_initial=1.0, backoff_max=60.0)
    first = gateway.session(1)
    gateway.frame(first, "identity")

    def drop_then_approve(session, frame):
        if session.number == 1:
            session.ws.transport.abort()  # network failure: no reply, no close frame
        else:
            gateway.send_in_loop(session, "perm_response", frame["req_id"], {"approved": True})

    gateway.auto = drop_then_approve
    started = time.monotonic()
    d1 = uplink.decide("Bash", {}, request_id="req-drop", timeout=scaled(5))
    assert (d1.decision, d1.reason) == (Decision.DENY, Reason.SESSION_ENDED)
    assert time.monotonic() - started < scaled(2), "fail-close must be prompt"

    gateway.session(2, timeout=scaled(3))
    d2 = uplink.decide("Write", {}, request_id="req-reconnect", timeout=scaled(5))
    assert d2.decision is Decision.APPROVE
    assert len(gateway.sessions) == 2
