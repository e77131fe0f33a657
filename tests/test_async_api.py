"""The asyncio face of the library API: ``async with Uplink(...)`` and ``adecide``.

An asyncio application lends the uplink its running loop, so its awaits reach
the socket without crossing a thread. Each test drives a real uplink against
the real test gateway (a websockets server on port 0) inside ``asyncio.run``.
The test gateway's waits block, so they run in a worker thread (``to_thread``)
while the uplink's loop, the test's own loop, keeps serving.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from actors import Uplink, UplinkConfig
from actors.context import Role
from actors.messages import InjectFault
from protocol import ConfigError, Decision, Outcome, Reason
from tests.conftest import FAST, scaled
from tests.support.gateway import Gateway


def config(url: str, **overrides: Any) -> UplinkConfig:
    return UplinkConfig(upstream_url=url, **{"project": "async-proj", **FAST, **overrides})


def run(
    main: Callable[[], Awaitable[Any]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Any:
    async def guarded() -> Any:  # one task: "other tasks" below means the uplink's
        async with asyncio.timeout(scaled(30)):
            return await main()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(guarded())


async def connected(uplink: Uplink) -> None:
    assert await uplink.await_connected(scaled(5)), uplink.status()


async def nothing_pending(uplink: Uplink) -> None:
    """Wait (in the loop, which must keep serving) until every request is decided."""
    async with asyncio.timeout(scaled(5)):
        while uplink.status()["permissions"]["pending"]:
            await asyncio.sleep(0.01)


def test_the_uplink_runs_in_the_callers_loop_and_gets_the_gateways_answer() -> None:
    with Gateway(auto="approve") as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                assert uplink.context.loop.loop is asyncio.get_running_loop()
                assert uplink.context.loop.thread_id == threading.get_ident()
                outcome = await uplink.adecide("Bash", {"command": "ls"}, request_id="a-1")
                assert outcome == Outcome("a-1", Decision.APPROVE, Reason.GATEWAY)
                # Many in flight at once, each answered once.
                outcomes = await asyncio.gather(
                    *(uplink.adecide("Read", {"path": f"/f{i}"}) for i in range(200))
                )
                assert all(o.decision is Decision.APPROVE for o in outcomes)
                assert len({o.request_id for o in outcomes}) == 200
                assert uplink.status()["permissions"]["pending"] == 0

        run(main)
        session = gateway.session(1)
        assert session.frames[0]["type"] == "identity"
        request = gateway.frame(session, "perm_request")
        assert request == {
            "type": "perm_request",
            "req_id": "a-1",
            "payload": {"tool_name": "Bash", "tool_input": {"command": "ls"}},
        }
        gateway.wait_closed(session)
        assert session.close_code == 1001


def test_a_lost_session_denies_what_was_waiting_on_it() -> None:
    with Gateway() as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                waiting = uplink.arequest_permission("Bash", {"command": "rm -rf build"})
                session = await asyncio.to_thread(gateway.session, 1)
                await asyncio.to_thread(gateway.frame, session, "perm_request")
                gateway.abort(session)
                outcome = await asyncio.wait_for(waiting, scaled(5))
                assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SESSION_ENDED)

        run(main)


def test_astop_denies_what_is_waiting_and_everything_after() -> None:
    with Gateway() as gateway:

        async def main() -> None:
            uplink = await Uplink(config(gateway.url)).astart()
            await connected(uplink)
            waiting = [uplink.arequest_permission("Write", {"n": i}) for i in range(5)]
            session = await asyncio.to_thread(gateway.session, 1)
            await asyncio.to_thread(gateway.frame, session, "perm_request", 4)
            await uplink.astop()
            for outcome in await asyncio.gather(*waiting):
                assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SHUTDOWN)
            late = await uplink.adecide("Write", {})
            assert (late.decision, late.reason) == (Decision.DENY, Reason.SHUTDOWN)
            # The portal task that served other threads is gone with it.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []
            await uplink.astop()  # a second stop is harmless

        run(main)
        gateway.wait_closed(gateway.session(1))
        assert gateway.session(1).close_code == 1001


def test_a_caller_that_gives_up_gets_a_deny_and_the_request_is_still_decided() -> None:
    with Gateway() as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                outcome = await uplink.adecide("Bash", {}, request_id="slow", timeout=0.1)
                assert outcome == Outcome("slow", Decision.DENY, Reason.TIMEOUT)
                session = await asyncio.to_thread(gateway.session, 1)
                await asyncio.to_thread(gateway.frame, session, "perm_request")
                assert uplink.status()["permissions"]["pending"] == 1
                await asyncio.to_thread(
                    gateway.respond, session, "slow", {"approved": True, "always_allow": False}
                )
                await nothing_pending(uplink)
                assert uplink.status()["permissions"]["decided"] == 1

        run(main)


def test_cancelling_a_waiting_task_abandons_the_wait_not_the_request() -> None:
    with Gateway() as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                task = asyncio.create_task(uplink.adecide("Bash", {}, request_id="c-1"))
                session = await asyncio.to_thread(gateway.session, 1)
                await asyncio.to_thread(gateway.frame, session, "perm_request")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # A later request with the same id is told it is a duplicate:
                # the first one is still waiting for its decision.
                duplicate = await uplink.adecide("Bash", {}, request_id="c-1")
                assert duplicate.reason is Reason.DUPLICATE_ID
                await asyncio.to_thread(
                    gateway.respond, session, "c-1", {"approved": False, "always_allow": False}
                )
                await nothing_pending(uplink)
                assert uplink.status()["counters"]["decision_reasons"] == {
                    "duplicate_id": 1,
                    "gateway": 1,
                }

        run(main)


def test_blocking_calls_from_the_uplinks_own_loop_are_refused_with_the_async_name() -> None:
    with Gateway(auto="approve") as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                with pytest.raises(RuntimeError, match="adecide"):
                    uplink.decide("Bash", {})
                with pytest.raises(RuntimeError, match="await_connected"):
                    uplink.wait_connected(1)
                with pytest.raises(RuntimeError, match="astop"):
                    uplink.stop()
                # None of that disturbed it.
                assert (await uplink.adecide("Bash", {})).decision is Decision.APPROVE

        run(main)


def test_another_loop_can_await_an_uplink_that_runs_in_its_own_thread(make_uplink) -> None:
    with Gateway(auto="approve") as gateway:
        uplink = make_uplink(gateway.url)
        assert uplink.wait_connected(scaled(5))

        async def main() -> list[Outcome]:
            return await asyncio.gather(*(uplink.adecide("Read", {"i": i}) for i in range(50)))

        outcomes = run(main)
        assert [o.decision for o in outcomes] == [Decision.APPROVE] * 50
        # The blocking face still works beside it.
        assert uplink.decide("Read", {}).decision is Decision.APPROVE


def test_an_uplink_in_its_own_thread_runs_on_uvloop_and_decides_over_it(make_uplink) -> None:
    """uvloop is a dependency, and the uplink's own loop is then uvloop's (4-10 % less
    CPU a request, docs/benchmarks.md). Its WebSocket, ingress and registry work over
    uvloop's transports, which are not subclasses of ``asyncio.Transport``."""
    import uvloop

    with Gateway(auto="approve") as gateway:
        uplink = make_uplink(gateway.url, listen="127.0.0.1:0")
        assert isinstance(uplink.context.loop.loop, uvloop.Loop)
        assert uplink.wait_connected(scaled(5)), uplink.status()
        assert uplink.decide("Read", {"path": "a"}).decision is Decision.APPROVE
        port = uplink.status()["ingress"]["port"]  # the status board, as a caller reads it
        answer = httpx.post(
            f"http://127.0.0.1:{port}/permission",
            json={"tool_name": "Bash", "tool_input": {"command": "ls"}},
            timeout=scaled(5),
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["decision"] == "approve"


def test_an_application_on_uvloop_lends_the_uplink_its_loop() -> None:
    """An application's own loop is kept, uvloop's too: the uplink's WebSocket and ingress
    run on it (their transports are uvloop's) and every request is answered once."""
    import uvloop

    with Gateway(auto="approve") as gateway:

        async def main() -> list[Outcome]:
            async with Uplink(config(gateway.url, listen="127.0.0.1:0")) as uplink:
                assert uplink.context.loop.loop is asyncio.get_running_loop()
                assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
                await connected(uplink)
                port = uplink.status()["ingress"]["port"]
                async with httpx.AsyncClient(timeout=scaled(5)) as client:
                    answer = await client.post(
                        f"http://127.0.0.1:{port}/permission",
                        json={"tool_name": "Bash", "tool_input": {"command": "ls"}},
                    )
                assert answer.status_code == 200, answer.text
                assert answer.json()["decision"] == "approve"
                return await asyncio.gather(*(uplink.adecide("Read", {"i": i}) for i in range(50)))

        outcomes = run(main, uvloop.new_event_loop)
        assert [o.decision for o in outcomes] == [Decision.APPROVE] * 50
        assert len({o.request_id for o in outcomes}) == 50


def test_a_registry_crash_denies_what_it_held() -> None:
    with Gateway() as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)
                waiting = uplink.arequest_permission("Bash", {})
                session = await asyncio.to_thread(gateway.session, 1)
                await asyncio.to_thread(gateway.frame, session, "perm_request")
                uplink.context.directory.tell(Role.PERMISSIONS, InjectFault("test"))
                outcome = await asyncio.wait_for(waiting, scaled(5))
                assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.CRASH)

        run(main)


