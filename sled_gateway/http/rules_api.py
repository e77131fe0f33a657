"""The rules API in Claude Code's grammar: make, check, import, and replay against the audit.

==================================  =====================================================
``POST /api/rules`` ``{"rule"...}``  one rule in the grammar (the ``{tool_name, key}`` form
                                    stays in :mod:`sled_gateway.http.routes`)
``POST /api/rules/check``           what the rules make of a request, and why
``POST /api/rules/import``          a Claude Code ``settings.json`` ``permissions`` block,
                                    all or nothing
``GET /api/rules/impact``           how many past requests a rule would have decided
==================================  =====================================================

Every rule text goes through :func:`protocol.rules.parse_rule`, the one parser
the policy matches with, so a rule accepted here is the rule that is enforced;
one that does not parse is a ``400`` naming the position and the reason.
Who may do what is the approvals service's call (:meth:`Approvals.authorize`):
making rules needs the admin role, checking and replaying them a viewer's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol import JSON, canonical_json
from protocol.rules import Action, PermissionRule, RuleSet, RuleSyntaxError, parse_rule
from sled_gateway.approvals import Approvals, Forbidden
from sled_gateway.auth import principal_of
from sled_gateway.http.errors import error, forbidden
from sled_gateway.policy import grammar_tool, sandbox_off
from sled_gateway.principal import Role
from sled_gateway.store import ALLOW, ASK, DENY, MAX_PAGE, AuditEntry, Rule, Store

ACTIONS = (ALLOW, ASK, DENY)
#: Longest rule text taken (the grammar's own bound on a command is 10,000 characters).
MAX_RULE_TEXT = 10_000
#: Most entries one import takes (Claude Code settings files hold tens).
MAX_IMPORT_ENTRIES = 5000
#: How far back ``/api/rules/impact`` replays: the newest rows of the audit log.
IMPACT_ROWS = 10_000
IMPACT_EXAMPLES = 5
_MAX_REASON = 1000
_MAX_PROJECT = 200
#: The keys of a Claude Code ``permissions`` block that hold no rules (left alone).
_SETTINGS_NOT_RULES = frozenset(
    {"defaultMode", "additionalDirectories", "disableBypassPermissionsMode"}
)

JsonBody = Callable[[Request, str], Any]


class BadInput(ValueError):
    """A 400: the message, and what the client needs to fix it."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra


def parse(text: object) -> tuple[str, PermissionRule]:
    """A rule text, checked and parsed: ``(its canonical text, parsed)``; :class:`BadInput`."""
    if not isinstance(text, str) or not text or len(text) > MAX_RULE_TEXT:
        raise BadInput(f"rule must be a non-empty string of at most {MAX_RULE_TEXT} characters")
    try:
        parsed = parse_rule(text)
    except RuleSyntaxError as exc:
        raise BadInput(
            f"rule {text[:200]!r} does not parse: at position {exc.position}: {exc.reason}",
            position=exc.position,
            reason=exc.reason,
        ) from None
    except ValueError as exc:
        raise BadInput(f"rule {text[:200]!r} does not parse: {exc}", reason=str(exc)) from None
    return parsed.text, parsed


def _action(value: object) -> str:
    if value not in ACTIONS:
        raise BadInput(f"action must be one of {list(ACTIONS)}, not {str(value)[:40]!r}")
    assert isinstance(value, str)
    return value


def _project(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > _MAX_PROJECT):
        raise BadInput("project must be a sled's project name, or null for every sled")
    return value


def _reason(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > _MAX_REASON):
        raise BadInput(f"reason must be a string of at most {_MAX_REASON} characters")
    return value


def draft(text: str, action: str, project: str | None, reason: str | None, origin: str) -> Rule:
    """A grammar rule to commit (its id and author are set by the store and approvals)."""
    return Rule(
        0, project, grammar_tool(text), None, action, time.time(), "", origin, reason, rule=text
    )


