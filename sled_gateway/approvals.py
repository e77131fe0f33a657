"""The one door for every permission decision.

A sled's ``perm_request`` (handed over by :mod:`sled_gateway.hub`) goes

    size → rules → pending (per-sled caps, total cap) → decide → audit → ``perm_response``

and every decider (the console, the REST API, the terminal prompt,
``--auto``, rules and Matrix) comes in through :meth:`Approvals.decide` with a
:class:`~sled_gateway.principal.Principal`. Authorization is checked here,
once: a principal without the approver role gets :class:`Forbidden`.

A request a quorum of the ``--access`` file covers needs that many approvals
from different people (:meth:`Approvals.decide` counts each vote, committed to
the store first, and decides once the quorum is met, or at the first deny); a
vote that cannot count (the same person again, the sled's ``owner``) is
:class:`VoteRefused` and a vote that counts without deciding yet is
:class:`VoteCounted`. An allow rule never answers a request under a quorum.

The audit row is committed before anything else happens: only then does the
read model (:class:`~sled_gateway.state.GatewayState`, through
:class:`~sled_gateway.events.PermissionDecided`) learn the decision and the
sled get its answer. A decision whose row cannot be committed is no decision:
the request stays pending and the decider gets :class:`NotRecorded`. The
answers the gateway gives without a person (a rule, ``--auto``, a malformed
request, a cap) fail closed instead: the sled is denied and the log says deny.

Everything here runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from loguru import logger

from protocol import JSON, Decision, input_sha256, printable
from sled_gateway.access import Access
from sled_gateway.events import (
    Events,
    PermissionDecided,
    PermissionRequested,
    PermissionVoted,
    PermissionWithdrawn,
    RulesChanged,
    SledDown,
    SledUp,
)
from sled_gateway.policy import grammar_tool, rule_key, sandbox_off
from sled_gateway.principal import Principal, Role
from sled_gateway.records import (
    WITHDRAWN,
    AlreadyDecided,
    DecisionRecord,
    InputMismatch,
    PendingPermission,
    UnknownRequest,
    bounded_input,
)
from sled_gateway.replicas import Replicas, item_of, record_of
from sled_gateway.state import GatewayState
from sled_gateway.store import ALLOW, AuditEntry, Rule, Store, Vote
from sled_gateway.store.fleet import DECIDED, PENDING, PendingRow, StateChanged

log = logger.bind(actor="gateway")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


#: The audit's ``by`` of a request denied, and of the one withdrawn, because
#: a sled reused a pending id for a different request.
REUSED_ID = "reused_id"
#: How long a decision for a request this replica has not seen waits for it, when the
#: sled is connected to another replica (the request may not have reached the store):
#: a script deciding at once gets its answer, not a 404 it must retry.
EARLY_DECISION_WAIT = 0.5


Key = tuple[str, str]  # (project, req_id)


class Forbidden(PermissionError):
    """The principal may not do this (HTTP 403)."""

    def __init__(self, principal: Principal, action: str, needs: Role = Role.APPROVER) -> None:
        super().__init__(f"{principal.by} may not {action}: it needs the {needs.value} role")
        self.principal = principal
        #: The role that was needed (the 403's ``needs``).
        self.needs = needs


class NotSuggested(ValueError):
    """An "always allow" asked for a grammar rule the pending card did not offer (HTTP 400)."""


class VoteRefused(Exception):
    """A vote that cannot count toward the request's quorum (HTTP 409); still pending."""

    def __init__(self, message: str, votes: list[Vote], needs: int) -> None:
        super().__init__(message)
        self.votes = votes
        self.needs = needs


class VoteCounted(Exception):
    """A vote counted toward the quorum, which is not met yet (HTTP 202); still pending."""

    def __init__(self, votes: list[Vote], needs: int) -> None:
        approvals = [v.person for v in votes if v.decision != Decision.DENY.value]
        super().__init__(f"{len(approvals)} of {needs} approvals: {', '.join(approvals)}")
        self.votes = votes
        self.needs = needs


@dataclass(slots=True)
class _Ballot:
    """The votes on one pending request (``received_at`` tells it from a later one)."""

    received_at: float
    votes: list[Vote] = field(default_factory=list)


def voter_of(principal: Principal) -> str:
    """Who a vote is from: the person, or the principal's own name (``operator``, ...)."""
    return principal.person if principal.person is not None else principal.who


class NotRecorded(Exception):
    """The audit row could not be committed: the request is still pending (HTTP 503)."""