def test_the_ingress_serves_from_the_callers_loop_and_leaves_its_signals_alone() -> None:
    def handlers() -> tuple[Any, Any]:
        return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    with Gateway(auto="approve") as gateway:

        async def main() -> None:
            before = handlers()  # asyncio.run's own SIGINT handler included
            async with Uplink(config(gateway.url, listen="127.0.0.1:0")) as uplink:
                await connected(uplink)
                assert handlers() == before
                port = uplink._ingress.port
                async with httpx.AsyncClient(timeout=scaled(5)) as client:
                    answer = await client.post(
                        f"http://127.0.0.1:{port}/permission",
                        json={"tool_name": "Bash", "tool_input": {"command": "ls"}},
                    )
                assert answer.status_code == 200
                assert answer.json()["behavior"] == "allow"
            assert handlers() == before

        run(main)


def test_a_failed_astart_raises_and_leaves_nothing_running() -> None:
    with Gateway() as gateway, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            uplink = Uplink(config(gateway.url, listen=f"127.0.0.1:{port}"))
            with pytest.raises(ConfigError):
                await uplink.astart()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []
            denied = await uplink.adecide("Bash", {})
            assert denied.reason is Reason.SHUTDOWN
            with pytest.raises(RuntimeError, match="already started"):
                await uplink.astart()

        run(main)


