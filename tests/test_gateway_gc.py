"""The gateway's collector policy (sled_gateway/memory.py) still frees what sleds leave.

Freezing the fleet's objects keeps the collector's passes short, but a frozen object
is never collected: the cyclic garbage a session leaves when it ends would stay. These
tests connect a real fleet to a real gateway, let it leave, and count the objects the
collector tracks (frozen ones included) against the count before the fleet came.

And a sled's connect costs the same with thousands of sleds connected: the HTTP
guard's caps (actors/http_guard.py) look through the connections still speaking
HTTP, not through every sled's WebSocket.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import gc
import json
import logging
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from sled_gateway import Gateway
from sled_gateway.events import SledDown, SledUp
from sled_gateway.memory import THRESHOLDS, FleetFreezer, tune_collector

FLEET = 1000


def tracked() -> int:
    """Every object the collector tracks, the frozen ones too (get_objects skips those),
    but not the log records pytest's own capture keeps for the report (the gateway logs
    each sled's arrival and departure)."""
    from _pytest.logging import LogCaptureHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogCaptureHandler):
            handler.reset()
    gc.collect()
    return len(gc.get_objects()) + gc.get_freeze_count()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture
def collector() -> Iterator[None]:
    """The policy is process-wide: give pytest's process its collector back after."""
    thresholds = gc.get_threshold()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * FLEET:  # each sled is two sockets here: the client's and the gateway's
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * FLEET), hard))
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _connect(
    gw: Gateway, names: range, conns: list[ClientConnection], freezer: FleetFreezer | None = None
) -> None:
    """Connect and identify a sled for each name (ticking the freezer as run_gateway.py
    does) until the gateway counts them all connected."""
    gate = asyncio.Semaphore(16)  # under the gateway's 32 handshakes per client address
    expected = gw.state()["counts"]["connected"] + len(names)

    async def one(i: int) -> None:
        async with gate:
            ws = await connect(gw.url_for_sleds(), compression=None)
            identity = {"type": "identity", "req_id": "identity", "payload": {"project": f"f{i}"}}
            await ws.send(json.dumps(identity))
            conns.append(ws)

    tasks = [asyncio.create_task(one(i)) for i in names]
    while not all(t.done() for t in tasks) or gw.state()["counts"]["connected"] < expected:
        if freezer is not None:
            freezer.tick()
        for failed in (t for t in tasks if t.done() and t.exception() is not None):
            raise AssertionError("a sled could not connect") from failed.exception()
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)


async def _fleet(gw: Gateway, freezer: FleetFreezer, peak: dict[str, float]) -> None:
    """Connect and identify FLEET sleds, then close them all."""
    conns: list[ClientConnection] = []
    await _connect(gw, range(FLEET), conns, freezer)
    freezer.tick()
    peak["objects"], peak["rss"] = tracked(), rss_mib()
    await asyncio.gather(*(ws.close() for ws in conns))
    conns.clear()
    while gw.state()["counts"]["connected"] > 0:
        await asyncio.sleep(0.1)
    # The HTTP guard lets go of the closed WebSockets' transports on its next sweep
    # (every second while any is listed).
    await asyncio.sleep(2.5)


@pytest.mark.slow  # a real fleet, 10-25 s: in CI's second pass
def test_a_fleet_that_connects_and_leaves_is_freed_after_the_thaw(collector: None) -> None:
    freezer = FleetFreezer()
    gw = Gateway(token="t", max_connections=FLEET + 16)
    gw.events.subscribe(SledUp, freezer.sled_up)
    gw.events.subscribe(SledDown, freezer.sled_down)
    with gw:
        tune_collector()
        assert gc.get_threshold() == THRESHOLDS and gc.get_freeze_count() > 0
        gc.collect()
        base_objects, base_rss = tracked(), rss_mib()
        peak: dict[str, float] = {}
        asyncio.run(_fleet(gw, freezer, peak))
        assert freezer.freezes >= 5, "the fleet's objects were frozen as it grew"
        grown = peak["objects"] - base_objects
        # What the sleds left, once collected without a thaw: the cycles among frozen
        # objects are still there (this is the leak a freeze alone would be).
        gc.collect()
        frozen_left = tracked() - base_objects
        assert freezer.live == 0 and freezer.left == FLEET
        assert freezer.tick() == "thaw"
        gc.collect()
        after_objects, after_rss = tracked(), rss_mib()
        # The same fleet again: the memory the first one freed is used again, so the
        # process does not grow by another fleet (the allocator keeps its arenas, so
        # RSS does not drop back by itself).
        again: dict[str, float] = {}
        asyncio.run(_fleet(gw, freezer, again))
        assert freezer.tick() == "thaw"
        gc.collect()
        second_objects, second_rss = tracked(), rss_mib()
    report = (
        f"objects {base_objects} -> {peak['objects']:.0f} with {FLEET} sleds -> "
        f"{base_objects + frozen_left} after they left (frozen) -> {after_objects} after "
        f"the thaw -> {second_objects} after a second fleet; RSS {base_rss:.1f} -> "
        f"{peak['rss']:.1f} -> {after_rss:.1f} -> {again['rss']:.1f} (second fleet) -> "
        f"{second_rss:.1f} MiB"
    )
    print(report)
    assert grown > 50 * FLEET, report  # the fleet was there: tens of objects per sled
    assert frozen_left > 0.2 * grown, report  # without the thaw, much of it would stay
    # After the thaw, what is left is the disconnected sleds' records and caches: a
    # generous bound of a tenth of what the fleet held.
    assert after_objects - base_objects < 0.1 * grown, report
    assert second_objects - base_objects < 0.1 * grown, report
    assert second_rss - after_rss < 0.5 * (peak["rss"] - base_rss), report


