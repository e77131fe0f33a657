"""The bench's own parts measure what they claim to: the ingress's floor
(``bench.peers relay``) and the bare hop (``bench.peers bare-relay``) relay to the
gateway peer and answer in the ingress's shape, and target 4's probe decides through a
real gateway with either of its clients; py-spy, in ``bench.profile_paths``, samples a
real gateway's decision path.

Were a floor's answer smaller than the ingress's, or its request never to reach the
gateway, it would measure less work than the ingress does; were the light client's
probe to skip a step, its ratio would not be target 4's. Real peers and a real
gateway, as the bench starts them; the figures are not asserted.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.ingress import permission_answer
from bench.gateway_fleet import TOKEN, gateway_process, operator_client, round_trips, wait_http
from bench.paths import report
from bench.peers import run_loop
from bench.run import REPO, peer, ws_url
from protocol import Decision, Outcome, Reason
from tests.conftest import scaled

pytestmark = pytest.mark.timeout(60)

REQUEST = {"tool_name": "Bash", "tool_input": {"command": "ls -la"}}


def test_the_floor_relays_to_the_gateway_and_answers_in_the_ingress_shape() -> None:
    with peer("gateway", "--auto", "approve") as gw_port, peer("relay", ws_url(gw_port)) as port:
        answers = [
            httpx.post(f"http://127.0.0.1:{port}/permission", json=REQUEST, timeout=scaled(5))
            for _ in range(3)
        ]
    ingress = permission_answer(
        Outcome("id", Decision.APPROVE, Reason.GATEWAY), REQUEST["tool_input"]
    )
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body.keys() == ingress.keys()
        assert {k: v for k, v in body.items() if k != "request_id"} == {
            k: v for k, v in ingress.items() if k != "request_id"
        }
    assert len({answer.json()["request_id"] for answer in answers}) == 3, "one frame each"


def test_the_floor_answers_504_when_the_gateway_does_not_answer() -> None:
    """A gateway that stopped answering does not hold the bench's client for ever."""
    with (
        peer("gateway", "--auto", "silent") as gw_port,
        peer("relay", ws_url(gw_port), "--timeout", "0.5") as port,
    ):
        answer = httpx.post(f"http://127.0.0.1:{port}/permission", json=REQUEST, timeout=scaled(10))
    assert answer.status_code == 504, answer.text
    assert answer.json() == {"error": "the gateway did not answer"}


def test_the_bare_relay_sends_one_frame_a_request_and_answers_each_in_the_ingress_shape() -> None:
    """The hop with no parts (``bench.peers bare-relay``) still relays: with a gateway
    that never answers, no request is answered; with one that does, each of several
    requests on several connections, some pipelined, gets one answer of the ingress's
    keys, so its figure is a round trip through the gateway, not a local echo."""
    request = httpx.Request("POST", "http://x/permission", json=REQUEST)
    raw = (
        b"POST /permission HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(request.content), request.content)
    )
    with (
        peer("gateway", "--auto", "silent") as gw_port,
        peer("bare-relay", ws_url(gw_port)) as port,
        socket.create_connection(("127.0.0.1", port)) as silent,
    ):
        silent.sendall(raw)
        silent.settimeout(1.0)
        with pytest.raises(TimeoutError):
            silent.recv(1)
    with (
        peer("gateway", "--auto", "approve") as gw_port,
        peer("bare-relay", ws_url(gw_port)) as port,
    ):
        ingress = permission_answer(
            Outcome("id", Decision.APPROVE, Reason.GATEWAY), {"command": "ls"}
        )
        with httpx.Client(timeout=scaled(5)) as client:
            for _ in range(3):
                body = client.post(f"http://127.0.0.1:{port}/permission", json=REQUEST).json()
                assert body.keys() == ingress.keys()
                assert body["decision"] == "approve"
        with socket.create_connection(("127.0.0.1", port)) as pipelined:
            pipelined.sendall(raw * 3)  # three requests in one write: three answers
            pipelined.settimeout(scaled(5))
            received = b""
            while received.count(b"HTTP/1.1 200 OK") < 3:
                chunk = pipelined.recv(65536)
                assert chunk, received
                received += chunk
            assert received.count(b'"behavior": "allow"') == 3


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_the_gateway_probe_decides_through_a_real_gateway_with_either_client(
    client: str, tmp_path: Path
) -> None:
    """Target 4's probe (``bench.gateway_fleet.round_trips``) with each of its clients:
    every sample is a request the gateway registered, a decision it accepted and
    committed, and the approval the probe's sled received (the probe raises on
    anything else), so the light client's figure is the same round trip as httpx's."""
    with gateway_process(tmp_path, 1) as (_, port):
        base = f"http://127.0.0.1:{port}"
        run_loop(wait_http(base))
        url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
        times, _retries = run_loop(round_trips(base, url, 5, None, client))
        state = run_loop(_audit(base))
    assert len(times) == 5
    decided = [row for row in state if row["project"] == "probe"]
    assert len(decided) == 10, decided  # the 5 samples and the 5 warm-ups, each committed
    assert {row["decision"] for row in decided} == {"approve"}


