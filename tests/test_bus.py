"""The bus contract, on the in-process bus and on NATS (a real nats-server): the same tests.

Delivery on a network bus is asynchronous, so a test waits for what it
expects (:func:`settle`), and checks that nothing else came by sending a last
message on a subject the same subscriber hears: one connection's messages
arrive in order. Then the NATS-only checks: subjects escaped at the edge, two
replicas on one server, NATS stopped and restarted.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from sled_gateway.bus import NOT_SENT, Bus, Message, NoResponders, escape_token, sled_subject
from sled_gateway.bus.local import LocalBus
from tests.support import nats as nats_support
from tests.support.nats import NatsServer

if TYPE_CHECKING:
    from sled_gateway.bus.nats import NatsBus

pytestmark = pytest.mark.timeout(30)


def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the bus did not deliver in time"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with nats_support.running_server() as server:
        yield server


@pytest.fixture
def own_nats_server() -> Iterator[NatsServer]:
    """A server of the test's own, which it may stop and start again."""
    with nats_support.running_server() as server:
        yield server


def nats_bus(url: str) -> NatsBus:
    # Imported here: nats-py is the optional `cluster` extra; without it these tests skip.
    from sled_gateway.bus.nats import NatsBus

    return NatsBus(url, reconnect_wait=0.1)


@pytest.fixture(params=["local", "nats"])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    made: Bus
    if request.param == "local":
        made = LocalBus()
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        made = nats_bus(server.url)
        made.open()
    yield made
    made.close()


def test_publish_reaches_every_subscriber_of_the_subject(bus: Bus) -> None:
    got: list[tuple[str, Message]] = []
    stop_a = bus.subscribe("sled.p.events", lambda m: got.append(("a", m)))
    bus.subscribe("sled.p.events", lambda m: got.append(("b", m)))
    bus.subscribe("sled.q.events", lambda m: got.append(("q", m)))
    bus.subscribe("sled.p.end", lambda m: got.append(("end", m)))
    bus.publish("sled.p.events", {"n": 1})
    settle(lambda: len(got) == 2)
    stop_a()
    bus.publish("sled.p.events", {"n": 2})
    bus.publish("nobody.listens", {"n": 3})
    bus.publish("sled.p.end", {})
    settle(lambda: ("end", {}) in got)
    assert sorted(got[:2], key=str) == [("a", {"n": 1}), ("b", {"n": 1})]
    assert got[2:] == [("b", {"n": 2}), ("end", {})]


def test_messages_arrive_in_the_order_they_were_published(bus: Bus) -> None:
    got: list[int] = []
    bus.subscribe("s.order", lambda m: got.append(m["n"]))
    for n in range(500):
        bus.publish("s.order", {"n": n})
    settle(lambda: len(got) == 500)
    assert got == list(range(500))


def test_a_failing_subscriber_does_not_stop_the_others(bus: Bus) -> None:
    got: list[Message] = []

    def broken(message: Message) -> None:
        raise RuntimeError("broken subscriber")

    bus.subscribe("s", broken)
    bus.subscribe("s", got.append)
    bus.publish("s", {"ok": True})
    settle(lambda: bool(got))
    bus.publish("s", {"ok": 2})
    settle(lambda: len(got) == 2)
    assert got == [{"ok": True}, {"ok": 2}]


def test_handlers_run_on_the_loop_that_subscribed(bus: Bus) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        heard = asyncio.Event()
        seen: list[bool] = []

        def handler(message: Message) -> None:
            seen.append(asyncio.get_running_loop() is loop)
            heard.set()

        bus.subscribe("s.loop", handler)
        bus.publish("s.loop", {})
        await asyncio.wait_for(heard.wait(), 5)
        assert seen == [True]

    asyncio.run(scenario())


def test_request_reaches_the_holder_and_returns_its_reply(bus: Bus) -> None:
    async def scenario() -> None:
        async def echo(message: Message) -> Message:
            return {"echo": message["body"]}

        stop = bus.serve(sled_subject("p", "mcp"), echo)
        reply = await bus.request(sled_subject("p", "mcp"), {"body": "hi"}, 1.0)
        assert reply == {"echo": "hi"}
        stop()
        with pytest.raises(NoResponders):
            await bus.request(sled_subject("p", "mcp"), {"body": "hi"}, 1.0)

    asyncio.run(scenario())