class Answerer(Protocol):
    """Who delivers a ``perm_response`` to the sled's session (the hub)."""

    async def answer(self, session: int, req_id: str, decision: Decision) -> bool: ...


class Approvals:
    """The permission flow of one gateway process."""

    def __init__(
        self,
        store: Store,
        state: GatewayState,
        events: Events,
        *,
        auto: Decision | None = None,
        max_pending_per_sled: int = 1000,
        max_input_bytes: int | None = None,
        max_pending_bytes_per_sled: int | None = None,
        max_pending_bytes: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.store = store
        #: Quorums (and people) of the --access file; None: one decision decides.
        self.access = access
        self._ballots: dict[Key, _Ballot] = {}
        # Each sled session's owner (its identity's "owner"), whose vote never completes
        # a quorum on that sled's requests.
        self._owners: dict[int, str] = {}
        events.subscribe(SledUp, self._sled_up)
        events.subscribe(SledDown, self._sled_down)
        events.subscribe(
            PermissionWithdrawn, lambda e: self._end_ballot(e.item.project, e.item.req_id)
        )
        events.subscribe(
            PermissionDecided,
            lambda e: (
                self._end_ballot(e.record.project, e.record.req_id) if e.was_pending else None
            ),
        )
        self.state = state
        self.events = events
        self.auto = auto
        self.max_pending_per_sled = max_pending_per_sled
        self.max_input_bytes = max_input_bytes
        self.max_pending_bytes_per_sled = max_pending_bytes_per_sled
        self.max_pending_bytes = max_pending_bytes
        self._answerer: Answerer | None = None
        # Decisions whose audit row is being written: a second decider waits for
        # the first's outcome, so a request gets exactly one decision.
        self._deciding: dict[Key, asyncio.Future[None]] = {}
        #: The fleet this process is a replica of (a shared server database), or None:
        #: one process, its pending requests in memory only.
        self.replicas: Replicas | None = None
        self._background: set[asyncio.Future[None]] = set()

    def _sled_up(self, event: SledUp) -> None:
        owner = event.info.get("owner")
        if isinstance(owner, str) and owner:
            self._owners[event.session] = owner

    def _sled_down(self, event: SledDown) -> None:
        self._owners.pop(event.session, None)

    def _end_ballot(self, project: str, req_id: str) -> None:
        self._ballots.pop((project, req_id), None)

    def ballot(self, project: str, req_id: str) -> list[Vote]:
        """The votes so far on a pending request (none without a quorum)."""
        found = self._ballots.get((project, req_id))
        return list(found.votes) if found is not None else []

    def answer_through(self, answerer: Answerer) -> None:
        """Set who sends the sleds their answers (the hub, which also hands us requests)."""
        self._answerer = answerer

    @staticmethod
    def authorize(
        principal: Principal,
        role: Role = Role.APPROVER,
        action: str = "decide permission requests",
        project: str | None = None,
        *,
        somewhere: bool = False,
    ) -> None:
        """Raise :class:`Forbidden` unless ``principal`` has ``role`` (the one check):
        on every project, or on ``project``, or (``somewhere``) on at least one project,
        for a read whose answer is then cut down to the projects it may see."""
        allowed = principal.has_somewhere(role) if somewhere else principal.has(role, project)
        if not allowed:
            where = f" of sled {project!r}" if project is not None else ""
            raise Forbidden(principal, action + where, role)

    @staticmethod
    def may(principal: Principal, role: Role, project: str) -> bool:
        """Whether ``principal`` has ``role`` on ``project`` (to filter what it reads)."""
        return principal.has(role, project)

    # -- rules made and revoked by people ---------------------------------------------

    async def add_rule(self, draft: Rule, principal: Principal) -> Rule:
        """Commit ``draft`` as made by ``principal`` (an identical active rule is reused)."""
        self.authorize(principal, Role.ADMIN, "make rules", draft.project)
        rule = await self.store.add_rule(replace(draft, created_by=principal.by))
        log.info(
            "rule {} by {}: {} {} for {}",
            rule.id,
            rule.created_by,
            rule.action,
            printable(rule.describes, 300),
            repr(rule.project) if rule.project else "every sled",
        )
        self.events.publish(RulesChanged(rule, revoked=False))
        return rule

    async def add_rules(self, drafts: list[Rule], principal: Principal) -> list[Rule]:
        """Commit every draft as made by ``principal`` in one transaction, or none (an import)."""
        for d in drafts:
            self.authorize(principal, Role.ADMIN, "make rules", d.project)
        rules = await self.store.add_rules([replace(d, created_by=principal.by) for d in drafts])
        log.info("{} rule(s) imported by {}", len(rules), principal.by)
        for rule in rules:
            self.events.publish(RulesChanged(rule, revoked=False))
        return rules

    async def revoke_rule(self, rule_id: int, principal: Principal) -> Rule:
        """Revoke a rule: :class:`~sled_gateway.store.UnknownRule` /
        :class:`~sled_gateway.store.RuleRevoked`."""
        if not principal.has(Role.ADMIN):
            # An admin of some projects may revoke the rules of those projects only.
            found = [r for r in await self.store.rules() if r.id == rule_id]
            self.authorize(
                principal, Role.ADMIN, "revoke rules", found[0].project if found else None
            )
        rule = await self.store.revoke_rule(rule_id, principal.by)
        log.info("rule {} revoked by {}", rule.id, rule.revoked_by)
        self.events.publish(RulesChanged(rule, revoked=True))
        return rule

    # -- requests from sleds --------------------------------------------------------

    async def request(
        self,
        session: int,
        project: str,
        req_id: str,
        tool_name: str,
        tool_input: JSON,
        *,
        suggestions: tuple[str, ...] = (),
    ) -> None:
        """A sled's ``perm_request``: answer it by rule, cap or ``--auto``, or make it pending
        (``suggestions``: the rules its agent suggests for "always allow", checked when offered)."""
        held = self.state.pending_or_none(project, req_id)
        if held is not None and held.replica is None:
            await self._again(session, project, req_id, tool_name, tool_input)
            return
        # Measured once: the caps below, the audit's summary and /api/state all use it.
        # The sled's suggestions go in now: a frozen item made once instead of copied on offer.
        item = PendingPermission(
            project,
            req_id,
            tool_name,
            tool_input,
            time.time(),
            session,
            agent_suggestions=suggestions,  # the card's rules are computed when first shown
        )
        if self.max_input_bytes is not None and item.input_bytes > self.max_input_bytes:
            await self._refuse(
                item, "over --max-input-bytes", f"{item.input_bytes} bytes of tool input"
            )
            return
        needs = (
            self.access.approvals_needed(project, tool_name, tool_input)
            if self.access is not None and self.access.quorums
            else 1
        )
        if needs > 1:
            item = replace(item, needs=needs)
        rule = self.store.policy.match(project, tool_name, tool_input)
        if rule is not None and needs > 1 and rule.action == ALLOW:
            # A rule is one person's standing approval: it never stands in for a quorum.
            log.info(
                "sled '{}': {} needs {} approvals; allow rule {} does not answer it",
                printable(project, 120),
                printable(req_id, 120),
                needs,
                rule.id,
            )
            rule = None
        if rule is not None:
            await self._answer_by_rule(
                session, project, req_id, tool_name=tool_name, tool_input=tool_input, rule=rule
            )
            return
        if self.state.pending_count(project) >= self.max_pending_per_sled:
            await self._refuse(
                item,
                "over --max-pending-per-sled",
                f"{self.max_pending_per_sled} permission requests already pending",
            )
            return
        if self.auto is None:
            over = self._over_pending_bytes(item)
            if over is not None:
                await self._refuse(item, *over)
                return
        log.info(
            "sled '{}' asks permission '{}': {}",
            printable(project, 120),
            printable(req_id, 120),
            printable(tool_name, 200),
        )
        if self.auto is not None:
            await self._settle(item, self.auto, Principal.auto(), None, pending=False)
            return
        item = self._offer(item)
        if self.replicas is not None:
            # The shared store first: any replica may decide it from then on.
            try:
                await self.replicas.add_pending(item)
            except Exception as exc:
                log.opt(exception=exc).error("permission {!r}: not recorded as pending", req_id)
                await self._refuse(item, "not recorded as pending", str(exc))
                return
            self.events.publish(PermissionRequested(item))
            self.replicas.ring(request=(item.project, item.req_id))
            return
        self.events.publish(PermissionRequested(item))

    def _offer(self, item: PendingPermission) -> PendingPermission:
        """The item with the allow rule its card shows as matched but unable to answer (a
        call outside the sandbox); the same item when there is none, as nearly always."""
        if not sandbox_off(item.tool_input):
            return item
        allow = self.store.policy.explain(item.project, item.tool_name, item.tool_input).would_allow
        if allow is None:
            return item
        return replace(
            item, would_match={"id": allow.id, "rule": allow.rule, "describes": allow.describes}
        )

    async def _again(
        self, session: int, project: str, req_id: str, tool_name: str, tool_input: JSON
    ) -> None:
        """A ``perm_request`` whose id is already pending for this sled.

        The same request again is ignored. A different one is denied at once,
        and the first is withdrawn too: the sled holds one request per id, so
        the deny answers whatever it has under that id, and a person must not
        approve a card whose twin at the sled is already denied.
        """
        first = self.state.pending_item(project, req_id)
        if first.tool_name == tool_name and first.input_sha256 == input_sha256(tool_input):
            log.warning(
                "sled '{}'#{}: perm_request '{}' is already pending; ignored",
                printable(project, 120),
                session,
                printable(req_id, 120),
            )
            return
        log.warning(
            "sled '{}'#{}: perm_request '{}' reuses a pending id with a different request "
            "({} after {}); denying it and withdrawing the first",
            printable(project, 120),
            session,
            printable(req_id, 120),
            printable(tool_name, 120),
            printable(first.tool_name, 120),
        )
        # A decision of the first being committed stands (see _withdraw_when_undecided);
        # the deny below answers whatever the sled holds under the id either way.
        self._withdraw_when_undecided(first, REUSED_ID, "its id was reused by a different request")
        await self.deny_by_gateway(
            session,
            project,
            req_id,
            tool_name=tool_name,
            tool_input=tool_input,
            why="its id is already pending with a different request",
            principal=Principal.gateway(REUSED_ID),
        )

    def cancel(self, session: int, project: str, req_id: str, reason: str) -> bool:
        """The sled decided its request ``req_id`` itself (``perm_cancel``): withdraw it.

        Only a request pending from that very session is withdrawn; False (and
        nothing changes) for any other id, so no sled cancels another's request.
        A decision being committed meanwhile stands (the sled ignores its answer).
        """
        item = self.state.pending_or_none(project, req_id)
        if item is None or item.session != session:
            log.warning(
                "sled '{}'#{}: perm_cancel for '{}', which is not pending from this session; "
                "ignored",
                printable(project, 120),
                session,
                printable(req_id, 120),
            )
            return False
        log.info(
            "sled '{}' cancelled permission '{}' ({}); withdrawn",
            printable(project, 120),
            printable(req_id, 120),
            reason,
        )
        self._withdraw_when_undecided(
            item, f"sled_cancel:{reason}", f"the sled cancelled it: {reason}"
        )
        return True

    def _over_pending_bytes(self, item: PendingPermission) -> tuple[str, str] | None:
        """Why making ``item`` pending would hold too many bytes, or None."""
        cap = self.max_pending_bytes_per_sled
        held = self.state.pending_bytes(item.project)
        if cap is not None and held + item.input_bytes > cap:
            return "over --max-pending-bytes-per-sled", f"{held} bytes already pending"
        cap = self.max_pending_bytes
        held = self.state.pending_bytes()
        if cap is not None and held + item.input_bytes > cap:
            return "over --max-pending-bytes", f"{held} bytes already pending on all sleds"
        return None

    async def _refuse(self, item: PendingPermission, why: str, detail: str) -> None:
        """Deny a request over a bound at once; its audit row keeps a summary of a big input."""
        log.warning(
            "sled '{}'#{}: {}; denying '{}' ({}, {} bytes) as {}",
            printable(item.project, 120),
            item.session,
            detail,
            printable(item.req_id, 120),
            printable(item.tool_name, 120),
            item.input_bytes,
            why,
        )
        await self._deny(
            item.session,
            item.project,
            item.req_id,
            tool_name=item.tool_name,
            audit_input=item.audit_input,
            why=why,
            principal=Principal.gateway("limit"),
        )

    async def deny_by_gateway(
        self,
        session: int,
        project: str | None,
        req_id: str,
        *,
        tool_name: str,
        tool_input: JSON,
        why: str,
        principal: Principal,
    ) -> None:
        """Deny a request the gateway refuses itself (malformed, over a cap).

        The deny goes out whatever happens to its audit row, which keeps a big
        input as its summary (:func:`~sled_gateway.records.bounded_input`). A
        request from a sled that has not identified is not shown in the console
        (it has no project).
        """
        await self._deny(
            session,
            project,
            req_id,
            tool_name=tool_name,
            audit_input=bounded_input(tool_input),
            why=why,
            principal=principal,
        )

    async def _deny(
        self,
        session: int,
        project: str | None,
        req_id: str,
        *,
        tool_name: str,
        audit_input: JSON,
        why: str,
        principal: Principal,
    ) -> None:
        now = time.time()
        entry = AuditEntry(
            project or "",
            session,
            req_id,
            tool_name,
            audit_input,
            Decision.DENY.value,
            principal.by,
            why,
            now,
            now,
            who=principal.who,
            channel=principal.channel.value,
        )
        try:
            await self.store.record(entry)
        except Exception as exc:
            log.opt(exception=exc).error("invalid permission request {!r} not recorded", req_id)
        if project is not None:
            self.events.publish(
                PermissionDecided(
                    DecisionRecord(
                        project, req_id, tool_name, Decision.DENY.value, principal.by, now, 0.0
                    ),
                    was_pending=False,
                )
            )
        await self._send(session, req_id, Decision.DENY)

    def withdraw(self, session: int, close_code: int | None) -> list[PendingPermission]:
        """The session ended: its pending requests end without a decision.

        The sled denies them itself (it fails closed on a lost session), so no
        answer goes out and the audit rows need not be waited for.
        """
        gone = self.state.pending_of_session(session)
        why = f"the sled disconnected (close code {close_code})"
        for item in gone:
            self._withdraw_when_undecided(item, "sled_disconnected", why)
        return gone

    def _withdraw_when_undecided(self, item: PendingPermission, by: str, why: str) -> None:
        """Withdraw ``item`` now, or, while a decision of it is being committed, once that
        decision has failed: a committed decision is the request's one outcome (its audit
        row cannot be taken back), so a withdrawal then would give it two."""
        if self.state.pending_or_none(item.project, item.req_id) is not item:
            return  # decided (or replaced) meanwhile
        if self.replicas is not None:
            # The store's compare-and-set settles a race with any replica's decision.
            self._spawn(self._withdraw_shared(item, by, why))
            return
        busy = self._deciding.get((item.project, item.req_id))
        if busy is None:
            self._withdraw([item], by, why)
            return
        busy.add_done_callback(lambda _: self._withdraw_when_undecided(item, by, why))

    async def settled(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the withdrawals and deliveries on their way."""
        running = [t for t in self._background if not t.done()]
        if running:
            await asyncio.wait(running, timeout=timeout)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _withdraw_shared(self, item: PendingPermission, by: str, why: str) -> None:
        """Withdraw ``item`` by a compare-and-set on its row: if a decision won (on any
        replica), that decision stands, and it is recorded as undelivered."""
        assert self.replicas is not None
        now = time.time()
        withdrawer = Principal.gateway(by)
        entry = AuditEntry(
            item.project,
            item.session,
            item.req_id,
            item.tool_name,
            item.audit_input,
            WITHDRAWN,
            withdrawer.by,
            why,
            item.received_at,
            now,
            who=withdrawer.who,
            channel=withdrawer.channel.value,
        )
        try:
            await self.store.end_pending(entry, PENDING, WITHDRAWN)  # type: ignore[attr-defined]
        except StateChanged as exc:
            row = exc.row
            if row is None or row.requested_at != item.received_at:
                return
            if row.state == DECIDED and self.replicas.claim_send(item):
                # Decided elsewhere, its answer not sent: the sled denied it itself.
                await self.replicas.mark_undelivered(item, row.decision or "?")
            self.events.publish(PermissionDecided(record_of(row)))
            return
        except Exception as exc:
            # The sweep withdraws it later (a row pending for a session that ended).
            log.opt(exception=exc).error("permission {!r}: withdrawal not recorded", item.req_id)
            return
        self.events.publish(
            PermissionWithdrawn(
                item,
                DecisionRecord(
                    item.project,
                    item.req_id,
                    item.tool_name,
                    WITHDRAWN,
                    withdrawer.by,
                    now,
                    now - item.received_at,
                ),
            )
        )
        self.replicas.ring(request=(item.project, item.req_id))

    def _withdraw(self, items: list[PendingPermission], by: str, why: str) -> None:
        """End pending requests without a decision: audited as withdrawn (``by``,
        ``why``), and gone from the read model, the console and Matrix.

        No answer goes out: in every case the sled has denied, or denies, them itself.
        """
        now = time.time()
        withdrawer = Principal.gateway(by)
        label = withdrawer.by
        for item in items:
            self.store.record_later(
                AuditEntry(
                    item.project,
                    item.session,
                    item.req_id,
                    item.tool_name,
                    item.audit_input,
                    WITHDRAWN,
                    label,
                    why,
                    item.received_at,
                    now,
                    who=withdrawer.who,
                    channel=withdrawer.channel.value,
                )
            )
            record = DecisionRecord(
                item.project,
                item.req_id,
                item.tool_name,
                WITHDRAWN,
                label,
                now,
                now - item.received_at,
            )
            self.events.publish(PermissionWithdrawn(item, record))

    # -- decisions ------------------------------------------------------------------

    async def decide(
        self,
        project: str,
        req_id: str,
        decision: Decision,
        principal: Principal,
        reason: str | None = None,
        *,
        input_sha256: str | None = None,
        rule: str | None = None,
    ) -> DecisionRecord:
        """Give a pending request its one decision.

        ``input_sha256``: the hash of the input the person was shown; when given
        and not the pending request's, :class:`~sled_gateway.records.InputMismatch`
        and nothing is decided (the id now names another input).

        Raises :class:`Forbidden`, :class:`~sled_gateway.state.UnknownRequest`,
        :class:`~sled_gateway.state.AlreadyDecided`, :class:`InputMismatch` or
        :class:`NotRecorded` (the request then stays pending).

        ``rule``: with ``always_allow``, one of the item's ``suggested_rules`` to
        make instead of the exact whole-input rule; anything else is
        :class:`NotSuggested` and nothing is decided.
        """
        self.authorize(principal, Role.APPROVER, "decide permission requests", project)
        key = (project, req_id)
        while (busy := self._deciding.get(key)) is not None:
            await asyncio.shield(busy)
        try:
            item = self.state.pending_item(project, req_id)
        except UnknownRequest:
            if self.replicas is None:
                raise
            # Pending on another replica, not read here yet: the store knows.
            item = await self._from_store(project, req_id)
        if input_sha256 is not None and input_sha256 != item.input_sha256:
            log.warning(
                "permission '{}' of sled '{}': {} decided another input than the pending one; "
                "nothing decided",
                printable(req_id, 120),
                printable(project, 120),
                principal.by,
            )
            raise InputMismatch(item, input_sha256)
        if rule is not None and (
            decision is not Decision.ALWAYS_ALLOW
            or rule not in {text for text, _ in item.suggested_rules}
        ):
            raise NotSuggested(
                "rule must be one of the request's suggested_rules, with always_allow: "
                f"{[text for text, _ in item.suggested_rules]}"
            )
        done = asyncio.get_running_loop().create_future()
        self._deciding[key] = done
        try:
            if item.needs > 1:
                return await self._vote(item, decision, principal, reason)
            return await self._settle(
                item, decision, principal, reason, pending=True, grammar_rule=rule
            )
        finally:
            del self._deciding[key]
            done.set_result(None)

    async def _from_store(self, project: str, req_id: str) -> PendingPermission:
        assert self.replicas is not None
        try:
            row = await self.replicas.find(project, req_id)
            if row is None and self.state.is_connected(project):
                # Its sled is connected (to another replica): the request may be on its
                # way to the store. Wait for its ring rather than answer 404 at once.
                await self.replicas.rung_for(project, req_id, EARLY_DECISION_WAIT)
                # The ring's re-read put it here just now: the compare-and-set on its
                # row is the check, so a second read before it would only add a wait.
                read = self.state.pending_or_none(project, req_id)
                if read is not None:
                    return read
                row = await self.replicas.find(project, req_id)
        except Exception as exc:
            raise NotRecorded(str(exc)) from exc
        if row is None:
            raise UnknownRequest(f"no permission request {req_id!r} from sled {project!r}")
        if row.state != PENDING:
            raise AlreadyDecided(record_of(row))
        return item_of(row)

    def _lost(self, item: PendingPermission, row: PendingRow | None) -> Exception:
        """What a decider is told whose compare-and-set found ``row`` instead."""
        if row is None:
            return UnknownRequest(f"no permission request {item.req_id!r} from {item.project!r}")
        if row.requested_at != item.received_at:
            return InputMismatch(item_of(row), item.input_sha256)
        return AlreadyDecided(record_of(row))

    async def _votes_on(self, item: PendingPermission) -> list[Vote]:
        """The votes on ``item`` as the shared store has them (every replica's), the
        first of each person only."""
        seen: set[str] = set()
        votes = []
        for v in await self.store.votes(item.project, item.req_id):
            if v.requested_at == item.received_at and v.person.lower() not in seen:
                seen.add(v.person.lower())
                votes.append(v)
        return votes

    async def _vote(
        self,
        item: PendingPermission,
        decision: Decision,
        principal: Principal,
        reason: str | None,
    ) -> DecisionRecord:
        """One vote on a request under a quorum: refused, counted, or deciding.

        An "always allow" counts as an approval and makes no rule (a rule would
        answer the next such request without its quorum).
        """
        key = (item.project, item.req_id)
        ballot = self._ballots.get(key)
        if self.replicas is not None:
            ballot = _Ballot(item.received_at, await self._votes_on(item))
        elif ballot is None or ballot.received_at != item.received_at:
            ballot = self._ballots[key] = _Ballot(item.received_at)
        voter = voter_of(principal)
        # Case-blind: an email in two spellings is one person.
        if any(v.person.lower() == voter.lower() for v in ballot.votes):
            raise VoteRefused(
                f"{voter} already voted on this request; it needs {item.needs} different people",
                list(ballot.votes),
                item.needs,
            )
        owner = (
            self._owners.get(item.session)
            if item.replica is None
            else _text(self.state.sled_info(item.project).get("owner"))
        )
        approving = decision is not Decision.DENY
        if approving and owner is not None and owner.lower() == voter.lower():
            raise VoteRefused(
                f"{voter} owns sled {item.project!r}: the owner cannot approve its requests "
                f"toward a quorum of {item.needs}",
                list(ballot.votes),
                item.needs,
            )
        cast = Decision.APPROVE if approving else Decision.DENY
        vote = Vote(
            item.project,
            item.req_id,
            voter,
            cast.value,
            principal.channel.value,
            time.time(),
            reason,
            item.received_at,
            item.needs,
        )
        try:
            await self.store.add_vote(vote)
        except Exception as exc:
            log.opt(exception=exc).error("vote on {!r} not recorded; still pending", item.req_id)
            raise NotRecorded(str(exc)) from exc
        if self.replicas is not None:
            # Every replica's votes count; the deciding one's compare-and-set settles it.
            ballot.votes = await self._votes_on(item)
            self._ballots[key] = ballot  # what GET /api/permissions/... shows here
        elif self.state.pending_or_none(*key) is not item:
            # The request left while the vote was written (withdrawn; or replaced by
            # another under the same id, which this vote was not for).
            current = self.state.pending_item(*key)  # UnknownRequest / AlreadyDecided
            raise InputMismatch(current, item.input_sha256)
        else:
            self._ballots[key] = ballot
            ballot.votes.append(vote)
        approvals = [v.person for v in ballot.votes if v.decision == Decision.APPROVE.value]
        log.info(
            "permission '{}' of sled '{}': {} votes {} ({} of {} approvals)",
            printable(item.req_id, 120),
            printable(item.project, 120),
            voter,
            cast.value,
            len(approvals),
            item.needs,
        )
        if cast is Decision.DENY:
            return await self._settle(item, cast, principal, reason, pending=True)
        if len(approvals) < item.needs:
            # The console's card shows "1 of 2 approvals: alice".
            self.events.publish(PermissionVoted(replace(item, votes=tuple(approvals))))
            raise VoteCounted(list(ballot.votes), item.needs)
        why = f"quorum {len(approvals)} of {item.needs}: {', '.join(approvals)}"
        return await self._settle(
            item, cast, principal, f"{why}; {reason}" if reason else why, pending=True
        )

    async def _settle(
        self,
        item: PendingPermission,
        decision: Decision,
        principal: Principal,
        reason: str | None,
        *,
        pending: bool,
        grammar_rule: str | None = None,
    ) -> DecisionRecord:
        """Commit, then show, then answer. ``pending``: a person decides a pending request
        (a failed commit leaves it pending); else ``--auto`` answers (it then denies)."""
        project, req_id = item.project, item.req_id
        now = time.time()
        new_rule = None
        if decision is Decision.ALWAYS_ALLOW and grammar_rule is not None:
            # The rule the person picked from the card's suggestions (exact or prefix).
            new_rule = Rule(
                0,
                project,
                grammar_tool(grammar_rule),
                None,
                ALLOW,
                now,
                principal.by,
                origin=f"always_allow of request {req_id}",
                rule=grammar_rule,
            )
        elif decision is Decision.ALWAYS_ALLOW:
            # Keyed on the whole input the person saw: never broader than that use.
            new_rule = Rule(
                0,
                project,
                item.tool_name,
                rule_key(item.tool_name, item.tool_input),
                ALLOW,
                now,
                principal.by,
                origin=f"always_allow of request {req_id}",
            )
        entry = AuditEntry(
            project,
            item.session,
            req_id,
            item.tool_name,
            item.tool_input,
            decision.value,
            principal.by,
            reason,
            item.received_at,
            now,
            who=principal.who,
            channel=principal.channel.value,
        )
        rule = None
        shared = self.replicas is not None and pending
        try:
            if shared:
                _, rule = await self.store.decide_pending(entry, new_rule)  # type: ignore[attr-defined]
            else:
                _, rule = await self.store.record(entry, new_rule)
        except StateChanged as exc:
            # Another decision, or the withdrawal, committed first (on any replica).
            raise self._lost(item, exc.row) from None
        except Exception as exc:
            if pending:
                log.opt(exception=exc).error(
                    "permission {!r}: the decision could not be recorded; still pending", req_id
                )
                raise NotRecorded(str(exc)) from exc
            log.opt(exception=exc).error("permission {!r}: not recorded; denying", req_id)
            decision = Decision.DENY
        if shared:
            pass  # the compare-and-set above was the one check
        elif pending and not self.state.is_pending(project, req_id):
            # The sled went away while the row was written: its withdrawal stands.
            withdrawn = self.state.decision_for(project, req_id)
            if withdrawn is not None:
                raise AlreadyDecided(withdrawn)
        elif pending and (current := self.state.pending_item(project, req_id)) is not item:
            # ... and came back with the same id for another request: this decision
            # was for the one that left, never for the one now pending.
            raise InputMismatch(current, item.input_sha256)
        record = DecisionRecord(
            project,
            req_id,
            item.tool_name,
            decision.value,
            principal.by,
            now,
            now - item.received_at,
        )
        log.info(
            "permission '{}' of sled '{}' ({}): {} by {}",
            printable(req_id, 120),
            printable(project, 120),
            printable(item.tool_name, 200),
            decision.value,
            principal.by,
        )
        if rule is not None:
            log.info(
                "rule {} for sled '{}': always allow {}",
                rule.id,
                printable(project, 120),
                printable(rule.describes, 300),
            )
            self.events.publish(RulesChanged(rule, revoked=False))
        self.events.publish(PermissionDecided(record, was_pending=pending))
        if shared:
            await self._send_shared(item, decision, record)
        else:
            await self._send(item.session, req_id, decision)
        return record

    async def _send_shared(
        self, item: PendingPermission, decision: Decision, record: DecisionRecord
    ) -> None:
        """Answer a request decided in the shared store: from here when this replica
        holds its sled, else by ringing the holder (whose sweep delivers it anyway)."""
        assert self.replicas is not None
        if item.replica is not None and item.replica != self.replicas.id:
            self.replicas.ring_holder(item, record)
            return
        if self.replicas.claim_send(item):
            sent = self._answerer is not None and await self._answerer.answer(
                item.session, item.req_id, decision
            )
            if not sent:
                log.warning(
                    "permission '{}': the sled's session is gone; answer not sent",
                    printable(item.req_id, 120),
                )
            self.replicas.after_send(item, decision, sent)
        self.replicas.ring(request=(item.project, item.req_id))

    async def _answer_by_rule(
        self,
        session: int,
        project: str,
        req_id: str,
        *,
        tool_name: str,
        tool_input: JSON,
        rule: Rule,
    ) -> None:
        """Answer a request a rule covers at once: recorded as ``rule:<id>``, never pending."""
        principal = Principal.rule(rule.who)
        decision = Decision.ALWAYS_ALLOW if rule.action == ALLOW else Decision.DENY
        now = time.time()
        what = printable(rule.describes, 300)
        entry = AuditEntry(
            project,
            session,
            req_id,
            tool_name,
            tool_input,
            decision.value,
            principal.by,
            f"rule {rule.id}: {rule.action} {what}",
            now,
            now,
            who=principal.who,
            channel=principal.channel.value,
        )
        try:
            await self.store.record(entry)
        except Exception as exc:
            log.opt(exception=exc).error("permission {!r}: not recorded; denying", req_id)
            decision = Decision.DENY
        log.info(
            "permission {!r} of sled {!r} ({}): {} by {}",
            req_id,
            project,
            tool_name,
            decision.value,
            principal.by,
        )
        self.events.publish(
            PermissionDecided(
                DecisionRecord(project, req_id, tool_name, decision.value, principal.by, now, 0.0),
                was_pending=False,
            )
        )
        await self._send(session, req_id, decision)

    async def _send(self, session: int, req_id: str, decision: Decision) -> None:
        if self._answerer is None or not await self._answerer.answer(session, req_id, decision):
            log.warning(
                "permission '{}': the sled's session is gone; answer not sent",
                printable(req_id, 120),
            )
