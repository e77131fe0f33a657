"""Tests of the reference gateway (gateway/, run_gateway.py) over real sockets.

A raw ``websockets`` client plays the sled; httpx plays the console and MCP
clients; the official MCP SDK client checks the relay; ``run_gateway.py``
runs as a subprocess for its exit statuses and signals. Waits are on events
(``Gateway.wait_for``, received frames), bounded by one scaled unit.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol import Decision
from sled_gateway import AlreadyDecided, Gateway, UnknownRequest
from sled_gateway.transports.terminal import TerminalPrompter, parse_answer
from tests.conftest import REFERENCE_TOKEN
from tests.support.proc import WatchedProcess

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))  # as in conftest.py
T = 5.0 * FACTOR  # bound on anything we wait for by event
TOKEN = REFERENCE_TOKEN

APPROVE = {"approved": True, "always_allow": False}
DENY = {"approved": False, "always_allow": False}
ALWAYS = {"approved": True, "always_allow": True}
PAYLOADS = {"approve": APPROVE, "deny": DENY, "always_allow": ALWAYS}


# -- helpers ---------------------------------------------------------------------


def run(coro: Any) -> Any:
    """Run one async scenario with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, 6 * T))


def frame(kind: str, req_id: str = "", payload: Any = None) -> str:
    return json.dumps({"type": kind, "req_id": req_id, "payload": payload})


def perm_request(req_id: str, tool: str = "Bash", tool_input: Any = None) -> str:
    return frame(
        "perm_request", req_id, {"tool_name": tool, "tool_input": tool_input or {"command": "ls"}}
    )


async def recv(ws: ClientConnection) -> dict[str, Any]:
    received: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), T))
    return received


async def wait_state(gw: Gateway, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return await asyncio.to_thread(gw.wait_for, predicate, T)


def sled_of(state: dict[str, Any], project: str) -> dict[str, Any] | None:
    return next((s for s in state["sleds"] if s["project"] == project), None)


def pending_ids(state: dict[str, Any]) -> set[str]:
    return {p["req_id"] for p in state["pending"]}


def api(gw: Gateway) -> dict[str, str]:
    """An API client's headers: the operator token, and JSON (the CSRF check wants it)."""
    return {**gw.api_headers(), "Content-Type": "application/json"}


@asynccontextmanager
async def sled(gw: Gateway, project: str = "p", **info: Any) -> AsyncIterator[ClientConnection]:
    """A fake sled: connected, identified, and seen as such by the gateway."""
    async with connect(gw.url_for_sleds()) as ws:
        before = sled_of(gw.state(), project)
        old_session = before["session"] if before else 0
        await ws.send(frame("identity", "identity", {"project": project, **info}))
        await wait_state(
            gw,
            lambda s: (
                (x := sled_of(s, project)) is not None
                and x["session"] != old_session
                and x["state"] == "connected"
            ),
        )
        yield ws


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway]) -> Gateway:
    return make_reference_gateway()


def test_the_gateway_serves_on_uvloop(gw: Gateway) -> None:
    """The gateway extra installs uvloop, and the gateway's loop is then uvloop's: a tenth
    of a decision's CPU (docs/benchmarks.md, target 4) depends on it."""
    import uvloop

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(gw.run_on_loop(running_loop()).result(5), uvloop.Loop)


# -- authentication -----------------------------------------------------------------


@pytest.mark.parametrize("token", ["wrong", None, ""], ids=["wrong", "missing", "empty"])
def test_bad_token_gets_401_before_upgrade(gw: Gateway, token: str | None) -> None:
    url = gw.url_for_sleds(token) if token is not None else gw.url_for_sleds().split("?")[0]

    async def scenario() -> None:
        with pytest.raises(InvalidStatus) as caught:
            async with connect(url):
                pytest.fail("the upgrade must be refused")
        assert caught.value.response.status_code == 401

    run(scenario())
    assert gw.state()["sleds"] == []