def test_frames_keep_each_senders_order_through_direct_writes_and_back_pressure() -> None:
    """Loop-thread sends go straight to the socket only while nothing is queued;
    under back-pressure (big frames) they queue behind the rest, in order."""
    per_sender = 150
    bulk = "x" * 64 * 1024  # 2 × 150 × 64 KiB: far past the transport's high-water mark
    with Gateway(auto="approve") as gateway:

        async def main() -> None:
            async with Uplink(config(gateway.url)) as uplink:
                await connected(uplink)

                def from_a_thread() -> list[Outcome]:
                    futures = [
                        uplink.request_permission("T", {"bulk": bulk}, request_id=f"t{i}")
                        for i in range(per_sender)
                    ]
                    return [f.result(scaled(20)) for f in futures]

                threaded = asyncio.create_task(asyncio.to_thread(from_a_thread))
                in_loop = [
                    uplink.arequest_permission("L", {"bulk": bulk}, request_id=f"l{i}")
                    for i in range(per_sender)
                ]
                outcomes = [*await asyncio.gather(*in_loop), *await threaded]
                assert [o.decision for o in outcomes] == [Decision.APPROVE] * 2 * per_sender

        run(main)
        ids = [f["req_id"] for f in gateway.session(1).of_type("perm_request")]
        assert [i for i in ids if i.startswith("l")] == [f"l{i}" for i in range(per_sender)]
        assert [i for i in ids if i.startswith("t")] == [f"t{i}" for i in range(per_sender)]
