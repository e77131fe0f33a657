"""The console's audit and rules views in headless chromium (Debian's, via Playwright).

A gateway with a database that already holds an earlier run's decisions, a
real uplink connected to it, and the console page: the audit log pages and
filters; clicking "Always allow" makes a rule that is listed with who made it,
answers the next identical request on its own (and the audit says so); the
rule is revoked with its button; a deny rule is added with the form.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
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
from tests.test_store import _fill

pytestmark = pytest.mark.timeout(120)
PROJECT = "console-sled"


def test_console_audit_and_rules_views(
    make_uplink: Callable[..., Uplink],
    page: Any,
    tmp_path: Path,
) -> None:
    expect = sync_api.expect
    db = tmp_path / "console.db"
    _fill(db, {"alpha": 40, "beta": 20})  # an earlier run's decisions
    # audit_retention_days=0: the earlier run's rows are from January 2026.
    gw = Gateway(token=TOKEN, db=db, heartbeat_interval=0.3, audit_retention_days=0).start()
    try:
        uplink = make_uplink(gw.url_for_sleds(), project=PROJECT, heartbeat_interval=0.1)
        assert uplink.wait_connected(T)
        page.goto(gw.console_url())
        rows = page.locator("#audit tbody tr[data-audit-id]")

        # Paging: 50 newest, then the remaining 10, then back.
        expect(rows).to_have_count(50, timeout=UI_WAIT_MS)
        expect(rows.first).to_have_attribute("data-req-id", "beta-19", timeout=UI_WAIT_MS)
        page.click("#audit-older")
        expect(rows).to_have_count(10, timeout=UI_WAIT_MS)
        expect(rows.last).to_have_attribute("data-req-id", "alpha-0")
        assert page.is_disabled("#audit-older")
        page.click("#audit-newer")
        expect(rows).to_have_count(50, timeout=UI_WAIT_MS)

        # The filter: one sled's rows only.
        page.fill("#audit-filter input[name=project]", "beta")
        page.click("#audit-apply")
        expect(rows).to_have_count(20, timeout=UI_WAIT_MS)
        assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.project)")) == {"beta"}
        page.select_option("#audit-filter select[name=decision]", "deny")
        page.click("#audit-apply")
        expect(rows).to_have_count(7, timeout=UI_WAIT_MS)  # beta-0, -3, ..., -18
        page.fill("#audit-filter input[name=project]", "")
        page.select_option("#audit-filter select[name=decision]", "")
        page.click("#audit-apply")
        expect(rows).to_have_count(50, timeout=UI_WAIT_MS)

        # Always allow from the console makes a rule, listed with who made it.
        command = {"command": "make deploy", "description": "ship it"}
        req = f"req-{uuid.uuid4().hex[:8]}"
        first = uplink.request_permission("Bash", command, request_id=req)
        page.click(
            f"button{_sel(data_action='always_allow', data_project=PROJECT, data_req_id=req)}",
            timeout=UI_WAIT_MS,
        )
        assert first.result(T).decision is Decision.ALWAYS_ALLOW
        rule_row = page.locator("#rules tbody tr[data-rule-id]")
        expect(rule_row).to_have_count(1, timeout=UI_WAIT_MS)
        text = rule_row.inner_text()
        assert "make deploy" in text
        assert PROJECT in text
        expect(rule_row.locator("td[data-field=created-by]")).to_have_text("console")
        expect(rule_row.locator("td[data-field=action]")).to_have_text("allow")
        rule_id = rule_row.get_attribute("data-rule-id")
        decided = page.locator(f"#audit tbody tr{_sel(data_req_id=req)}")
        expect(decided.locator("td[data-field=decision]")).to_have_text(
            "always_allow", timeout=UI_WAIT_MS
        )
        expect(decided.locator("td[data-field=by]")).to_have_text("console")

        # The next identical request is answered by the rule, and the log says so.
        again = f"req-{uuid.uuid4().hex[:8]}"
        assert (
            uplink.request_permission("Bash", command, request_id=again).result(T).decision
            is Decision.ALWAYS_ALLOW
        )
        by_rule = page.locator(f"#audit tbody tr{_sel(data_req_id=again)} td[data-field=by]")
        expect(by_rule).to_have_text(f"rule:{rule_id}", timeout=UI_WAIT_MS)

        # Revoked with its button: gone from the active list, kept with who and when.
        page.click(f"#rules button[data-revoke='{rule_id}']", timeout=UI_WAIT_MS)
        expect(rule_row).to_have_count(0, timeout=UI_WAIT_MS)
        page.check("#show-revoked")
        revoked = page.locator(f"#rules tr[data-rule-id='{rule_id}'] td[data-field=status]")
        expect(revoked).to_contain_text("revoked by console", timeout=UI_WAIT_MS)
        page.uncheck("#show-revoked")
        listed = httpx.get(
            f"{gw.http_url}/api/rules?include_revoked=1", headers=gw.api_headers(), timeout=T
        ).json()["rules"]
        assert listed[0]["revoked_by"] == "console"

        # A deny rule from the form, for every sled.
        page.select_option("#rule-form select[name=rule_action]", "deny")
        page.fill("#rule-form input[name=tool_name]", "Bash")
        page.fill("#rule-form input[name=key]", "rm -rf /")
        page.click("#add-rule")
        expect(rule_row).to_have_count(1, timeout=UI_WAIT_MS)
        expect(rule_row.locator("td[data-field=action]")).to_have_text("deny")
        assert "every sled" in rule_row.inner_text()
        outcome = uplink.request_permission(
            "Bash", {"command": "rm -rf /"}, request_id="danger"
        ).result(T)
        assert outcome.decision is Decision.DENY
        denied = page.locator(f"#audit tbody tr{_sel(data_req_id='danger')} td[data-field=by]")
        expect(denied).to_have_text(
            f"rule:{rule_row.get_attribute('data-rule-id')}", timeout=UI_WAIT_MS
        )
        assert page.locator("#banner").is_hidden()
        page.screenshot(path=str(tmp_path / "console-rules-audit.png"), full_page=True)
    finally:
        gw.stop()