def test_no_holder_is_an_error(bus: Bus) -> None:
    with pytest.raises(NoResponders):
        asyncio.run(bus.request("sled.nobody.mcp", {}, 1.0))


def test_a_request_times_out(bus: Bus) -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def silent(message: Message) -> Message:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {}

        bus.serve("slow", silent)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await bus.request("slow", {}, 0.2)
        assert time.monotonic() - started < 1.0
        await asyncio.wait_for(cancelled.wait(), 2.0)  # the holder stops waiting too

    asyncio.run(scenario())


def test_the_newest_holder_wins_and_the_old_one_cannot_unserve_it(bus: Bus) -> None:
    async def scenario() -> None:
        async def old(message: Message) -> Message:
            return {"from": "old"}

        async def new(message: Message) -> Message:
            return {"from": "new"}

        stop_old = bus.serve("sled.p.mcp", old)
        bus.serve("sled.p.mcp", new)
        stop_old()  # the replaced session ends after its successor took over
        assert await bus.request("sled.p.mcp", {}, 1.0) == {"from": "new"}

    asyncio.run(scenario())


PROJECTS = ["a.b", "a", "b.c", "*", ">", "a b", "", "-", "-2D", "é", "x.*", "x.>", "y.*", "y.-2A"]


def test_project_names_are_escaped_into_distinct_safe_tokens() -> None:
    tokens = [escape_token(p) for p in PROJECTS]
    assert len(set(tokens)) == len(PROJECTS)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", t) for t in tokens)
    assert sled_subject("a.b", "mcp") != sled_subject("a", "b.mcp")


def test_every_project_reaches_its_own_holder_only(bus: Bus) -> None:
    """Dots, spaces, ``*`` and ``>`` in a project: on NATS unescaped they would split the
    subject or match other sleds' requests."""

    async def scenario() -> None:
        calls: list[str] = []

        def holder(project: str) -> Callable[[Message], asyncio.Future[Message]]:
            async def answer(message: Message) -> Message:
                calls.append(project)
                return {"project": project}

            return answer  # type: ignore[return-value]

        for project in PROJECTS:
            bus.serve(sled_subject(project, "mcp"), holder(project))
        await asyncio.sleep(0.3 if asker is not bus else 0)  # the SUBs reach the server
        for project in PROJECTS:
            reply = await asker.request(sled_subject(project, "mcp"), {}, 2.0)
            assert reply == {"project": project}
        assert calls == PROJECTS  # one call each: no wildcard holder heard another's
        with pytest.raises(NoResponders):
            await asker.request(sled_subject("a.b.c", "mcp"), {}, 1.0)

    # On NATS the requests come from another replica: a holder's own requests skip NATS.
    asker = bus if isinstance(bus, LocalBus) else nats_bus(bus.url)  # type: ignore[attr-defined]
    asker.open()
    try:
        asyncio.run(scenario())
    finally:
        if asker is not bus:
            asker.close()


def test_on_reconnect_returns_its_removal(bus: Bus) -> None:
    called: list[int] = []
    remove = bus.on_reconnect(lambda: called.append(1))
    remove()
    remove()  # idempotent
    assert called == []


def test_a_closed_bus_has_no_holders_and_no_subscribers(bus: Bus) -> None:
    heard: list[Message] = []
    bus.open()
    bus.subscribe("sled.p.events", heard.append)

    async def echo(message: Message) -> Message:
        return message

    bus.serve("sled.p.mcp", echo)
    bus.close()
    bus.publish("sled.p.events", {"n": 1})
    time.sleep(0.05)
    assert heard == []
    with pytest.raises(NoResponders):
        asyncio.run(bus.request("sled.p.mcp", {"n": 2}, timeout=1))


# -- NATS only: replicas, and NATS going away ---------------------------------------------


