"""Bulk decisions: ``POST /api/permissions/decide`` approves or denies many requests at once.

``{"decision": "approve"|"deny", "items": [{"project", "req_id", "input_sha256"}, ...],
"reason"?}`` answers ``200`` with one result per item, in order. Each item is
its own decision through :meth:`Approvals.decide`, the one door every decider
uses: its own authorization, its own ``input_sha256`` binding, its own audit
row and its own ``perm_response``. So one item's failure (``404`` unknown,
``409`` already decided or another input, ``503`` not recorded) is that item's
result, and the others are still decided.

Every item must carry the ``input_sha256`` of the input the person was shown:
a bulk decision is many cards approved at once, and a request whose input
nobody saw must not ride along. ``always_allow`` is not offered, because each
would make a rule, and which rule is a choice made on one card.

A body that is not this shape is a ``400`` (naming the item's ``index`` when
one item is malformed), more than :data:`MAX_BULK_ITEMS` items a ``413``, and
in both cases nothing is decided. Authentication and CSRF are the request
guard's (:mod:`sled_gateway.http.guard`), as for every other POST.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol import JSON, Decision
from sled_gateway.approvals import (
    Approvals,
    Forbidden,
    NotRecorded,
    NotSuggested,
    VoteCounted,
    VoteRefused,
)
from sled_gateway.auth import principal_of
from sled_gateway.http.errors import error, forbidden
from sled_gateway.principal import Principal
from sled_gateway.records import AlreadyDecided, InputMismatch, UnknownRequest

log = logger.bind(actor="gateway")

BULK_PATH = "/api/permissions/decide"
#: Most items one bulk decision takes; more is a ``413`` and nothing is decided.
MAX_BULK_ITEMS = 500
#: The body bound: 500 items with long ids fit; the single decision's 64 KiB would not.
MAX_BULK_BODY = 1024 * 1024
#: A bulk decision answers requests a person saw; always_allow's rule is one card's choice.
BULK_DECISIONS = (Decision.APPROVE, Decision.DENY)
_MAX_REASON = 1000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"decision", "items", "reason"})
_ITEM_FIELDS = frozenset({"project", "req_id", "input_sha256"})
BULK_SHAPE = (
    'body must be JSON: {"decision": "approve"|"deny", "items": [{"project": str, '
    '"req_id": str, "input_sha256": str}, ...], "reason": str}'
)

JsonBody = Callable[[Request, str, int], Awaitable[tuple[Any, Response | None]]]


class BadBulk(ValueError):
    """A 400 (or 413): the message, and what the client needs to fix it."""

    def __init__(self, message: str, status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


Item = tuple[str, str, str]  # (project, req_id, input_sha256)


def parse_bulk(body: object) -> tuple[Decision, list[Item], str | None]:
    """The decision, the items and the reason of a bulk body; :class:`BadBulk` if malformed."""
    if not isinstance(body, dict):
        raise BadBulk(BULK_SHAPE)
    unknown = set(body) - _FIELDS
    if unknown:
        raise BadBulk(f"unknown field(s) {sorted(str(k)[:40] for k in unknown)[:10]}")
    value = body.get("decision")
    if not isinstance(value, str) or value not in [d.value for d in BULK_DECISIONS]:
        raise BadBulk(
            f"decision must be one of {[d.value for d in BULK_DECISIONS]}, not {str(value)[:40]!r}"
            " (always_allow makes a rule: decide it on its own card)"
        )
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
        raise BadBulk(f"reason must be a string of at most {_MAX_REASON} characters")
    raw = body.get("items")
    if not isinstance(raw, list) or not raw:
        raise BadBulk("items must be a non-empty list of {project, req_id, input_sha256}")
    if len(raw) > MAX_BULK_ITEMS:
        raise BadBulk(
            f"at most {MAX_BULK_ITEMS} items per bulk decision, not {len(raw)}; nothing decided",
            413,
            max_items=MAX_BULK_ITEMS,
        )
    return Decision(value), [_item(i, x) for i, x in enumerate(raw)], reason


def _item(index: int, raw: object) -> Item:
    def bad(why: str) -> BadBulk:
        return BadBulk(f"items[{index}]: {why}; nothing decided", index=index)

    if not isinstance(raw, dict):
        raise bad("must be an object {project, req_id, input_sha256}")
    unknown = set(raw) - _ITEM_FIELDS
    if unknown:
        raise bad(f"unknown field(s) {sorted(str(k)[:40] for k in unknown)[:10]}")
    project, req_id, digest = raw.get("project"), raw.get("req_id"), raw.get("input_sha256")
    if not isinstance(project, str) or not project:
        raise bad("project must be a sled's project name")
    if not isinstance(req_id, str) or not req_id:
        raise bad("req_id must be the request's id (a string)")
    if not isinstance(digest, str) or _SHA256_HEX.fullmatch(digest) is None:
        raise bad("input_sha256 must be the shown input's SHA-256, 64 lowercase hex digits")
    return project, req_id, digest


class BulkDecisions:
    """The bulk handler, over the approvals service."""

    def __init__(self, approvals: Approvals, json_body: JsonBody) -> None:
        self.approvals = approvals
        self._json_body = json_body

    async def handle(self, request: Request) -> Response:
        body, unreadable = await self._json_body(request, BULK_SHAPE, MAX_BULK_BODY)
        if unreadable is not None:
            return unreadable
        try:
            decision, items, reason = parse_bulk(body)
        except BadBulk as exc:
            return error(exc.status, str(exc), **exc.extra)
        principal = principal_of(request)
        try:
            # Someone who may decide nowhere (a viewer) is refused as a whole; an approver
            # of some projects gets each item authorized on its own project by decide().
            self.approvals.authorize(principal, somewhere=True)
        except Forbidden as exc:
            return forbidden(exc)
        first: dict[tuple[str, str], int] = {}
        jobs: list[Awaitable[dict[str, JSON]]] = []
        for index, item in enumerate(items):
            earlier = first.setdefault(item[:2], index)
            if earlier != index:
                jobs.append(_repeat(item, earlier))
            else:
                jobs.append(self._one(item, decision, principal, reason))
        # Concurrently: the store commits the audit rows in shared transactions, and
        # decide() itself keeps each request to one decision.
        results = await asyncio.gather(*jobs)
        decided = sum(1 for r in results if r["status"] == 200)
        log.info(
            "bulk {} by {}: {} of {} item(s) decided",
            decision.value,
            principal.by,
            decided,
            len(results),
        )
        return JSONResponse(
            {
                "ok": decided == len(results),
                "decided": decided,
                "failed": len(results) - decided,
                "results": results,
            }
        )

    async def _one(
        self, item: Item, decision: Decision, principal: Principal, reason: str | None
    ) -> dict[str, JSON]:
        """One item's decision, as the single ``POST /api/permissions/{project}/{req_id}``
        would answer it (its status and its JSON)."""
        project, req_id, digest = item
        head: dict[str, JSON] = {"project": project, "req_id": req_id}
        try:
            record = await self.approvals.decide(
                project, req_id, decision, principal, reason=reason, input_sha256=digest
            )
        except Forbidden as exc:
            return {**head, "status": 403, "error": str(exc), "needs": exc.needs.value}
        except VoteCounted as exc:  # counted toward a quorum that is not met yet
            votes: JSON = [v.to_json() for v in exc.votes]
            return {
                **head,
                "status": 202,
                "state": "pending",
                "message": str(exc),
                "votes": votes,
                "needs": exc.needs,
            }
        except VoteRefused as exc:  # this person voted already, or is the sled's owner
            refused: JSON = [v.to_json() for v in exc.votes]
            return {**head, "status": 409, "error": str(exc), "votes": refused, "needs": exc.needs}
        except UnknownRequest as exc:
            return {**head, "status": 404, "error": str(exc.args[0])}
        except AlreadyDecided as exc:
            return {**head, "status": 409, "error": str(exc), "decided": exc.record.to_json()}
        except InputMismatch as exc:
            return {**head, "status": 409, "error": str(exc), "input_sha256": exc.item.input_sha256}
        except NotRecorded as exc:
            return {
                **head,
                "status": 503,
                "error": "the decision could not be recorded, so it was not taken; "
                f"the request is still pending: {exc}",
            }
        except NotSuggested as exc:  # no rule is ever sent; kept so no item can fail the rest
            return {**head, "status": 400, "error": str(exc)}
        except Exception as exc:
            # One item's unforeseen failure must not take the others' results with it.
            log.opt(exception=exc).error("bulk decision of {!r}: unexpected failure", req_id)
            return {**head, "status": 500, "error": "internal error; see the gateway's log"}
        return {**head, "status": 200, "decided": record.to_json()}


async def _repeat(item: Item, earlier: int) -> dict[str, JSON]:
    return {
        "project": item[0],
        "req_id": item[1],
        "status": 409,
        "error": f"repeats items[{earlier}]: a request is decided once",
        "repeat_of": earlier,
    }
