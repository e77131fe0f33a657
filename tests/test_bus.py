"""The bus contract, on the in-process bus. A network bus must pass the same tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sled_gateway.bus import Bus, Message, NoResponders, sled_subject
from sled_gateway.bus.local import LocalBus

pytestmark = pytest.mark.timeout(30)

BUSES: list[Callable[[], Bus]] = [LocalBus]


@pytest.fixture(params=BUSES, ids=lambda make: make.__name__)
def bus(request: pytest.FixtureRequest) -> Bus:
    made: Bus = request.param()
    return made


def test_publish_reaches_every_subscriber_of_the_subject(bus: Bus) -> None:
    got: list[tuple[str, Message]] = []
    stop_a = bus.subscribe("sled.p.events", lambda m: got.append(("a", m)))
    bus.subscribe("sled.p.events", lambda m: got.append(("b", m)))
    bus.subscribe("sled.q.events", lambda m: got.append(("q", m)))
    bus.publish("sled.p.events", {"n": 1})
    stop_a()
    bus.publish("sled.p.events", {"n": 2})
    bus.publish("nobody.listens", {"n": 3})
    assert got == [("a", {"n": 1}), ("b", {"n": 1}), ("b", {"n": 2})]


def test_a_failing_subscriber_does_not_stop_the_others(bus: Bus) -> None:
    got: list[Message] = []

    def broken(message: Message) -> None:
        raise RuntimeError("broken subscriber")

    bus.subscribe("s", broken)
    bus.subscribe("s", got.append)
    bus.publish("s", {"ok": True})
    assert got == [{"ok": True}]


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
        with pytest.raises(TimeoutError):
            await bus.request("slow", {}, 0.05)
        await asyncio.wait_for(cancelled.wait(), 1.0)  # the holder stops waiting too

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


def test_a_closed_bus_has_no_holders_and_no_subscribers(bus: Bus) -> None:
    heard: list[Message] = []
    bus.open()
    bus.subscribe("sled.p.events", heard.append)

    async def echo(message: Message) -> Message:
        return message

    bus.serve("sled.p.mcp", echo)
    bus.close()
    bus.publish("sled.p.events", {"n": 1})
    assert heard == []
    with pytest.raises(NoResponders):
        asyncio.run(bus.request("sled.p.mcp", {"n": 2}, timeout=1))