def test_no_auth_accepts_a_sled_without_token(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway(token=None)
    assert "token" not in gw.url_for_sleds()

    async def scenario() -> None:
        async with sled(gw, "open"):
            pass

    run(scenario())


def test_token_with_url_special_characters(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway(token="a&b=c d/é")

    async def scenario() -> None:
        async with sled(gw, "p"):
            pass

    run(scenario())


def test_token_never_logged(gw: Gateway) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE")
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    uv = logging.getLogger("uvicorn.error")
    old_level = uv.level
    uv.setLevel(logging.DEBUG)
    uv.addHandler(handler)
    # The fake sled's own client logs its request line; it is not under test.
    client_log = logging.getLogger("websockets.client")
    old_client_level = client_log.level
    client_log.setLevel(logging.WARNING)
    try:

        async def scenario() -> None:
            async with sled(gw, "p"):
                pass
            with pytest.raises(InvalidStatus):
                async with connect(gw.url_for_sleds(TOKEN + "x")):
                    pass

        run(scenario())
    finally:
        uv.removeHandler(handler)
        uv.setLevel(old_level)
        client_log.setLevel(old_client_level)
        logger.remove(sink)
    text = "\n".join(lines)
    assert "/api/sled-uplink?token=***" in text  # uvicorn logged the path, redacted
    assert TOKEN not in text


# -- identity, heartbeat, liveness -------------------------------------------------------


def test_identity_is_recorded(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "proj-a", version="1.2.3"):
            s = sled_of(gw.state(), "proj-a")
            assert s is not None
            assert s["state"] == "connected"
            assert s["info"] == {"version": "1.2.3"}
            assert s["connected_at"] is not None
            assert s["last_heartbeat"] is None
            assert s["remote"].startswith("127.0.0.1:")
        state = await wait_state(gw, lambda st: sled_of(st, "proj-a")["state"] == "disconnected")  # type: ignore[index]
        gone = sled_of(state, "proj-a")
        assert gone is not None
        assert gone["disconnected_at"] is not None
        assert gone["close_code"] == 1000

    run(scenario())


def test_heartbeat_staleness(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway(heartbeat_interval=0.2)

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            started = time.monotonic()
            await wait_state(gw, lambda s: sled_of(s, "p")["state"] == "stale")  # type: ignore[index]
            assert time.monotonic() - started >= 0.5  # 3 x 0.2 s, minus scheduling slack
            await ws.send(frame("heartbeat"))
            state = await wait_state(gw, lambda s: sled_of(s, "p")["state"] == "connected")  # type: ignore[index]
            assert sled_of(state, "p")["last_heartbeat"] is not None  # type: ignore[index]

    run(scenario())


def test_heartbeats_keep_a_sled_connected(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway(heartbeat_interval=0.2)

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            for _ in range(12):  # 1.2 s, well past the 0.6 s staleness bound
                await asyncio.sleep(0.1)  # this *is* the behaviour under test: a sled's cadence
                await ws.send(frame("heartbeat"))
                assert sled_of(gw.state(), "p")["state"] == "connected"  # type: ignore[index]

    run(scenario())


def test_pings_are_answered(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            pong = await ws.ping(b"hello")
            latency = await asyncio.wait_for(pong, T)
            assert latency >= 0

    run(scenario())


def test_a_new_session_replaces_the_old_one(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as first:
            await first.send(perm_request("old-1"))
            await wait_state(gw, lambda s: "old-1" in pending_ids(s))
            async with sled(gw, "p") as second:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(first.recv(), T)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4000
                state = await wait_state(gw, lambda s: "old-1" not in pending_ids(s))
                assert sled_of(state, "p")["state"] == "connected"  # type: ignore[index]
                await second.send(perm_request("new-1"))
                await wait_state(gw, lambda s: "new-1" in pending_ids(s))

    run(scenario())


# -- bad frames ------------------------------------------------------------------------


def test_unknown_and_invalid_frames_are_dropped_and_connection_stays_up(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway(auto="approve")

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send("this is not json")
            await ws.send("[1, 2, 3]")
            await ws.send(json.dumps({"type": 7, "req_id": "x"}))
            await ws.send(b"\x00\x01binary")
            await ws.send(frame("future_kind", "x", {"anything": True}))
            await ws.send(frame("perm_response", "x", APPROVE))  # gateway→sled kind, wrong way
            await ws.send(perm_request("still-alive"))
            answer = await recv(ws)
            assert answer == {"type": "perm_response", "req_id": "still-alive", "payload": APPROVE}
            state = await wait_state(gw, lambda s: sled_of(s, "p")["frames_dropped"] == 6)  # type: ignore[index]
            assert sled_of(state, "p")["state"] == "connected"  # type: ignore[index]

    run(scenario())


def test_identity_without_project_is_closed_1008(gw: Gateway) -> None:
    async def scenario() -> None:
        async with connect(gw.url_for_sleds()) as ws:
            await ws.send(frame("identity", "identity", {"name": "no project key"}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), T)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008

    run(scenario())


def test_perm_request_before_identity_is_denied(gw: Gateway) -> None:
    async def scenario() -> None:
        async with connect(gw.url_for_sleds()) as ws:
            await ws.send(perm_request("early"))
            assert await recv(ws) == {"type": "perm_response", "req_id": "early", "payload": DENY}

    run(scenario())


# -- permission requests ---------------------------------------------------------------


@pytest.mark.parametrize("auto", ["approve", "deny"])
def test_auto_policy_answers_at_once(
    make_reference_gateway: Callable[..., Gateway], auto: str
) -> None:
    gw = make_reference_gateway(auto=auto)

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("req-1", "Write", {"path": "/tmp/x"}))
            assert await recv(ws) == {
                "type": "perm_response",
                "req_id": "req-1",
                "payload": PAYLOADS[auto],
            }

    run(scenario())
    decisions = gw.state()["decisions"]
    assert decisions[0]["decision"] == auto
    assert decisions[0]["by"] == "auto"
    assert decisions[0]["tool_name"] == "Write"
    assert gw.state()["pending"] == []


@pytest.mark.parametrize("decision", ["approve", "deny", "always_allow"])
def test_console_rest_decides(gw: Gateway, decision: str) -> None:
    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, timeout=T, headers=api(gw)) as http,
        ):
            await ws.send(perm_request("r/1 ü", "Bash", {"command": "rm -rf build"}))
            state = await wait_state(gw, lambda s: "r/1 ü" in pending_ids(s))
            item = state["pending"][0]
            assert item["project"] == "p"
            assert item["tool_name"] == "Bash"
            assert item["tool_input"] == {"command": "rm -rf build"}
            assert item["received_at"]

            listed = (await http.get("/api/state")).json()
            assert pending_ids(listed) == {"r/1 ü"}

            url = "/api/permissions/p/" + httpx.URL("r%2F1%20%C3%BC").raw_path.decode()
            response = await http.post(url, json={"decision": decision})
            assert response.status_code == 200, response.text
            assert response.json()["decided"]["decision"] == decision
            answer = await recv(ws)
            assert answer == {
                "type": "perm_response",
                "req_id": "r/1 ü",
                "payload": PAYLOADS[decision],
            }

            again = await http.post(url, json={"decision": "approve"})
            assert again.status_code == 409
            assert again.json()["decided"]["decision"] == decision

            after = (await http.get("/api/state")).json()
            assert after["pending"] == []
            assert after["decisions"][0]["decision"] == decision
            assert after["decisions"][0]["by"] == "api"  # a bearer token, not the console

    run(scenario())


def test_console_rest_errors(gw: Gateway) -> None:
    async def scenario() -> None:
        async with (
            sled(gw, "p") as ws,
            httpx.AsyncClient(base_url=gw.http_url, timeout=T, headers=api(gw)) as http,
        ):
            unknown = await http.post("/api/permissions/p/nope", json={"decision": "approve"})
            assert unknown.status_code == 404
            assert "error" in unknown.json()
            unknown_sled = await http.post(
                "/api/permissions/ghost/nope", json={"decision": "approve"}
            )
            assert unknown_sled.status_code == 404

            await ws.send(perm_request("r1"))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            for body in ({"decision": "maybe"}, {}, [1]):
                bad = await http.post("/api/permissions/p/r1", json=body)
                assert bad.status_code == 400, body
            not_json = await http.post("/api/permissions/p/r1", content=b"{nope")
            assert not_json.status_code == 400
            assert gw.is_pending("p", "r1")  # still waiting after bad answers
            wrong_method = await http.put("/api/permissions/p/r1", json={})
            assert wrong_method.status_code == 405

    run(scenario())


def test_library_decide(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("r1"))
            await wait_state(gw, lambda s: "r1" in pending_ids(s))
            record = await asyncio.to_thread(gw.decide, "p", "r1", Decision.ALWAYS_ALLOW)
            assert record.decision == "always_allow"
            assert record.by == "library"
            assert await recv(ws) == {"type": "perm_response", "req_id": "r1", "payload": ALWAYS}
            with pytest.raises(AlreadyDecided):
                await asyncio.to_thread(gw.decide, "p", "r1", "deny")
            with pytest.raises(UnknownRequest):
                await asyncio.to_thread(gw.decide, "p", "other", "deny")
            with pytest.raises(ValueError, match="maybe"):
                gw.decide("p", "r1", "maybe")

    run(scenario())


def test_disconnect_withdraws_pending_requests(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("a"))
            await ws.send(perm_request("b"))
            await wait_state(gw, lambda s: pending_ids(s) == {"a", "b"})
        state = await wait_state(gw, lambda s: s["pending"] == [])
        assert {(d["req_id"], d["decision"]) for d in state["decisions"]} == {
            ("a", "withdrawn"),
            ("b", "withdrawn"),
        }
        with pytest.raises(AlreadyDecided):
            await asyncio.to_thread(gw.decide, "p", "a", "approve")

    run(scenario())


def test_a_pending_id_sent_again_is_ignored_if_same_else_denied_and_withdrawn(
    gw: Gateway,
) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("same", "First"))
            await ws.send(perm_request("same", "First"))
            await ws.send(perm_request("dup", "First"))
            await ws.send(perm_request("dup", "Second"))
            assert await recv(ws) == {"type": "perm_response", "req_id": "dup", "payload": DENY}
            await ws.send(perm_request("marker"))
            state = await wait_state(gw, lambda s: "marker" in pending_ids(s))
            assert [p["tool_name"] for p in state["pending"] if p["req_id"] == "same"] == ["First"]
            assert "dup" not in pending_ids(state)

    run(scenario())


def test_malformed_perm_request_is_denied(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(frame("perm_request", "bad", {"tool_input": {}}))
            assert await recv(ws) == {"type": "perm_response", "req_id": "bad", "payload": DENY}

    run(scenario())


# -- MCP relay -------------------------------------------------------------------------


def test_mcp_relay_round_trip(gw: Gateway) -> None:
    body = '{ "jsonrpc":"2.0",  "id": 7, "method":"tools/list", "params": {"x": "é\\n"} }\n'

    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            post = asyncio.create_task(
                http.post(
                    gw.mcp_url("p"),
                    content=body.encode(),
                    headers={
                        "Content-Type": "application/json",
                        "Accept": "application/json, text/event-stream",
                        "Mcp-Session-Id": "ignored",
                        "MCP-Protocol-Version": "2025-06-18",
                    },
                )
            )
            request = await recv(ws)
            assert request["type"] == "mcp_request"
            assert request["payload"] == {"body": body}  # verbatim, whitespace and all
            assert request["req_id"]
            result = {"jsonrpc": "2.0", "id": 7, "result": {"tools": []}}
            await ws.send(frame("mcp_response", request["req_id"], result))
            response = await post
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/json")
            assert response.json() == result

    run(scenario())


def test_mcp_relay_batch_and_concurrent_requests(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            posts = [
                asyncio.create_task(http.post(gw.mcp_url("p"), content=f'[{{"id":{i}}}]'))
                for i in range(3)
            ]
            requests = [await recv(ws) for _ in range(3)]
            assert len({r["req_id"] for r in requests}) == 3
            for r in reversed(requests):  # answer out of order
                n = json.loads(r["payload"]["body"])[0]["id"]
                await ws.send(
                    frame("mcp_response", r["req_id"], [{"jsonrpc": "2.0", "id": n, "result": n}])
                )
            for i, post in enumerate(posts):
                response = await post
                assert response.status_code == 200
                assert response.json() == [{"jsonrpc": "2.0", "id": i, "result": i}]

    run(scenario())


def test_mcp_relay_null_payload_is_202(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            post = asyncio.create_task(
                http.post(
                    gw.mcp_url("p"),
                    content='{"jsonrpc":"2.0","method":"notifications/initialized"}',
                )
            )
            request = await recv(ws)
            await ws.send(frame("mcp_response", request["req_id"], None))
            response = await post
            assert response.status_code == 202
            assert response.content == b""

    run(scenario())


def test_mcp_relay_unknown_or_gone_sled_is_404(gw: Gateway) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            response = await http.post(gw.mcp_url("nobody"), content="{}")
            assert response.status_code == 404
            assert "nobody" in response.json()["error"]
            async with sled(gw, "p"):
                pass
            await wait_state(gw, lambda s: sled_of(s, "p")["state"] == "disconnected")  # type: ignore[index]
            response = await http.post(gw.mcp_url("p"), content="{}")
            assert response.status_code == 404

    run(scenario())


@pytest.mark.parametrize("how", ["dropped", "drained"])
def test_mcp_relay_to_a_sled_that_is_reconnecting_is_a_hinted_503(gw: Gateway, how: str) -> None:
    # A sled that left without saying goodbye comes back: a client told 404 would give
    # up on it, one told 503 with Retry-After retries. A sled that closed normally (1000,
    # above) is unknown again.
    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            async with sled(gw, "p") as ws:
                if how == "dropped":
                    ws.transport.abort()  # the network lost it: no close frame at all
                else:
                    await ws.close(1012, "retry_after=1")  # as a draining replica says
            await wait_state(gw, lambda s: sled_of(s, "p")["state"] == "disconnected")  # type: ignore[index]
            response = await http.post(gw.mcp_url("p"), content="{}")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert "reconnecting" in response.json()["error"]
            assert (await http.post(gw.mcp_url("nobody"), content="{}")).status_code == 404
            # Only a caller the endpoint admits learns that the sled was there.
            stranger = await http.post(
                gw.mcp_url("p"), content="{}", headers={"Authorization": "Bearer wrong"}
            )
            assert stranger.status_code == 401
            async with sled(gw, "p") as ws:  # back: the relay reaches it again
                post = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":1}'))
                request = await recv(ws)
                await ws.send(frame("mcp_response", request["req_id"], {"ok": 1}))
                assert (await post).json() == {"ok": 1}

    run(scenario())


def test_mcp_relay_timeout_is_504(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway(mcp_timeout=0.3)

    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            post = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":1}'))
            request = await recv(ws)
            response = await post
            assert response.status_code == 504
            assert "error" in response.json()
            # A late answer is dropped and the session stays usable.
            await ws.send(frame("mcp_response", request["req_id"], {"late": True}))
            post = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":2}'))
            request = await recv(ws)
            await ws.send(frame("mcp_response", request["req_id"], {"ok": True}))
            assert (await post).json() == {"ok": True}

    run(scenario())


def test_mcp_relay_sled_disconnecting_is_502(gw: Gateway) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            async with sled(gw, "p") as ws:
                post = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":1}'))
                await recv(ws)
            response = await post
            assert response.status_code == 502

    run(scenario())


def test_mcp_relay_in_flight_at_stop_is_503(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway()

    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            post = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":1}'))
            await recv(ws)
            await asyncio.to_thread(gw.stop)
            assert (await post).status_code == 503

    run(scenario())


def test_mcp_relay_get_and_delete_are_405(gw: Gateway) -> None:
    async def scenario() -> None:
        async with sled(gw, "p"), httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            for method in ("GET", "DELETE"):
                response = await http.request(
                    method, gw.mcp_url("p"), headers={"Accept": "text/event-stream"}
                )
                assert response.status_code == 405
                assert "POST" in response.headers["allow"]

    run(scenario())


async def _answer_like_an_mcp_server(ws: ClientConnection, seen: list[str]) -> None:
    """Fake sled: answer relayed JSON-RPC the way a tiny MCP server would."""
    async for text in ws:
        env = json.loads(text)
        if env["type"] != "mcp_request":
            continue
        message = json.loads(env["payload"]["body"])
        method = message.get("method")
        seen.append(method)
        if "id" not in message:
            result = None  # a notification: the local server answers 202
        elif method == "initialize":
            result = {
                "jsonrpc": "2.0",
                "id": message["id"],
                "result": {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "fake-sled", "version": "0"},
                },
            }
        elif method == "tools/list":
            tool = {
                "name": "echo",
                "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
            }
            result = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [tool]}}
        elif method == "tools/call":
            text_out = message["params"]["arguments"]["text"]
            content = [{"type": "text", "text": f"echo: {text_out}"}]
            result = {
                "jsonrpc": "2.0",
                "id": message["id"],
                "result": {"content": content, "isError": False},
            }
        else:
            error = {"code": -32601, "message": f"no method {method}"}
            result = {"jsonrpc": "2.0", "id": message["id"], "error": error}
        await ws.send(frame("mcp_response", env["req_id"], result))


def test_mcp_sdk_client_through_the_relay(gw: Gateway) -> None:
    async def scenario() -> None:
        seen: list[str] = []
        async with sled(gw, "p") as ws:
            server = asyncio.create_task(_answer_like_an_mcp_server(ws, seen))
            async with (
                streamable_http_client(
                    gw.mcp_url("p"), http_client=create_mcp_http_client(headers=gw.api_headers())
                ) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                tools = await session.list_tools()
                assert [t.name for t in tools.tools] == ["echo"]
                result = await session.call_tool("echo", {"text": "hi"})
                assert result.content[0].text == "echo: hi"  # type: ignore[union-attr]
            server.cancel()
        assert seen[:4] == ["initialize", "notifications/initialized", "tools/list", "tools/call"]

    run(scenario())


# -- other HTTP surfaces ---------------------------------------------------------------------


def test_console_page_and_misc_endpoints(gw: Gateway) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=T, headers=api(gw)) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "data-action" in page.text
        assert "/api/state" in page.text
        assert http.get("/healthz").json()["ok"] is True
        assert http.get("/api/sled-uplink").status_code == 426
        missing = http.get("/no/such/path")
        assert missing.status_code == 404
        assert "error" in missing.json()
        state = http.get("/api/state").json()
        assert set(state) >= {"sleds", "pending", "decisions", "gateway"}
        assert state["gateway"]["auth"] is True


def test_gateway_api_basics(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway()
    assert gw.port > 0
    assert gw.url_for_sleds() == f"ws://127.0.0.1:{gw.port}/api/sled-uplink?token={TOKEN}"
    assert gw.url_for_sleds("a b&c") == f"ws://127.0.0.1:{gw.port}/api/sled-uplink?token=a%20b%26c"
    assert gw.mcp_url("my proj") == f"http://127.0.0.1:{gw.port}/sleds/my%20proj/mcp"
    gw.stop()
    gw.stop()  # idempotent
    assert not gw.running
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", gw.port), timeout=1),
    ):
        pass


def test_stop_closes_sleds_with_1001(make_reference_gateway: Callable[..., Gateway]) -> None:
    gw = make_reference_gateway()

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await asyncio.to_thread(gw.stop)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), T)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001

    run(scenario())


# -- the terminal prompt (in-process) -----------------------------------------------------------


class Screen(io.TextIOBase):
    """A stdout that tests can wait on."""

    def __init__(self) -> None:
        self.text = ""
        self._cond = threading.Condition()

    def write(self, s: str) -> int:
        with self._cond:
            self.text += s
            self._cond.notify_all()
        return len(s)

    def wait_for(self, needle: str, count: int = 1) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.text.count(needle) >= count, T):
                raise AssertionError(f"{needle!r} not shown; screen:\n{self.text}")


@pytest.fixture
def prompter(gw: Gateway) -> Iterator[tuple[TerminalPrompter, Screen, io.TextIOBase]]:
    r, w = os.pipe()
    stdin, keyboard = open(r, encoding="utf-8"), open(w, "w", encoding="utf-8")  # noqa: SIM115
    screen = Screen()
    p = TerminalPrompter(gw, stdin=stdin, stdout=screen).start()
    yield p, screen, keyboard
    p.stop()
    if not keyboard.closed:
        keyboard.close()  # EOF: the prompter's stdin reader ends
    stdin.close()


def test_parse_answer() -> None:
    assert parse_answer(" Y\n") is Decision.APPROVE
    assert parse_answer("deny") is Decision.DENY
    assert parse_answer("a") is Decision.ALWAYS_ALLOW
    assert parse_answer("always") is Decision.ALWAYS_ALLOW
    assert parse_answer("maybe") is None


def test_terminal_prompt_answers(
    gw: Gateway, prompter: tuple[TerminalPrompter, Screen, io.TextIOBase]
) -> None:
    _, screen, keyboard = prompter

    def type_(line: str) -> None:
        keyboard.write(line + "\n")
        keyboard.flush()

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("r1", "Bash", {"command": "make"}))
            await asyncio.to_thread(screen.wait_for, "always [a]?")
            assert "'p' asks to run Bash" in screen.text
            assert '"command": "make"' in screen.text
            type_("perhaps")
            await asyncio.to_thread(screen.wait_for, "please answer")
            type_("a")
            assert await recv(ws) == {"type": "perm_response", "req_id": "r1", "payload": ALWAYS}

            # Decided in the console while the prompt shows: the prompt moves on.
            await ws.send(perm_request("r2"))
            await asyncio.to_thread(screen.wait_for, "always [a]?", 2)
            await asyncio.to_thread(gw.decide, "p", "r2", "deny", by="console")
            assert await recv(ws) == {"type": "perm_response", "req_id": "r2", "payload": DENY}
            await asyncio.to_thread(screen.wait_for, "answered elsewhere")

            await ws.send(perm_request("r3"))
            await asyncio.to_thread(screen.wait_for, "always [a]?", 3)
            type_("n")
            assert await recv(ws) == {"type": "perm_response", "req_id": "r3", "payload": DENY}
        assert gw.state()["decisions"][0]["by"] == "terminal"

    run(scenario())


def test_terminal_prompt_stdin_eof(
    gw: Gateway, prompter: tuple[TerminalPrompter, Screen, io.TextIOBase]
) -> None:
    _, screen, keyboard = prompter

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("r1"))
            await asyncio.to_thread(screen.wait_for, "always [a]?")
            keyboard.close()
            await asyncio.to_thread(screen.wait_for, "stdin closed")
            assert gw.is_pending("p", "r1")  # the console can still answer

    run(scenario())


