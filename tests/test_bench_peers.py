"""The ingress's floor (``bench.peers relay``) relays like the ingress and answers in its shape.

``bench.paths`` measures target 1's floor with it: were its answer smaller than the
ingress's, or its request never to reach the gateway, the floor would measure less
work than the ingress does. Real peers, as the bench starts them: the WebSocket
gateway peer and the relay, each in its own process; the figures are not asserted.
"""

from __future__ import annotations

import httpx
import pytest

from actors.ingress import permission_answer
from bench.run import peer, ws_url
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