def test_a_request_on_one_replica_reaches_the_holder_on_another(nats_server: NatsServer) -> None:
    a, b = nats_bus(nats_server.url), nats_bus(nats_server.url)
    a.open()
    b.open()
    try:

        async def scenario() -> None:
            async def holder(message: Message) -> Message:
                return {"held_by": "a", "body": message["body"]}

            a.serve(sled_subject("web.app", "mcp"), holder)
            await asyncio.sleep(0.2)  # a's SUB reaches the server before b asks
            reply = await b.request(sled_subject("web.app", "mcp"), {"body": "x"}, 2.0)
            assert reply == {"held_by": "a", "body": "x"}
            heard: list[Message] = []
            b.subscribe("console.updates", heard.append)
            await asyncio.sleep(0.2)
            a.publish("console.updates", {"n": 1})
            await asyncio.to_thread(settle, lambda: heard == [{"n": 1}])

        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


async def _burst_across(
    asker: NatsBus, subject: str, stop: Callable[[], object], requests: int = 40
) -> Counter[str]:
    """``requests`` requests from ``asker``, 0.2 ms apart, with ``stop()`` 4 ms into them:
    what each got (a reply, its error word, no holder, or nothing within its timeout)."""
    outcomes: Counter[str] = Counter()

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            reply = await asyncio.wait_for(asker.request(subject, {"body": "x"}, 1.0), 3.0)
        except NoResponders:
            outcomes["no holder"] += 1
        except TimeoutError:
            outcomes["unanswered"] += 1
        else:
            outcomes[str(reply.get("error", "answered"))] += 1

    asking = [asyncio.create_task(one(i * 0.0002)) for i in range(requests)]
    await asyncio.sleep(0.004)
    await asyncio.to_thread(stop)
    await asyncio.gather(*asking)
    return outcomes


async def _echo(message: Message) -> Message:
    return {"echo": message["body"]}


def _assert_each_answered_or_unheld(outcomes: Counter[str]) -> None:
    assert outcomes["unanswered"] == 0, outcomes
    assert set(outcomes) <= {"answered", NOT_SENT, "no holder"}, outcomes


def test_a_request_routed_to_a_holder_as_it_stops_is_answered_not_dropped(
    nats_server: NatsServer,
) -> None:
    """The server routes a request to the old holder until it has read its UNSUB. nats-py
    forgets a subscription the moment it is unsubscribed and drops what arrives for it
    after: its requester heard nothing until its timeout (an MCP relay's 504 while its
    sled moved between replicas). Each must be answered, or find no holder."""
    a, b = nats_bus(nats_server.url), nats_bus(nats_server.url)
    a.open()
    b.open()
    try:

        async def scenario() -> Counter[str]:
            total: Counter[str] = Counter()
            for _ in range(10):
                stop = a.serve("sled.moving.mcp", _echo)
                await asyncio.sleep(0.05)
                total += await _burst_across(b, "sled.moving.mcp", stop)
            return total

        outcomes = asyncio.run(scenario())
        _assert_each_answered_or_unheld(outcomes)
        assert outcomes["answered"] and outcomes["no holder"], outcomes  # the burst spanned it
    finally:
        a.close()
        b.close()


def test_a_request_routed_to_a_bus_as_it_closes_is_answered_not_dropped(
    nats_server: NatsServer,
) -> None:
    """The same at a replica's exit: its bus closes while requests still reach it."""
    b = nats_bus(nats_server.url)
    b.open()
    try:

        async def scenario() -> Counter[str]:
            total: Counter[str] = Counter()
            for _ in range(5):
                a = nats_bus(nats_server.url)
                a.open()
                try:
                    a.serve("sled.leaving.mcp", _echo)
                    await asyncio.sleep(0.05)
                    total += await _burst_across(b, "sled.leaving.mcp", a.close)
                finally:
                    a.close()
            return total

        outcomes = asyncio.run(scenario())
        _assert_each_answered_or_unheld(outcomes)
    finally:
        b.close()


async def _defer(_message: Message) -> None:
    return None


def test_a_holder_that_defers_sends_no_reply(nats_server: NatsServer) -> None:
    """A responder's None is no reply: on NATS the requester hears the other holder (a
    sled's new replica), from another replica or from the deferring one itself; on one
    process nobody else holds the subject."""
    one = LocalBus()
    one.serve("sled.moved.mcp", _defer)
    with pytest.raises(NoResponders):
        asyncio.run(one.request("sled.moved.mcp", {"body": "x"}, 1.0))

    old, new, asker = (nats_bus(nats_server.url) for _ in range(3))
    for made in (old, new, asker):
        made.open()
    try:

        async def scenario() -> list[Message]:
            async def slow_echo(message: Message) -> Message:
                await asyncio.sleep(0.05)  # any reply from the old holder would come first
                return {"echo": message["body"], "from": "new"}

            old.serve("sled.moved.mcp", _defer)
            new.serve("sled.moved.mcp", slow_echo)
            await asyncio.sleep(0.1)
            return [
                await made.request("sled.moved.mcp", {"body": "x"}, 2.0) for made in (asker, old)
            ]

        assert asyncio.run(scenario()) == [{"echo": "x", "from": "new"}] * 2
    finally:
        for made in (old, new, asker):
            made.close()