class RulesApi:
    """The handlers of the grammar rules, over the store (its policy) and approvals."""

    def __init__(self, store: Store, approvals: Approvals, json_body: JsonBody) -> None:
        self.store = store
        self.approvals = approvals
        self._json_body = json_body

    async def post_grammar_rule(self, request: Request, body: Mapping[str, Any]) -> Response:
        """``POST /api/rules`` with ``"rule"`` (the routes module hands the body over)."""
        unknown = set(body) - {"rule", "action", "project", "reason"}
        try:
            if unknown:
                raise BadInput(f"unknown field(s) {sorted(unknown)[:10]}")
            text, _ = parse(body.get("rule"))
            made = draft(
                text,
                _action(body.get("action")),
                _project(body.get("project")),
                _reason(body.get("reason")),
                "operator",
            )
        except BadInput as exc:
            return error(400, str(exc), **exc.extra)
        try:
            rule = await self.approvals.add_rule(made, principal_of(request))
        except Forbidden as exc:
            return forbidden(exc)
        return JSONResponse({"ok": True, "rule": rule.to_json()}, status_code=201)

    async def check(self, request: Request) -> Response:
        """``POST /api/rules/check {"tool_name", "tool_input", "project"}``."""
        shape = 'body must be JSON: {"tool_name": str, "tool_input": object, "project": str}'
        try:
            self.approvals.authorize(
                principal_of(request), Role.VIEWER, "check rules", somewhere=True
            )
        except Forbidden as exc:
            return forbidden(exc)
        body, unreadable = await self._json_body(request, shape)
        if unreadable is not None:
            return unreadable  # type: ignore[no-any-return]
        if not isinstance(body, dict):
            return error(400, shape)
        tool, tool_input, project = (
            body.get("tool_name"),
            body.get("tool_input"),
            body.get("project"),
        )
        if not isinstance(tool, str) or not tool or len(tool) > 200:
            return error(400, "tool_name must be a non-empty string (at most 200 characters)")
        if not isinstance(tool_input, dict):
            return error(400, "tool_input must be a JSON object (the tool's input)")
        if not isinstance(project, str) or not project or len(project) > _MAX_PROJECT:
            return error(400, "project must be a sled's project name")
        try:
            self.approvals.authorize(principal_of(request), Role.VIEWER, "check rules", project)
        except Forbidden as exc:
            return forbidden(exc)
        outcome = self.store.policy.explain(project, tool, tool_input)
        return JSONResponse(
            {"project": project, "tool_name": tool, **outcome.to_json()},
            headers={"Cache-Control": "no-store"},
        )

    async def import_rules(self, request: Request) -> Response:
        """``POST /api/rules/import``: every entry, or none."""
        shape = (
            'body must be JSON: {"permissions": {"allow": [str], "ask": [str], "deny": [str]}, '
            '"project": str|null} (or a whole Claude Code settings object)'
        )
        try:
            self.approvals.authorize(
                principal_of(request), Role.ADMIN, "make rules", somewhere=True
            )
        except Forbidden as exc:
            return forbidden(exc)
        body, unreadable = await self._json_body(request, shape)
        if unreadable is not None:
            return unreadable  # type: ignore[no-any-return]
        if not isinstance(body, dict) or not isinstance(body.get("permissions"), dict):
            return error(400, shape)
        try:
            project = _project(body.get("project"))
            reason = _reason(body.get("reason"))
        except BadInput as exc:
            return error(400, str(exc))
        block: dict[str, Any] = body["permissions"]
        unknown = set(block) - set(ACTIONS) - _SETTINGS_NOT_RULES
        if unknown:
            return error(400, f"permissions has unknown key(s) {sorted(unknown)[:10]}")
        refused: list[dict[str, JSON]] = []
        drafts: list[Rule] = []
        total = 0
        for action in ACTIONS:
            entries = block.get(action, [])
            if not isinstance(entries, list):
                refused.append(
                    {
                        "list": action,
                        "index": None,
                        "rule": None,
                        "reason": f"permissions.{action} must be a list of rule strings",
                    }
                )
                continue
            total += len(entries)
            if total > MAX_IMPORT_ENTRIES:
                return error(400, f"at most {MAX_IMPORT_ENTRIES} rules in one import")
            for index, entry in enumerate(entries):
                try:
                    text, _ = parse(entry)
                except BadInput as exc:
                    shown = entry[:200] if isinstance(entry, str) else None
                    refused.append(
                        {
                            "list": action,
                            "index": index,
                            "rule": shown,
                            "reason": str(exc),
                            **{k: v for k, v in exc.extra.items() if k == "position"},
                        }
                    )
                    continue
                drafts.append(draft(text, action, project, reason, "import"))
        if refused:
            return error(
                400,
                f"{len(refused)} entr{'y' if len(refused) == 1 else 'ies'} refused; "
                "nothing imported",
                refused=refused,
            )
        if not drafts:
            return error(400, "the permissions block holds no rules")
        try:
            rules = await self.approvals.add_rules(drafts, principal_of(request))
        except Forbidden as exc:
            return forbidden(exc)
        return JSONResponse(
            {"ok": True, "project": project, "rules": [r.to_json() for r in rules]},
            status_code=201,
        )

    async def impact(self, request: Request) -> Response:
        """``GET /api/rules/impact?rule=&action=[&project=]``: replay over the newest rows."""
        q = request.query_params
        try:
            self.approvals.authorize(
                principal_of(request), Role.VIEWER, "read the audit", somewhere=True
            )
        except Forbidden as exc:
            return forbidden(exc)
        try:
            text, parsed = parse(q.get("rule"))
            action = _action(q.get("action"))
            project = _project(q.get("project") or None)
        except BadInput as exc:
            return error(400, str(exc), **exc.extra)
        try:
            # Without a project it replays every sled's rows: a viewer of every project only.
            self.approvals.authorize(principal_of(request), Role.VIEWER, "read the audit", project)
        except Forbidden as exc:
            return forbidden(exc)
        rows: list[AuditEntry] = []
        before: int | None = None
        while len(rows) < IMPACT_ROWS:
            page = await self.store.audit(project=project, before=before, limit=MAX_PAGE)
            rows.extend(page)
            if len(page) < MAX_PAGE or page[-1].id is None:
                break
            before = page[-1].id
        rows = rows[:IMPACT_ROWS]
        # Pure CPU on up to 10,000 inputs: off the event loop, which answers the sleds.
        matched = await asyncio.to_thread(_replay, parsed, action, rows)
        decisions: dict[str, int] = {}
        for row in matched:
            decisions[row.decision] = decisions.get(row.decision, 0) + 1
        return JSONResponse(
            {
                "rule": text,
                "action": action,
                "project": project,
                "scanned": len(rows),
                "bound": f"the newest {IMPACT_ROWS} audit rows"
                + (f" of sled {project!r}" if project else ""),
                "complete": len(rows) < IMPACT_ROWS,
                "would_decide": len(matched),
                "by_past_decision": decisions,
                "examples": [_example(row) for row in matched[:IMPACT_EXAMPLES]],
            },
            headers={"Cache-Control": "no-store"},
        )


def _replay(parsed: PermissionRule, action: str, rows: list[AuditEntry]) -> list[AuditEntry]:
    """The rows this one rule would have decided (an allow: every part allowed, in the sandbox)."""
    one = RuleSet([(0, parsed, cast(Action, action))])
    found = []
    for row in rows:
        if action == ALLOW and sandbox_off(row.tool_input):
            continue
        try:
            verdict = one.evaluate(row.tool_name, row.tool_input)
        except Exception:  # an input the matcher cannot read decides nothing
            continue
        if verdict.action == action:
            found.append(row)
    return found


def _example(row: AuditEntry) -> dict[str, JSON]:
    shown = canonical_json(row.tool_input)
    return {
        "id": row.id,
        "project": row.project,
        "req_id": row.req_id,
        "tool_name": row.tool_name,
        "tool_input": row.tool_input if len(shown) <= 2000 else shown[:2000],
        "decision": row.decision,
        "by": row.by,
    }
