"""Claude Code's own ``permission_suggestions``, from its PermissionRequest hook to the card.

The uplink forwards the allow rules Claude Code suggests as the optional
``suggestions`` key of ``perm_request`` (absent when there are none, so the
frame keeps its original shape); the gateway offers each one for "always
allow" only when it parses, names more than a whole tool and allows the very
request it came with. A sled cannot get a card to offer a rule for anything
else, and a decision cannot make a rule the card did not offer.

Real parts: the real uplink with its ingress (``POST /hooks/claude-code``), the
real gateway, and a raw WebSocket client playing a hostile sled.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from actors import Uplink
from protocol import Kind, PermRequest, parse, serialize
from protocol.claude_code import claude_suggestions, parse_hook
from protocol.frames import MAX_SUGGESTION_CHARS, MAX_SUGGESTIONS, read_suggestions
from sled_gateway import Gateway
from tests.test_gateway import TOKEN, T, frame, recv, run, sled, wait_state
from tests.test_store import frame_payload

pytestmark = pytest.mark.timeout(60)
PROJECT = "suggest-sled"

# As Claude Code sends them with a PermissionRequest hook's input.
CLAUDE_SUGGESTIONS = [
    {
        "type": "addRules",
        "rules": [{"toolName": "Bash", "ruleContent": "npm run test:*"}],
        "behavior": "allow",
        "destination": "localSettings",
    },
    {"type": "setMode", "mode": "acceptEdits", "destination": "session"},
    {"type": "addDirectories", "directories": ["/tmp"], "destination": "session"},
    {"type": "addRules", "rules": [{"toolName": "Bash"}], "behavior": "allow"},
    {
        "type": "addRules",
        "rules": [{"toolName": "Bash", "ruleContent": "rm:*"}],
        "behavior": "deny",
    },
]


@pytest.fixture
def gw(make_reference_gateway: Callable[..., Gateway]) -> Gateway:
    return make_reference_gateway(token=TOKEN)


def http(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T)


def test_claude_suggestions_keep_only_allow_rules_that_name_a_use() -> None:
    assert claude_suggestions(CLAUDE_SUGGESTIONS) == ("Bash(npm run test:*)",)
    for junk in (None, "Bash(ls)", {"type": "addRules"}, [1, "x", None], [{"type": "addRules"}]):
        assert claude_suggestions(junk) == ()
    many = [
        {
            "type": "addRules",
            "behavior": "allow",
            "rules": [{"toolName": "Bash", "ruleContent": f"cmd{i}:*"} for i in range(50)]
            + [{"toolName": "Bash", "ruleContent": "x" * 5000}],
        }
    ]
    assert len(claude_suggestions(many)) == MAX_SUGGESTIONS
    body = {
        "hook_event_name": "PermissionRequest",
        "tool_name": "Bash",
        "tool_input": {"command": "npm run test"},
        "permission_suggestions": CLAUDE_SUGGESTIONS,
    }
    assert parse_hook(body).suggestions == ("Bash(npm run test:*)",)
    # A PreToolUse hook carries none; one that claims some is not believed.
    assert parse_hook({**body, "hook_event_name": "PreToolUse"}).suggestions == ()


def test_perm_request_carries_suggestions_only_as_an_optional_extra_key() -> None:
    plain = json.loads(serialize(PermRequest("Bash", {"command": "ls"}).envelope("r1")))
    assert plain["payload"] == {"tool_name": "Bash", "tool_input": {"command": "ls"}}
    hinted = serialize(PermRequest("Bash", {"command": "ls"}, ("Bash(ls:*)",)).envelope("r2"))
    assert json.loads(hinted)["payload"]["suggestions"] == ["Bash(ls:*)"]
    env = parse(hinted)
    assert env.type == Kind.PERM_REQUEST
    assert PermRequest.from_envelope(env).suggestions == ("Bash(ls:*)",)
    # What a gateway reads from a sled: bounded, strings only, never a reason to refuse.
    assert read_suggestions("Bash(ls)") == ()
    assert read_suggestions([1, None, "", "a", "a", "x" * (MAX_SUGGESTION_CHARS + 1)]) == ("a",)
    assert len(read_suggestions([f"r{i}" for i in range(100)])) == MAX_SUGGESTIONS


def test_the_hooks_suggestion_reaches_the_card_and_always_allow_makes_it(
    gw: Gateway, make_uplink: Callable[..., Uplink]
) -> None:
    uplink = make_uplink(gw.url_for_sleds(), project=PROJECT, listen="127.0.0.1:0")
    assert uplink.wait_connected(T)
    url = f"http://127.0.0.1:{uplink._ingress.port}/hooks/claude-code"
    body = {
        "session_id": "s1",
        "hook_event_name": "PermissionRequest",
        "tool_name": "Bash",
        "tool_input": {"command": "npm run test -- --ci"},
        "tool_use_id": "toolu_s1",
        "permission_suggestions": CLAUDE_SUGGESTIONS,
    }
    answers: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: answers.append(httpx.post(url, json=body, timeout=6 * T)), daemon=True
    )
    caller.start()
    state = gw.wait_for(lambda s: any(p["req_id"] == "toolu_s1" for p in s["pending"]), T)
    [item] = [p for p in state["pending"] if p["req_id"] == "toolu_s1"]
    assert item["suggested_rules"] == [
        {"rule": "Bash(npm run test -- --ci)", "kind": "exact"},
        {"rule": "Bash(npm run:*)", "kind": "prefix"},
        {"rule": "Bash(npm run test:*)", "kind": "claude"},
    ]
    with http(gw) as client:
        decided = client.post(
            f"/api/permissions/{PROJECT}/toolu_s1",
            json={"decision": "always_allow", "rule": "Bash(npm run test:*)"},
        )
        assert decided.status_code == 200, decided.text
    caller.join(3 * T)
    assert answers and answers[0].status_code == 200
    assert answers[0].json()["hookSpecificOutput"]["decision"]["behavior"] == "allow"
    [made] = gw.rules()
    assert (made["rule"], made["project"], made["action"]) == (
        "Bash(npm run test:*)",
        PROJECT,
        "allow",
    )
    # The next command under that rule is answered by it, at once.
    again = httpx.post(
        url,
        json={**body, "tool_use_id": "toolu_s2", "tool_input": {"command": "npm run test -- -u"}},
        timeout=3 * T,
    )
    assert again.json()["hookSpecificOutput"]["decision"]["behavior"] == "allow"
    [row] = [a for a in gw.audit(project=PROJECT) if a["req_id"] == "toolu_s2"]
    assert row["by"] == f"rule:{made['id']}"


def test_a_sled_cannot_get_a_card_to_offer_a_rule_for_something_else(gw: Gateway) -> None:
    hostile = [
        "Bash",  # every Bash command
        "Bash(*)",  # the same, spelled otherwise
        "Bash(rm -rf:*)",  # another command
        "Read(//**)",  # another tool
        "Bash(npm run test",  # does not parse
        "Bash(npm run test && rm -rf:*)",  # does not allow this request's parts
        "Bash(npm run test:*)",  # the one that covers it
    ]

    async def scenario() -> dict[str, Any]:
        async with sled(gw, PROJECT) as ws:
            payload = {
                "tool_name": "Bash",
                "tool_input": {"command": "npm run test"},
                "suggestions": [*hostile, 7, None, "y" * 5000],
            }
            await ws.send(frame("perm_request", "h1", payload))
            # A payload whose suggestions are not a list is still an ordinary request.
            odd = {"tool_name": "Bash", "tool_input": {"command": "ls"}, "suggestions": "Bash"}
            await ws.send(frame("perm_request", "h2", odd))
            state = await wait_state(
                gw, lambda s: {"h1", "h2"} <= {p["req_id"] for p in s["pending"]}
            )
            with http(gw) as client:
                for rule in hostile[:-1]:
                    refused = await asyncio.to_thread(
                        client.post,
                        f"/api/permissions/{PROJECT}/h1",
                        json={"decision": "always_allow", "rule": rule},
                    )
                    assert refused.status_code == 400, (rule, refused.text)
                assert gw.is_pending(PROJECT, "h1") and gw.rules() == []
                ok = await asyncio.to_thread(
                    client.post,
                    f"/api/permissions/{PROJECT}/h1",
                    json={"decision": "always_allow", "rule": "Bash(npm run test:*)"},
                )
                assert ok.status_code == 200, ok.text
            assert await recv(ws) == frame_payload("h1", "always_allow")
            return state

    state = run(scenario())
    offered = {p["req_id"]: p["suggested_rules"] for p in state["pending"]}
    assert offered["h1"] == [
        {"rule": "Bash(npm run test)", "kind": "exact"},
        {"rule": "Bash(npm run:*)", "kind": "prefix"},
        {"rule": "Bash(npm run test:*)", "kind": "claude"},
    ]
    assert [s["kind"] for s in offered["h2"]] != [] and all(
        s["kind"] != "claude" for s in offered["h2"]
    )
    assert [r["rule"] for r in gw.rules()] == ["Bash(npm run test:*)"]


def test_the_agent_sdks_suggestions_are_read_the_same_way() -> None:
    from claude_agent_sdk.types import (
        PermissionRuleValue,
        PermissionUpdate,
        ToolPermissionContext,
    )

    from actors.agent_sdk import _suggestions

    context = ToolPermissionContext(
        suggestions=[
            PermissionUpdate(
                type="addRules",
                rules=[PermissionRuleValue(tool_name="Bash", rule_content="npm run test:*")],
                behavior="allow",
                destination="localSettings",
            ),
            PermissionUpdate(type="setMode", mode="acceptEdits"),
            PermissionUpdate(type="addRules", rules=None, behavior="allow"),  # to_dict refuses
        ]
    )
    assert _suggestions(context) == ("Bash(npm run test:*)",)
    assert _suggestions(object()) == ()