def test_a_holder_stopped_quietly_leaves_what_is_still_routed_to_it_to_the_other(
    nats_server: NatsServer,
) -> None:
    """A holder whose sled has moved to another replica stops quietly: the requests NATS
    still routes to it until it reads the UNSUB get no "not sent" from it, which would
    beat the new holder's real answer and invite a retry that runs the call twice."""
    old, new, asker = (nats_bus(nats_server.url) for _ in range(3))
    for made in (old, new, asker):
        made.open()
    try:

        async def answer_later(message: Message) -> Message:
            await asyncio.sleep(0.02)
            return await _echo(message)

        async def scenario() -> Counter[str]:
            total: Counter[str] = Counter()
            new.serve("sled.moved.mcp", answer_later)
            for _ in range(10):
                stop = old.serve("sled.moved.mcp", _echo)
                await asyncio.sleep(0.05)
                quiet_stop = functools.partial(stop, quiet=True)
                total += await _burst_across(asker, "sled.moved.mcp", quiet_stop)
            return total

        outcomes = asyncio.run(scenario())
        assert set(outcomes) == {"answered"}, outcomes
    finally:
        for made in (old, new, asker):
            made.close()


def test_a_holder_whose_loop_has_ended_holds_nothing(nats_server: NatsServer) -> None:
    """On one process everything runs on one loop; a NATS bus hands requests to the loop
    that served, which may have ended (a stopped gateway) while the bus still runs."""
    a, b = nats_bus(nats_server.url), nats_bus(nats_server.url)
    a.open()
    b.open()
    try:

        async def serve_and_end() -> None:
            async def echo(message: Message) -> Message:
                return message

            a.serve("sled.gone.mcp", echo)
            a.serve("sled.gone2.mcp", echo)
            await asyncio.sleep(0.2)

        asyncio.run(serve_and_end())  # the loop that served them is closed now

        async def ask() -> None:
            with pytest.raises((NoResponders, TimeoutError)):
                await b.request("sled.gone.mcp", {}, 0.5)
            with pytest.raises(NoResponders):
                await b.request("sled.gone.mcp", {}, 0.5)
            with pytest.raises(NoResponders):  # its own replica asks NATS, where nobody is
                await a.request("sled.gone2.mcp", {}, 0.5)

        asyncio.run(ask())
    finally:
        a.close()
        b.close()


def test_a_request_in_flight_when_its_bus_closes_fails_at_once(nats_server: NatsServer) -> None:
    a, b = nats_bus(nats_server.url), nats_bus(nats_server.url)
    a.open()
    b.open()
    try:

        async def scenario() -> None:
            async def slow(message: Message) -> Message:
                await asyncio.sleep(3600)
                return {}

            a.serve("sled.slow.mcp", slow)
            await asyncio.sleep(0.2)
            asking = asyncio.create_task(b.request("sled.slow.mcp", {}, 10.0))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await asyncio.to_thread(b.close)
            with pytest.raises(NoResponders):
                await asyncio.wait_for(asking, 2.0)
            assert time.monotonic() - started < 2.0

        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


