"""Extending the uplink: a new envelope kind is one actor class plus one registration.

The test-only actor below handles a kind the product has never heard of. It
is registered through ``Uplink(handlers=...)`` and receives its frames, with
session numbers, and can answer on the session, with no other change.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, ClassVar

from actors import (
    EnvelopeIn,
    SendFrame,
    SessionClosed,
    SessionOpened,
    Uplink,
    UplinkActor,
    UplinkConfig,
    UplinkLoopActor,
    handles,
)
from protocol import Envelope
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
        self.ctx.directory.tell("connection", SendFrame(message.session, reply))

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
