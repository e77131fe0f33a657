"""The console's rules in Claude Code's grammar, in headless chromium (Debian's, via Playwright).

The real gateway, a real uplink connected to it, and the console page: a rule
is added by its text (one that does not parse shows the gateway's position
inline, and nothing is made); the test box shows what the rules make of a
compound command, part by part; "Always allow" on a pending card offers the
request's exact and prefix rules, shows the one it is about to make, and makes
it, so a later command with the same prefix is answered by the rule while a
compound one that rides on it still reaches a person. Text from the sled or the
person is shown with the console's visible escapes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import Uplink
from protocol import Decision
from sled_gateway import Gateway
from tests.test_console_browser import (
    TOKEN,
    UI_WAIT_MS,
    T,
    _sel,
    sync_api,
)

pytestmark = pytest.mark.timeout(120)
PROJECT = "rules-sled"


@pytest.fixture
def gw() -> Iterator[Gateway]:
    gateway = Gateway(token=TOKEN, heartbeat_interval=0.3).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _card(req_id: str) -> str:
    return f".card{_sel(data_project=PROJECT, data_req_id=req_id)}"


def test_a_rule_added_by_its_text_and_a_bad_one_shows_its_position(
    gw: Gateway,
    page: Any,
    tmp_path: Path,
) -> None:
    expect = sync_api.expect
    page.goto(gw.console_url())
    page.wait_for_selector("#rules tbody tr", timeout=UI_WAIT_MS)
    error = page.locator("#grammar-error")

    # Not closed: the gateway's 400 names position 13; it is shown, marked, and nothing is made.
    page.fill("#grammar-form input[name=rule]", "Bash(npm test")
    page.click("#add-grammar-rule")
    expect(error).to_contain_text("position 13", timeout=UI_WAIT_MS)
    expect(error).to_contain_text("not closed")
    expect(error.locator("[data-field=position] mark")).to_have_attribute("title", "position 13")
    assert gw.rules() == []
    assert page.locator("#banner").is_hidden()

    # A relative path rule: refused at the gateway (it has no working directory).
    page.fill("#grammar-form input[name=rule]", "Read(./src/**)")
    page.click("#add-grammar-rule")
    expect(error).to_contain_text("position 5", timeout=UI_WAIT_MS)
    expect(error.locator("[data-field=position] mark")).to_have_text(".")
    assert gw.rules() == []

    # A good one, for one sled: listed as its text, its action and its scope; the error goes.
    page.fill("#grammar-form input[name=rule]", "Bash(npm test:*)")
    page.select_option("#grammar-form select[name=rule_action]", "allow")
    page.fill("#grammar-form input[name=project]", PROJECT)
    page.click("#add-grammar-rule")
    row = page.locator("#rules tbody tr[data-rule-id]")
    expect(row).to_have_count(1, timeout=UI_WAIT_MS)
    expect(row.locator("td[data-field=describes]")).to_have_text("Bash(npm test:*)")
    expect(row.locator("td[data-field=action]")).to_have_text("allow")
    expect(row.locator("td[data-field=scope]")).to_have_text(PROJECT)
    expect(row).to_have_attribute("data-rule-kind", "grammar")
    expect(error).to_be_hidden()
    [made] = gw.rules()
    assert (made["rule"], made["action"], made["project"]) == ("Bash(npm test:*)", "allow", PROJECT)

    # A fleet-wide deny rule; then the test box on a compound command, part by part.
    page.fill("#grammar-form input[name=rule]", "Bash(rm -rf:*)")
    page.select_option("#grammar-form select[name=rule_action]", "deny")
    page.fill("#grammar-form input[name=project]", "")
    page.click("#add-grammar-rule")
    expect(row).to_have_count(2, timeout=UI_WAIT_MS)
    deny_row = page.locator("#rules tbody tr[data-rule-id]", has_text="Bash(rm -rf:*)")
    expect(deny_row.locator("td[data-field=scope]")).to_have_text("every sled")
    expect(deny_row.locator("td[data-field=action]")).to_have_text("deny")

    page.fill("#check-form textarea[name=command]", "npm test && rm -rf x")
    page.fill("#check-form input[name=project]", PROJECT)
    page.click("#check-rules")
    result = page.locator("#check-result")
    expect(result.locator("[data-field=check-decision]")).to_have_text("deny", timeout=UI_WAIT_MS)
    expect(result.locator("[data-field=check-rule]")).to_contain_text("Bash(rm -rf:*)")
    parts = result.locator("tr[data-part]")
    expect(parts).to_have_count(2)
    expect(parts.nth(0).locator("[data-field=command]")).to_have_text("npm test")
    expect(parts.nth(0).locator("[data-field=action]")).to_have_text("allow")
    expect(parts.nth(0).locator("[data-field=rule]")).to_contain_text("Bash(npm test:*)")
    expect(parts.nth(1).locator("[data-field=command]")).to_have_text("rm -rf x")
    expect(parts.nth(1).locator("[data-field=action]")).to_have_text("deny")
    expect(parts.nth(1).locator("[data-field=rule]")).to_contain_text("Bash(rm -rf:*)")
    assert result.locator("[data-field=check-reasons] li").count() >= 1
    page.screenshot(path=str(tmp_path / "console-rules-check.png"), full_page=True)

    # Allowed part, unknown part: a person decides; the hidden character is shown escaped.
    page.fill("#check-form textarea[name=command]", "npm test; echo \u202eevil")
    page.click("#check-rules")
    expect(result.locator("[data-field=check-decision]")).to_contain_text(
        "a person decides", timeout=UI_WAIT_MS
    )
    second = parts.nth(1).locator("[data-field=command]")
    expect(second.locator(".esc")).to_have_text("\\u202e")
    assert "\u202e" not in second.inner_text()

    # The same command for another sled: the project rule does not apply there.
    page.fill("#check-form textarea[name=command]", "npm test -- --watch=false")
    page.fill("#check-form input[name=project]", "another-sled")
    page.click("#check-rules")
    expect(result.locator("[data-field=check-decision]")).to_contain_text(
        "no rule answers", timeout=UI_WAIT_MS
    )
    page.fill("#check-form input[name=project]", PROJECT)
    page.click("#check-rules")
    expect(result.locator("[data-field=check-decision]")).to_have_text("allow", timeout=UI_WAIT_MS)

    # A JSON input for another tool; and one that is not JSON is said so, in the page.
    page.fill("#check-form input[name=tool_name]", "Read")
    page.fill("#check-form textarea[name=command]", '{"file_path": "/etc/passwd"}')
    page.click("#check-rules")
    expect(result.locator("[data-field=check-decision]")).to_contain_text(
        "a person decides", timeout=UI_WAIT_MS
    )
    page.fill("#check-form textarea[name=command]", "{not json")
    page.click("#check-rules")
    expect(result).to_contain_text("not JSON", timeout=UI_WAIT_MS)


def test_always_allow_by_the_prefix_rule_answers_the_next_command_by_rule(
    gw: Gateway,
    make_uplink: Callable[..., Uplink],
    page: Any,
    tmp_path: Path,
) -> None:
    expect = sync_api.expect
    uplink = make_uplink(gw.url_for_sleds(), project=PROJECT, heartbeat_interval=0.1)
    assert uplink.wait_connected(T)
    page.goto(gw.console_url())

    req = f"req-{uuid.uuid4().hex[:8]}"
    first = uplink.request_permission(
        "Bash", {"command": "npm test", "description": "run the tests"}, request_id=req
    )
    card = page.locator(_card(req))
    choice = card.locator("[data-field=allow-choice]")
    expect(choice).to_be_visible(timeout=UI_WAIT_MS)
    # The exact input (the default), the exact rule and the prefix rule are offered.
    radios = choice.locator("input[type=radio]")
    expect(radios).to_have_count(3)
    assert radios.evaluate_all("rs => rs.map(r => [r.value, r.dataset.kind, r.checked])") == [
        ["", "input", True],
        ["Bash(npm test)", "exact", False],
        ["Bash(npm test:*)", "prefix", False],
    ]
    button = card.locator("button[data-action=always_allow]")
    expect(button).to_have_text("Always allow this exact input")

    # Picking the prefix rule shows the rule text before anything is made.
    choice.locator("input[value='Bash(npm test:*)']").check()
    preview = card.locator("[data-field=allow-preview]")
    expect(preview.locator("[data-field=allow-rule]")).to_have_text("Bash(npm test:*)")
    expect(preview).to_contain_text(f"sled {PROJECT}")
    expect(button).to_have_text("Always allow: Bash(npm test:*)")
    page.screenshot(path=str(tmp_path / "console-always-allow-prefix.png"), full_page=True)
    assert gw.rules() == []
    assert not first.done()

    button.click()
    assert first.result(T).decision is Decision.ALWAYS_ALLOW
    [made] = gw.rules()
    assert (made["rule"], made["action"], made["project"]) == ("Bash(npm test:*)", "allow", PROJECT)
    row = page.locator(f"#rules tbody tr[data-rule-id='{made['id']}']")
    expect(row.locator("td[data-field=describes]")).to_have_text(
        "Bash(npm test:*)", timeout=UI_WAIT_MS
    )

    # A later command with that prefix: answered by the rule, never pending.
    later = f"req-{uuid.uuid4().hex[:8]}"
    outcome = uplink.request_permission(
        "Bash", {"command": "npm test -- --watch=false"}, request_id=later
    ).result(T)
    assert outcome.decision.allows
    [row_later] = [a for a in gw.audit(project=PROJECT) if a["req_id"] == later]
    assert row_later["by"] == f"rule:{made['id']}"

    # What rides on the prefix still reaches a person.
    rider = f"req-{uuid.uuid4().hex[:8]}"
    riding = uplink.request_permission(
        "Bash", {"command": "npm test && rm -rf x"}, request_id=rider
    )
    expect(page.locator(_card(rider))).to_be_visible(timeout=UI_WAIT_MS)
    assert gw.is_pending(PROJECT, rider) and not riding.done()
    # A compound command has no prefix rule to offer (only what names it exactly).
    kinds = page.locator(f"{_card(rider)} .allow-choice input[type=radio]").evaluate_all(
        "rs => rs.map(r => r.dataset.kind)"
    )
    assert "prefix" not in kinds
    page.click(f"{_card(rider)} button[data-action=deny]")
    assert riding.result(T).decision is Decision.DENY

    # A rule text made of what the sled sent is shown with visible escapes, never raw.
    bidi = f"req-{uuid.uuid4().hex[:8]}"
    hidden = uplink.request_permission("Bash", {"command": "echo \u202eabc"}, request_id=bidi)
    exact = page.locator(f"{_card(bidi)} .allow-choice input[data-kind=exact]")
    expect(exact).to_have_count(1, timeout=UI_WAIT_MS)
    exact.check()
    bidi_button = page.locator(f"{_card(bidi)} button[data-action=always_allow]")
    expect(bidi_button.locator(".esc")).to_have_text("\\u202e")
    expect(page.locator(f"{_card(bidi)} [data-field=allow-rule] .esc")).to_have_text("\\u202e")
    assert "\u202e" not in page.locator(_card(bidi)).inner_text()
    page.click(f"{_card(bidi)} button[data-action=deny]")
    assert hidden.result(T).decision is Decision.DENY

    # Outside the sandbox the rule may not answer: the card names the rule that would have.
    outside = f"req-{uuid.uuid4().hex[:8]}"
    asked = uplink.request_permission(
        "Bash",
        {"command": "npm test -- --ci", "dangerouslyDisableSandbox": True},
        request_id=outside,
    )
    would = page.locator(f"{_card(outside)} [data-field=would-match]")
    expect(would).to_contain_text("Bash(npm test:*)", timeout=UI_WAIT_MS)
    expect(would).to_contain_text(f"Rule #{made['id']}")
    expect(would).to_contain_text("outside the sandbox")
    page.click(f"{_card(outside)} button[data-action=deny]")
    assert asked.result(T).decision is Decision.DENY
    assert page.locator("#banner").is_hidden()