def test_nats_down_fails_requests_fast_and_publish_does_not_block_then_it_recovers(
    own_nats_server: NatsServer,
) -> None:
    """Replica ``a`` holds the sled, ``b`` relays to it; then NATS stops and comes back."""
    a, b = nats_bus(own_nats_server.url), nats_bus(own_nats_server.url)
    a.open()
    b.open()
    try:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            reconnected = asyncio.Event()
            b.on_reconnect(reconnected.set)
            heard: list[Message] = []
            b.subscribe("sled.p.events", heard.append)

            async def holder(message: Message) -> Message:
                return {"ok": True}

            a.serve(sled_subject("p", "mcp"), holder)
            await asyncio.sleep(0.2)
            assert await b.request(sled_subject("p", "mcp"), {}, 2.0) == {"ok": True}

            own_nats_server.stop()
            await asyncio.to_thread(settle, lambda: not b.connected)
            started = time.monotonic()
            with pytest.raises((NoResponders, TimeoutError)):
                await b.request(sled_subject("p", "mcp"), {}, 1.0)
            assert time.monotonic() - started < 1.0
            # The holder's own replica still reaches its sled: no NATS on that path.
            assert await a.request(sled_subject("p", "mcp"), {}, 1.0) == {"ok": True}
            started = time.monotonic()
            for n in range(100):
                b.publish("sled.p.lost", {"n": n})
            assert time.monotonic() - started < 0.1
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = loop.create_task(tick())
            await asyncio.sleep(0.3)
            assert ticks >= 10  # the loop kept running while NATS was away

            own_nats_server.start()
            await asyncio.wait_for(reconnected.wait(), 10)
            ticker.cancel()
            # nats-py resubscribed: the subscription and the holder made before work again.
            await asyncio.to_thread(settle, lambda: a.connected)
            await asyncio.sleep(0.2)
            a.publish("sled.p.events", {"after": True})
            await asyncio.to_thread(settle, lambda: heard == [{"after": True}])
            assert await b.request(sled_subject("p", "mcp"), {}, 2.0) == {"ok": True}

        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


def test_nats_unreachable_at_open_is_an_error() -> None:
    nats_support.require()
    from sled_gateway.bus.nats import NatsBus

    bus = NatsBus(f"nats://127.0.0.1:{nats_support.free_port()}", connect_timeout=1)
    with pytest.raises(Exception):  # noqa: B017,PT011 (nats-py's own connection error)
        bus.open()
    with pytest.raises(NoResponders):
        asyncio.run(bus.request("s", {}, 1))


def test_a_password_in_the_nats_url_is_never_shown() -> None:
    from protocol import ConfigError
    from sled_gateway.config import GatewayConfig

    config = GatewayConfig(bus="nats://gw:hunter2@10.0.0.5:4222,nats://gw:hunter2@10.0.0.6:4222")
    assert "hunter2" not in repr(config)
    assert "nats://***@10.0.0.5:4222" in repr(config)
    with pytest.raises(ConfigError) as refused:
        GatewayConfig(bus="http://gw:hunter2@10.0.0.5:4222")
    assert "hunter2" not in str(refused.value)


def test_a_silent_path_to_nats_is_noticed_by_the_pings_and_left_for_a_new_connection(
    own_nats_server: NatsServer,
) -> None:
    """A partition that drops packets keeps the socket open and TCP quiet: without pings
    the bus would call itself connected for minutes, publishing into the void while the
    replicas trust the rings. With the bus's pings it is disconnected within a few of
    them, and once the path heals it reconnects and delivers again."""
    from sled_gateway.bus.nats import PING_INTERVAL, NatsBus
    from tests.support.relay import FreezableRelay

    # Noticed within about three intervals: no longer than a replica's full read.
    assert PING_INTERVAL * 3 <= 30
    with FreezableRelay(own_nats_server.port) as relay:
        bus = NatsBus(f"nats://127.0.0.1:{relay.port}", reconnect_wait=0.1, ping_interval=0.3)
        bus.open()
        try:
            heard: list[Message] = []
            bus.subscribe("sled.p.events", heard.append)
            bus.publish("sled.p.events", {"n": 1})
            settle(lambda: heard == [{"n": 1}])
            relay.freeze()
            frozen_at = time.monotonic()
            while bus.connected and time.monotonic() - frozen_at < 10:
                time.sleep(0.05)
            noticed = time.monotonic() - frozen_at
            assert noticed < 5, f"still connected {noticed:.1f} s into a silent partition"
            relay.heal()
            settle(lambda: bus.connected, timeout=10)
            bus.publish("sled.p.events", {"n": 2})
            settle(lambda: {"n": 2} in heard, timeout=10)
        finally:
            bus.close()
            # The closed loop's leftovers are finalised here, not while pytest parses
            # this file to show a failure (CPython 3.11 then raises a SystemError).
            gc.collect()
