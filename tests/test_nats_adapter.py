"""``sled_gateway.bus.nats_adapter`` against the installed nats-py.

The adapter reaches past nats-py's public API to put a drain's ``UNSUB`` on the
wire before its ``PING`` (its docstring says why). A nats-py release that
renames or reshapes one of those internals must fail here, by name, rather than
quietly bring back the requests a stopping replica dropped unanswered. The
last test drains real subscriptions under a burst of requests on a real
nats-server and counts what went unanswered.
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import nats as nats_support
from tests.support.nats import NatsServer

nats = pytest.importorskip("nats", reason="nats-py is the optional `cluster` extra")

from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

from sled_gateway.bus.nats_adapter import drain_subscription  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with nats_support.running_server() as server:
        yield server


def test_the_installed_nats_py_is_the_pinned_minor_release() -> None:
    from importlib.metadata import version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["cluster"]]
    (pin,) = [r for r in pins if r.name == "nats-py"]
    assert Version(version("nats-py")) in pin.specifier, (version("nats-py"), str(pin))


def test_the_client_internals_it_calls_keep_their_shape() -> None:
    unsubscribe = inspect.signature(Client._send_unsubscribe)
    assert list(unsubscribe.parameters)[:2] == ["self", "sid"]
    assert inspect.iscoroutinefunction(Client._send_unsubscribe)
    flush = inspect.signature(Client._flush_pending)
    assert "force_flush" in flush.parameters
    assert inspect.iscoroutinefunction(Client._flush_pending)


def test_a_subscription_still_knows_its_client_and_sid(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            first = await nc.subscribe("adapter.a")
            second = await nc.subscribe("adapter.b")
            assert first._conn is nc and second._conn is nc
            assert isinstance(first._id, int) and first._id != second._id
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_drained_subscription_answers_everything_routed_to_it(
    nats_server: NatsServer,
) -> None:
    """Requests every 0.2 ms across each drain: each is answered by the draining
    subscription or finds no responders, and none waits out its timeout. With
    nats-py's own ``drain()`` here, 4 to 41 of the 1,200 went unanswered in each of
    four runs (its PING overtakes its UNSUB)."""

    async def scenario() -> Counter[str]:
        holder = await nats.connect(nats_server.url)
        asker = await nats.connect(nats_server.url)
        outcomes: Counter[str] = Counter()
        try:
            for cycle in range(30):

                async def answer(msg: Msg) -> None:
                    await msg.respond(b"ok")

                sub = await holder.subscribe(f"adapter.drain.{cycle}", cb=answer)
                await holder.flush()

                async def ask(delay: float, subject: str) -> None:
                    await asyncio.sleep(delay)
                    try:
                        await asker.request(subject, b"x", timeout=1.0)
                        outcomes["answered"] += 1
                    except nats.errors.NoRespondersError:
                        outcomes["no responders"] += 1
                    except nats.errors.TimeoutError:
                        outcomes["unanswered"] += 1

                subject = f"adapter.drain.{cycle}"
                asking = [asyncio.create_task(ask(i * 0.0002, subject)) for i in range(40)]
                await asyncio.sleep(0.004)
                await drain_subscription(sub)
                await asyncio.gather(*asking)
        finally:
            await holder.close()
            await asker.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes["unanswered"] == 0, outcomes
    assert outcomes["answered"] and outcomes["no responders"], outcomes
