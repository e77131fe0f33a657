"""Extending the uplink: a new envelope kind is one actor class plus one registration.

The test-only actor below handles a kind the product has never heard of. It
is registered through ``Uplink(handlers=...)`` and receives its frames, with
session numbers, and can answer on the session, with no other change.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, ClassVar

import pykka

from actors import (
    EnvelopeIn,
    SessionClosed,
    SessionOpened,
    Uplink,
    UplinkActor,
    UplinkConfig,
    UplinkLoopActor,
    handles,
)
from actors.messages import Submit
from actors.permissions import PermissionRegistryActor
from protocol import Decision, Envelope, Reason
from tests.conftest import FAST, scaled
from tests.support.gateway import Gateway

received: queue.Queue[Any] = queue.Queue()


class PingKindActor(UplinkActor):
    """Answers every ``test_ping`` frame with a ``test_pong`` on the same session."""

    role = "test_ping"

    @handles(EnvelopeIn)
    def _on_ping(self, message: EnvelopeIn) -> None:
        received.put(message)
        reply = Envelope("test_pong", message.envelope.req_id, {"seen": message.envelope.payload})
        message.sink.send(reply)  # the one way out: the session the frame came on

    @handles(SessionOpened, SessionClosed)
    def _on_session(self, message: Any) -> None:
        received.put(message)
        self.set_state("open" if isinstance(message, SessionOpened) else "closed")


def test_a_registered_actor_receives_its_kind_and_can_answer(gateway: Gateway) -> None:
    uplink = Uplink(
        UplinkConfig(upstream_url=gateway.url, project="ext", **FAST),
        handlers={"test_ping": PingKindActor},
    ).start()
    try:
        session = gateway.session(1)
        gateway.frame(session, "identity")
        opened = received.get(timeout=scaled(5))
        assert isinstance(opened, SessionOpened) and opened.session == 1
        gateway.send(session, "test_ping", "p-1", {"n": 1})
        message = received.get(timeout=scaled(5))
        assert isinstance(message, EnvelopeIn)
        assert message.session == 1
        assert message.envelope == Envelope("test_ping", "p-1", {"n": 1})
        pong = gateway.frame(session, "test_pong")
        assert pong == {"type": "test_pong", "req_id": "p-1", "payload": {"seen": {"n": 1}}}
        status = uplink.status()
        assert status["router"]["routes"]["test_ping"] == "test_ping"
        assert status["test_ping"]["state"] == "open"
        assert "unknown_type" not in status["counters"].get("frames_dropped", {})
    finally:
        uplink.stop()
    assert isinstance(received.get(timeout=scaled(5)), SessionClosed)


def test_without_registration_the_same_kind_is_dropped(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    gateway.send(session, "test_ping", "p-1", {"n": 1})
    gateway.wait_until(
        lambda: uplink.status()["counters"].get("frames_dropped", {}).get("unknown_type") == 1
    )
    assert not session.of_type("test_pong")


class EchoLoopActor(UplinkLoopActor):
    """A loop-scheduled extension: answers ``test_echo`` from the event loop."""

    role = "test_echo"
    threads: ClassVar[queue.Queue[int]] = queue.Queue()

    @handles(EnvelopeIn)
    def _on_echo(self, message: EnvelopeIn) -> None:
        self.threads.put(threading.get_ident())
        assert message.sink is not None
        message.sink.send(
            Envelope("test_echoed", message.envelope.req_id, message.envelope.payload)
        )


def test_a_loop_actor_extension_runs_in_the_event_loop_and_answers(gateway: Gateway) -> None:
    uplink = Uplink(
        UplinkConfig(upstream_url=gateway.url, project="ext", **FAST),
        handlers={"test_echo": EchoLoopActor},
    ).start()
    try:
        session = gateway.session(1)
        gateway.frame(session, "identity")
        for i in range(3):
            gateway.send(session, "test_echo", f"e-{i}", {"n": i})
        for i in range(3):
            echoed = gateway.frame(session, "test_echoed", i)
            assert echoed == {"type": "test_echoed", "req_id": f"e-{i}", "payload": {"n": i}}
        assert EchoLoopActor.threads.get(timeout=scaled(5)) == uplink.context.loop.thread_id
    finally:
        uplink.stop()


class MyRegistry(PermissionRegistryActor):
    """A replacement registry: the handler table names it for perm_response."""

    role = "my_registry"
    submitted: ClassVar[queue.Queue[str]] = queue.Queue()

    @handles(Submit)
    def _on_my_submit(self, message: Submit) -> None:
        self.submitted.put(message.request_id)
        self._on_submit(message)


def test_a_replaced_handler_is_the_only_one_running(gateway: Gateway) -> None:
    """``handlers={"perm_response": MyRegistry}`` replaces the default registry:
    requests go to MyRegistry, and no default registry runs beside it."""
    gateway.auto = "approve"
    uplink = Uplink(
        UplinkConfig(upstream_url=gateway.url, project="ext", **FAST),
        handlers={"perm_response": MyRegistry},
    ).start()
    try:
        gateway.frame(gateway.session(1), "identity")
        assert uplink.wait_connected(scaled(5))
        running = [ref.actor_class for ref in pykka.ActorRegistry.get_all()]
        assert running.count(MyRegistry) == 1
        assert PermissionRegistryActor not in running
        outcome = uplink.decide("Bash", {}, request_id="mine", timeout=scaled(5))
        assert (outcome.decision, outcome.reason) == (Decision.APPROVE, Reason.GATEWAY)
        assert MyRegistry.submitted.get(timeout=scaled(5)) == "mine"
        assert uplink.status()["my_registry"]["decided"] == 1
        assert uplink.status()["router"]["routes"]["perm_response"] == "my_registry"
    finally:
        uplink.stop()
