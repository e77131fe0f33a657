"""What a connected sled costs the gateway in memory: the cuts that keep it small stay made.

Each test pins one cut measured in docs/benchmarks.md ("Replicas (issue 24)"): the
WebSocket protocol's lean queue and event (and their asyncio semantics, which
uvicorn relies on), the handshake's headers dropped once it is sent, and no
router or middleware frame kept by a sled's socket. They assert structure, never a
size or a speed.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect
from websockets.http11 import Request

from sled_gateway import Gateway
from sled_gateway.uvicorn_adapter import (
    LeanEvent,
    LeanQueue,
    LeanWebSocketProtocol,
    ReadsIntoOneBuffer,
)
from tests.conftest import scaled

pytestmark = pytest.mark.timeout(60)
T = scaled(5.0)


# -- LeanQueue and LeanEvent keep asyncio.Queue's and asyncio.Event's behaviour ----------


def test_lean_queue_is_fifo_and_wakes_a_waiting_getter() -> None:
    async def scenario() -> None:
        queue = LeanQueue()
        assert queue.empty()
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        queue.put_nowait("a")
        queue.put_nowait("b")
        assert await asyncio.wait_for(waiting, T) == "a"
        assert not queue.empty()
        assert await queue.get() == "b"
        assert queue.empty()

    asyncio.run(scenario())


def test_lean_queue_getter_cancelled_after_its_wake_up_passes_it_on() -> None:
    async def scenario() -> None:
        queue = LeanQueue()
        first = asyncio.create_task(queue.get())
        second = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait("only")  # wakes ``first``...
        first.cancel()  # ...which is cancelled before it runs: ``second`` must get it
        assert await asyncio.wait_for(second, T) == "only"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert queue.empty()

    asyncio.run(scenario())


def test_lean_queue_cancelled_getter_leaves_no_waiter_behind() -> None:
    async def scenario() -> None:
        queue = LeanQueue()
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        queue.put_nowait(1)
        assert await asyncio.wait_for(queue.get(), T) == 1

    asyncio.run(scenario())


def test_lean_event_wakes_every_waiter_and_clear_makes_them_wait_again() -> None:
    async def scenario() -> None:
        event = LeanEvent()
        assert not event.is_set()
        waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        event.set()
        assert await asyncio.wait_for(asyncio.gather(*waiters), T) == [True, True, True]
        assert await event.wait() is True  # set: no wait
        event.clear()
        later = asyncio.create_task(event.wait())
        await asyncio.sleep(0.01)
        assert not later.done()
        event.set()
        assert await asyncio.wait_for(later, T) is True

    asyncio.run(scenario())


# -- the gateway's sled sockets use them ---------------------------------------------------


def _sled_protocols() -> list[WebSocketsSansIOProtocol]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, WebSocketsSansIOProtocol)]


def test_a_connected_sled_holds_no_asyncio_queue_and_no_handshake_headers(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()

    async def scenario() -> list[Any]:
        async with connect(gw.url_for_sleds()) as ws:
            identity = {"type": "identity", "req_id": "identity", "payload": {"project": "lean"}}
            await ws.send(json.dumps(identity))
            await asyncio.to_thread(
                gw.wait_for,
                lambda s: any(x["project"] == "lean" for x in s["sleds"]),
                T,
            )
            found = _sled_protocols()
            seen = [
                (type(p), type(p.queue), type(p.writable), getattr(p, "response", None))
                for p in found
                if not p.disconnected
            ]
            # The request websockets' parser still holds has no headers left (the
            # client's own request, this side's, keeps its).
            left = [
                len(o.headers)
                for o in gc.get_objects()
                if isinstance(o, Request)
                and o is not ws.request
                and o.path.startswith("/api/sled-uplink")
            ]
            # Frames still flow both ways through the lean queue and event.
            beat = {"type": "heartbeat", "req_id": "", "payload": None}
            await ws.send(json.dumps(beat))
            return seen, left

    seen, left = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    assert seen, "no server-side WebSocket protocol found"
    assert left and not any(left), left
    for kind, queue, writable, response in seen:
        # The lean protocol, reading into the loop thread's one buffer (no buffer a sled).
        assert issubclass(kind, LeanWebSocketProtocol) and issubclass(kind, ReadsIntoOneBuffer)
        assert queue is LeanQueue and writable is LeanEvent
        assert response is None  # its headers went with the handshake


def _await_chain(coro: Any) -> list[str]:
    """``file:function`` of the coroutines ``coro`` awaits through, outermost first."""
    files = []
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None:
            files.append(f"{code.co_filename}:{code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return files


def test_a_sled_socket_is_served_past_the_router_and_its_middleware(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    """Each ASGI layer a sled's socket passes keeps a coroutine frame for as long as the
    socket lives: the guard hands it to the hub directly (after its checks)."""
    gw = make_reference_gateway()

    async def chains() -> list[list[str]]:
        return [_await_chain(task.get_coro()) for task in asyncio.all_tasks()]

    async def scenario() -> list[list[str]]:
        async with connect(gw.url_for_sleds()) as ws:
            identity = {"type": "identity", "req_id": "identity", "payload": {"project": "direct"}}
            await ws.send(json.dumps(identity))
            await asyncio.to_thread(
                gw.wait_for,
                lambda s: any(x["project"] == "direct" for x in s["sleds"]),
                T,
            )
            return await asyncio.wrap_future(gw.run_on_loop(chains()))

    found = asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    sled_chains = [c for c in found if any(f.endswith("sled_gateway/hub.py:uplink") for f in c)]
    assert sled_chains, found
    for chain in sled_chains:
        assert any("sled_gateway/http/guard.py:" in f for f in chain), chain
        layers = ("routing.py", "applications.py", "_exception_handler.py", "middleware/")
        assert not [f for f in chain if any(f"/starlette/{x}" in f for x in layers)], chain
