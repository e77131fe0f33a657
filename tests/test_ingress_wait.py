"""The ingress's wait for a decision while its caller may hang up (``_unless_gone``).

A caller waiting on ``POST /permission`` or ``/hooks/claude-code`` is either
answered or, if it hangs up first, abandoned: exactly one of the two, decided
by whichever happens first. These tests drive the wait with an ASGI
``receive`` of their own (a queue: what uvicorn hands the app) and real
asyncio futures and tasks, in the orders a loaded loop can produce, including
both in the same turn of the loop. ``tests/test_ingress.py`` checks the same
over real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from actors.http_guard import DISCONNECT_EXTENSION
from actors.ingress import _ClientGone, _unless_gone


class Caller:
    """The ASGI side of a request whose body was read: waits until the client leaves.

    ``hears`` is how the handler learns of it: from the server's protocol
    (``protocol``: the disconnect extension, called at once, as
    ``actors/http_guard.py`` does) or only from ``receive`` (``receive``: any
    other ASGI server, where a watcher task waits in it).
    """

    def __init__(self, hears: str) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.callbacks: list[Callable[[], None]] = []
        self.scope: dict[str, Any] = {}
        if hears == "protocol":
            self.scope["extensions"] = {DISCONNECT_EXTENSION: self.callbacks.append}

    async def receive(self) -> dict[str, Any]:
        return await self.messages.get()

    def hang_up(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})
        for callback in self.callbacks:
            callback()

    def wait(self, waiting: Any) -> Any:
        return _unless_gone(self.scope, self.receive, waiting)


@pytest.fixture(params=["protocol", "receive"])
def hears(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def others() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_an_answer_is_returned_and_leaves_no_watcher_behind(hears: str) -> None:
    async def main() -> None:
        caller = Caller(hears)
        decision: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, decision.set_result, "approve")
        assert await caller.wait(decision) == "approve"
        await turns()
        assert not others()
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0

    run(main())


def test_an_answer_already_there_is_returned_without_a_watcher(hears: str) -> None:
    async def main() -> None:
        decision: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        decision.set_result("deny")
        started = asyncio.all_tasks()
        assert await Caller(hears).wait(decision) == "deny"
        assert asyncio.all_tasks() == started

    run(main())


def test_a_caller_that_hangs_up_first_is_gone_once_and_its_wait_cancelled(hears: str) -> None:
    async def main() -> None:
        caller = Caller(hears)
        decision: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, caller.hang_up)
        with pytest.raises(_ClientGone):
            await caller.wait(decision)
        # Whoever decides later finds the wait over (the registry's done() check).
        assert decision.cancelled()
        # The handler goes on normally (it answers nobody, and abandons the request):
        # its task carries no cancellation that a later await would trip over.
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0
        await asyncio.sleep(0.01)
        await turns()
        assert not others()

    run(main())


def test_an_answer_and_a_hang_up_in_the_same_turn_end_once(hears: str) -> None:
    """Both in one turn of the loop, in either order: one end, the one seen first.

    An answer settled first stands. A hang-up first wins only where the server
    says so at once (the protocol's callback); a watcher task hears of it a
    turn later, after the answer."""

    async def main(hang_up_first: bool) -> None:
        caller = Caller(hears)
        loop = asyncio.get_running_loop()
        decision: asyncio.Future[str] = loop.create_future()

        def settle() -> None:  # as the registry does: only what still waits
            if not decision.done():
                decision.set_result("approve")

        def both() -> None:
            if hang_up_first:
                caller.hang_up()
                settle()
            else:
                settle()
                caller.hang_up()

        loop.call_later(0.01, both)
        if hang_up_first and hears == "protocol":
            with pytest.raises(_ClientGone):
                await caller.wait(decision)
            assert decision.cancelled()
        else:
            assert await caller.wait(decision) == "approve"
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0
        await turns()
        assert not others()

    run(main(True))
    run(main(False))


def test_a_hang_up_then_an_answer_a_turn_later_is_gone(hears: str) -> None:
    async def main() -> None:
        caller = Caller(hears)
        loop = asyncio.get_running_loop()
        decision: asyncio.Future[str] = loop.create_future()
        settled: list[bool] = []

        def decide_later() -> None:
            # What the registry does: settle only what is still waiting.
            if not decision.done():
                decision.set_result("approve")
            settled.append(decision.done() and not decision.cancelled())

        def hang_up_then_decide() -> None:
            caller.hang_up()
            loop.call_soon(loop.call_soon, decide_later)  # after the watcher's turn

        loop.call_later(0.01, hang_up_then_decide)
        with pytest.raises(_ClientGone):
            await caller.wait(decision)
        await turns()
        assert settled == [False]

    run(main())


def test_a_cancel_from_outside_stays_a_cancel(hears: str) -> None:
    """The server stopping cancels the handler: that is no hang-up (nothing is abandoned here)."""

    async def main() -> None:
        caller = Caller(hears)
        decision: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        handler = asyncio.ensure_future(caller.wait(decision))
        await turns()
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        await turns()
        assert not others()

    run(main())


def test_a_hang_up_and_a_cancel_from_outside_stay_a_cancel(hears: str) -> None:
    async def main() -> None:
        caller = Caller(hears)
        decision: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        handler = asyncio.ensure_future(caller.wait(decision))
        await turns()
        caller.hang_up()
        if hears == "receive":
            await asyncio.sleep(0)  # the watcher's turn: it cancels the handler ...
        handler.cancel()  # ... and the server stops before the handler runs again
        with pytest.raises(asyncio.CancelledError):
            await handler

    run(main())


def test_a_hang_up_cancels_a_task_it_waits_for_before_it_returns(hears: str) -> None:
    """The hook's wait is a task of its own: it is cancelled (and runs its own
    clean-up, which abandons the request) before the handler hears the caller is gone."""

    async def main() -> None:
        caller = Caller(hears)
        cleaned: list[str] = []

        async def wait_for_a_person() -> str:
            try:
                await asyncio.Future()
            except asyncio.CancelledError:
                cleaned.append("abandoned")
                raise
            return "never"

        hook = asyncio.ensure_future(wait_for_a_person())
        asyncio.get_running_loop().call_later(0.01, caller.hang_up)
        with pytest.raises(_ClientGone):
            await caller.wait(hook)
        assert cleaned == ["abandoned"]
        assert hook.cancelled()
        await turns()
        assert not others()

    run(main())


def test_many_waits_each_end_exactly_once(hears: str) -> None:
    """Some hang up, some are answered, some both, at nearby times and in the same turn."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outcomes: dict[int, list[str]] = {}

        async def handler(i: int) -> None:
            caller = Caller(hears)
            decision: asyncio.Future[str] = loop.create_future()
            answered = i % 3 != 1
            hangs_up = i % 2 == 1 or not answered
            if hangs_up:
                loop.call_later(0.001 * (i % 7), caller.hang_up)
            if answered:
                loop.call_later(
                    0.001 * (i % 5), lambda: decision.done() or decision.set_result("ok")
                )
            ended = outcomes.setdefault(i, [])
            try:
                ended.append(await caller.wait(decision))
            except _ClientGone:
                ended.append("gone")

        await asyncio.gather(*(handler(i) for i in range(300)))
        assert all(len(ended) == 1 for ended in outcomes.values()), "exactly one end each"
        for i, (ended,) in outcomes.items():
            if i % 3 == 1:
                assert ended == "gone", i  # never answered
            elif i % 2 == 0:
                assert ended == "ok", i  # never hung up
        await turns()
        assert not others()

    run(main())