async def _audit(base: str) -> list[dict[str, Any]]:
    async with operator_client(base) as http:
        response = await http.get("/api/audit", params={"limit": "100"})
        response.raise_for_status()
        body = response.json()
        return body["entries"] if isinstance(body, dict) else body


@pytest.mark.parametrize("kind", ["http", "jsonrpc"])
def test_the_raw_servers_answer_with_a_length_as_the_uplink_and_the_gateway_do(kind: str) -> None:
    """A raw baseline that answers chunked sends more bytes in more writes than the
    ingress and the gateway, whose answers carry a length: a slower baseline flatters
    every ratio against it."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
    with peer(kind) as port:
        answer = httpx.post(f"http://127.0.0.1:{port}/", json=body, timeout=scaled(5))
    assert answer.status_code == 200
    assert "transfer-encoding" not in answer.headers
    assert answer.headers["content-length"] == str(len(answer.content))


def test_a_ratio_that_rounds_to_its_bound_is_printed_with_the_digit_that_decides_it() -> None:
    """A miss printed as 1.20 against a bound of 1.2 reads as met; its third digit does not."""
    assert report("", 1.2049, 1.0, 1.2) == "1.205× (target ≤ 1.2×: MISS)"
    assert report("", 1.196, 1.0, 1.2) == "1.196× (target ≤ 1.2×: ok)"
    assert report("", 0.7951, 1.0, 0.8, above=True) == "0.795× (target ≥ 0.8×: MISS)"
    assert report("", 1.31, 1.0, 1.2) == "1.31× (target ≤ 1.2×: MISS)"


def test_py_spy_samples_the_gateways_decision_path_from_outside_the_process(
    tmp_path: Path,
) -> None:
    """``bench.profile_paths gateway --sampler py-spy``: py-spy attaches to a real gateway
    that is deciding, and the summary names the decision route and the store's writer
    thread, on the loop and off it. A sampler that saw nothing, or read its own stacks
    wrong, would name neither."""
    out = tmp_path / "gateway.collapsed.txt"
    command = ["-m", "bench.profile_paths", "gateway", "--sampler", "py-spy", "--n", "400"]
    done = subprocess.run(
        [sys.executable, *command, "--top", "60", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(50),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stacks = out.read_text()
    assert "_post_decision" in stacks, "the decision POST's handler, on the loop"
    assert "sled_gateway/store/sql.py" in stacks, "the store's writer thread"
    widest = done.stdout.split("widest frames")[1].split("innermost frames")[0]
    assert "sled_gateway/http/routes.py(Routes._post_decision)" in widest
    per_request = re.search(r"(\d+) µs under the GIL a request", done.stdout)
    assert per_request is not None and int(per_request[1]) > 0, done.stdout
