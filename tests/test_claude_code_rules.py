"""A grammar rule made over the API answers the real Claude Code binary's requests.

``claude -p`` (the pinned npm package) runs offline against the scripted
loopback Messages API, asks its permission prompt tool on the real uplink,
which asks the real reference gateway. The project rule ``Bash(mkdir d*)``,
made with ``POST /api/rules``, answers ``mkdir d1`` with no pending request;
``mkdir d2 && rm -rf x`` rides on that prefix and still reaches a person (who
denies it here, so ``d2`` is never made). Without the binary this skips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from actors import Uplink
from sled_gateway import Gateway
from tests.support.claude import SKIP_REASON, Decider, claude_available
from tests.support.fake_anthropic import FakeAnthropic
from tests.test_claude_code import (  # the same fixtures and runner as the other Claude tests
    PROJECT,
    T,
    connected,
    gw,
    mcp_args,
    run_claude,
    tool_result_texts,
    uplink_for,
    work,
)

if not claude_available():
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.timeout(180)
__all__ = ["connected", "gw", "uplink_for", "work"]  # fixtures, used by name


def test_a_project_rule_lets_claude_mkdir_without_a_person_but_not_a_compound(
    gw: Gateway,
    connected: Callable[..., Uplink],
    decider: Callable[..., Decider],
    work: Path,
) -> None:
    uplink = connected()
    with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=T) as client:
        made = client.post(
            "/api/rules", json={"rule": "Bash(mkdir d*)", "action": "allow", "project": PROJECT}
        )
        assert made.status_code == 201, made.text
    rule_id = made.json()["rule"]["id"]
    person = decider("deny")
    script = [
        [("Bash", {"command": "mkdir d1", "description": "Make d1"})],
        [("Bash", {"command": "mkdir d2 && rm -rf x", "description": "Make d2, remove x"})],
        "Done.",
    ]
    with FakeAnthropic(script) as model:
        result = run_claude(model, work, mcp_args(uplink))
    assert result.returncode == 0, result.stderr
    assert (work / "d1").is_dir()
    assert not (work / "d2").exists()
    first, second = model.tool_use_ids
    # Only the compound command was ever pending: a person saw it and denied it.
    assert [item.req_id for item in person.seen] == [second]
    rows = {row["req_id"]: row for row in gw.audit()}
    assert (rows[first]["decision"], rows[first]["by"]) == ("always_allow", f"rule:{rule_id}")
    assert rows[second]["decision"] == "deny" and not rows[second]["by"].startswith("rule:")
    assert [is_error for is_error, _ in tool_result_texts(model)] == [False, True]