# -- run_gateway.py as a process ---------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
    env.update(extra)
    return env


class GatewayProcess(WatchedProcess):
    """``run_gateway.py`` in a subprocess, its output readable by pattern."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(
            [sys.executable, str(ROOT / "run_gateway.py"), *args],
            cwd=ROOT,
            env=env or _env(),
            timeout=T,
        )

    def port(self) -> int:
        return int(self.wait_for(r"gateway listening on http://[^\s]+:(\d+)").group(1))

    close = WatchedProcess.kill


@pytest.fixture
def spawn() -> Iterator[Callable[..., GatewayProcess]]:
    procs: list[GatewayProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> GatewayProcess:
        p = GatewayProcess(*args, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--no-auth", "--listen", "nowhere"], "--listen"),
        (["--no-auth", "--listen", "127.0.0.1:99999"], "--listen"),
        (["--no-auth", "--listen", "::1:80"], "--listen"),
        (["--no-auth", "--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--no-auth", "--heartbeat-interval", "soon"], "--heartbeat-interval"),
        (["--no-auth", "--mcp-timeout", "-1"], "--mcp-timeout"),
        (["--no-auth", "--mcp-timeout", "nan"], "--mcp-timeout"),
        (["--no-auth", "--auto", "maybe"], "--auto"),
        (["--no-auth", "--log-level", "loud"], "--log-level"),
        (["--no-auth", "--auto", "approve", "--interactive"], "--interactive"),
        (["--no-auth", "--token", "x"], "--no-auth"),
        ([], "--token"),
        (["--bogus"], "--bogus"),
        (["--no-auth", "--sled-tokens", "/nonexistent.json"], "--no-auth"),
        (["--sled-tokens", "/nonexistent/sleds.json"], "--sled-tokens"),
        (["--token", "x", "--max-relays-per-sled", "0"], "--max-relays-per-sled"),
        (["--token", "x", "--max-pending-per-sled", "many"], "--max-pending-per-sled"),
        (["--token", "x", "--max-connections", "-3"], "--max-connections"),
        (["--token", "x", "--login-rate", "0"], "--login-rate"),
        (["--token", "x", "--identity-timeout", "0"], "--identity-timeout"),
        (["--token", "x", "--header-timeout", "soon"], "--header-timeout"),
        (["--token", "x", "--forget-disconnected-after", "inf"], "--forget-disconnected-after"),
        (["--token", "x", "--operator-token", "x"], "--operator-token"),
        (["--token", "x", "--operator-token", ""], "--operator-token"),
        (["--token", "x", "--allowed-host", "a/b"], "--allowed-host"),
        (["--token", "x", "--allowed-host", "[zz"], "--allowed-host"),
    ],
)
def test_cli_bad_option_exits_2_with_one_line(args: list[str], names: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), *args],
        capture_output=True,
        text=True,
        timeout=6 * T,
        env=_env(),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert names in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "content",
    [
        '{"a": "s3cret-one", "b": "s3cret-one"}',
        '{"a": "s3cret-one", "b": ""}',
        '["s3cret-one"]',
        '{"a": "s3cret-one",',
        '{"a": "s3cret-one", "b": 7}',
    ],
    ids=["shared", "empty", "not-an-object", "not-json", "not-a-string"],
)
def test_cli_bad_sled_tokens_file_exits_2_without_echoing_a_token(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "sleds.json"
    path.write_text(content)
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), "--sled-tokens", str(path)],
        capture_output=True,
        text=True,
        timeout=6 * T,
        env=_env(),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--sled-tokens" in done.stderr
    assert "s3cret-one" not in done.stderr


def test_cli_prints_a_generated_console_url_once_and_it_logs_in(
    spawn: Callable[..., GatewayProcess],
) -> None:
    gp = spawn("--listen", "127.0.0.1:0", "--no-auth")
    port = gp.port()
    url = gp.wait_for(rf"(http://127\.0\.0\.1:{port}/\?token=\S+)").group(1)
    token = url.rsplit("=", 1)[1]
    with httpx.Client(timeout=T) as browser:
        assert browser.get(f"http://127.0.0.1:{port}/api/state").status_code == 401
        page = browser.get(url, follow_redirects=True)
        assert page.status_code == 200
        assert str(page.url) == f"http://127.0.0.1:{port}/"
        assert browser.get(f"http://127.0.0.1:{port}/api/state").status_code == 200
    gp.proc.send_signal(signal.SIGTERM)
    assert gp.proc.wait(T) == 0
    assert gp.out["stderr"].count(token) == 1


def test_cli_operator_token_from_env_is_not_printed(
    spawn: Callable[..., GatewayProcess],
) -> None:
    gp = spawn(
        "--listen", "127.0.0.1:0", "--no-auth", env=_env(SLED_GATEWAY_OPERATOR_TOKEN="op-t0k")
    )
    port = gp.port()
    headers = {"Authorization": "Bearer op-t0k"}
    assert httpx.get(f"http://127.0.0.1:{port}/api/state", headers=headers).status_code == 200
    gp.proc.send_signal(signal.SIGTERM)
    assert gp.proc.wait(T) == 0
    assert "op-t0k" not in gp.out["stderr"] + gp.out["stdout"]


def test_cli_port_in_use_exits_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "run_gateway.py"),
                "--no-auth",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=6 * T,
            env=_env(),
            cwd=ROOT,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "--listen" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_cleanly_on_signal(
    spawn: Callable[..., GatewayProcess], sig: int
) -> None:
    gp = spawn("--listen", "127.0.0.1:0", "--auto", "approve", env=_env(SLED_GATEWAY_TOKEN=TOKEN))
    port = gp.port()
    base = f"ws://127.0.0.1:{port}/api/sled-uplink"

    async def scenario() -> None:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{base}?token=nope"):
                pass
        assert refused.value.response.status_code == 401
        async with connect(f"{base}?token={TOKEN}") as ws:
            await ws.send(frame("identity", "identity", {"project": "cli"}))
            await ws.send(perm_request("r1"))
            assert await recv(ws) == {"type": "perm_response", "req_id": "r1", "payload": APPROVE}
            stopped_at = time.monotonic()
            gp.proc.send_signal(sig)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), T)
            assert closed.value.rcvd is not None
            if sig == signal.SIGTERM:  # a drain: its one sled closed first, with the hint
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                    1012,
                    "retry_after=10",
                )
            else:
                assert closed.value.rcvd.code == 1001
            assert await asyncio.to_thread(gp.proc.wait, T) == 0
            assert time.monotonic() - stopped_at < 5

    run(scenario())
    assert TOKEN not in gp.out["stderr"]
    assert "token=***" in gp.out["stderr"]
    assert "Traceback" not in gp.out["stderr"]


def test_cli_interactive_prompt(spawn: Callable[..., GatewayProcess]) -> None:
    gp = spawn("--listen", "127.0.0.1:0", "--token", TOKEN, "--interactive")
    port = gp.port()

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}") as ws:
            await ws.send(frame("identity", "identity", {"project": "cli"}))
            await ws.send(perm_request("r1", "Edit", {"file": "a.py"}))
            await asyncio.to_thread(gp.wait_for, r"always \[a\]\?", "stdout")
            gp.type("y")
            assert await recv(ws) == {"type": "perm_response", "req_id": "r1", "payload": APPROVE}
        gp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.proc.wait, T) == 0

    run(scenario())


def test_a_drain_lets_a_sent_relay_be_answered_and_hints_a_retry_for_new_ones(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    # A relay already on the sled's wire when the drain reaches its session is answered
    # (a 502 for a call the sled ran would invite running it twice); one that arrives
    # while the session waits to close is not sent, and says to retry.
    gw = make_reference_gateway()

    async def scenario() -> None:
        async with sled(gw, "p") as ws, httpx.AsyncClient(timeout=T, headers=api(gw)) as http:
            sent = asyncio.create_task(http.post(gw.mcp_url("p"), content='{"id":1}'))
            request = await recv(ws)
            draining = asyncio.wrap_future(gw.drain(0))
            await asyncio.sleep(0.3)  # the drain is waiting on the relay
            late = await http.post(gw.mcp_url("p"), content='{"id":2}')
            assert late.status_code == 503
            assert late.headers["retry-after"] == "1"
            await ws.send(frame("mcp_response", request["req_id"], {"ok": True}))
            answered = await sent
            assert answered.status_code == 200, answered.text
            assert answered.json() == {"ok": True}
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), T)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            await asyncio.wait_for(draining, T)

    run(scenario())