@pytest.mark.slow  # a real fleet, 10-25 s: in CI's second pass
def test_a_connect_does_not_look_through_every_connected_sled(
    collector: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new connection used to sweep every open transport (and every WebSocket for the
    per-client cap): 5,000 connects made 12.5 million looks, seconds of the fleet's
    connect time. The looks are counted at the transports' ``is_closing``."""
    looks = 0
    # The base of asyncio's socket transports (private, hence getattr: typeshed omits it).
    transport_class: Any = getattr(asyncio.selector_events, "_SelectorTransport")  # noqa: B009
    is_closing = transport_class.is_closing

    def counted(transport: asyncio.BaseTransport) -> bool:
        nonlocal looks
        looks += 1
        return bool(is_closing(transport))

    monkeypatch.setattr(transport_class, "is_closing", counted)

    async def run(gw: Gateway) -> tuple[int, int]:
        nonlocal looks
        conns: list[ClientConnection] = []
        await _connect(gw, range(FLEET), conns)
        looks = 0
        await _connect(gw, range(FLEET, FLEET + 100), conns)
        per_connect = looks / 100
        await asyncio.gather(*(ws.close() for ws in conns))
        return FLEET, int(per_connect)

    with Gateway(token="t", max_connections=2 * FLEET) as gw:
        connected, per_connect = asyncio.run(run(gw))
    print(f"{per_connect} looks a connect with {connected} sleds connected")
    # A few looks belong to the connection's own I/O; before, each connect looked at all
    # of the ~1,000 transports open, twice.
    assert per_connect < 50, f"{per_connect} looks a connect with {connected} sleds connected"


class _Cycle:
    """A stand-in for what a session may leave: objects that only a collection frees."""

    def __init__(self) -> None:
        self.me = self
        self.payload: list[list[int]] = [[] for _ in range(100)]


def test_cyclic_garbage_frozen_by_the_fleets_ticks_is_freed_by_the_timed_thaw(
    collector: None,
) -> None:
    """With a fleet, every tick freezes the young pass's survivors; a cycle alive then and
    garbage later stays frozen until a thaw, which comes on time even if no sled leaves."""
    now = [0.0]
    freezer = FleetFreezer(min_sleds=1, thaw_every=600.0, clock=lambda: now[0])
    freezer.sled_up(None)
    assert freezer.tick() == "freeze"
    gc.collect()
    base = tracked()
    held = [_Cycle() for _ in range(1000)]
    assert freezer.tick() == "young"  # they are alive: frozen with the rest
    del held
    gc.collect()  # a full pass does not see frozen objects
    frozen_garbage = tracked() - base
    assert frozen_garbage > 50_000, frozen_garbage
    now[0] = 599.0
    assert freezer.tick() == "young"
    now[0] = 600.0
    assert freezer.tick() == "thaw"
    assert tracked() - base < 0.05 * frozen_garbage, (tracked() - base, frozen_garbage)


@pytest.mark.slow  # a real fleet, 10-25 s: in CI's second pass
def test_the_sockets_of_a_fleet_that_left_are_let_go(collector: None) -> None:
    """A sled's transport is listed by the HTTP guard (it counts toward the cap) and its
    end is seen by the WebSocket protocol only: without a sweep of its own, a fleet that
    left stayed in the list, sockets and all, until new connections came."""
    transport_class: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport")  # noqa: B009

    def transports() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is transport_class)

    gw = Gateway(token="t", max_connections=FLEET + 16)
    with gw:
        before = transports()
        asyncio.run(_fleet(gw, FleetFreezer(), {}))
        left = transports() - before
    assert left < FLEET // 20, f"{left} transports of {FLEET} sleds that left are still held"
