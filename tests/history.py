"""A history checker for permission requests: record what every party saw, then judge it.

A test records each request's events as they happen, from the side that saw
them:

- ``sent``: the sled sent ``perm_request`` (the key is the sled's project and the request id);
- ``voted``: a decider asked for a decision and got an HTTP status (``200`` decided it);
- ``delivered``: the sled received its ``perm_response`` (the value it acted on);
- ``denied_by_sled``: the sled ended it itself (lost connection, its own timeout);

and then adds the gateway's audit (``GET /api/audit`` rows: decisions and
withdrawals). :meth:`History.check` returns a :class:`Verdict`: counts, and
every violation named by request and kind:

``two_decisions``
    more than one decision row in the audit, more than one decider told ``200``,
    or more than one ``perm_response`` delivered, for one request.
``decided_and_withdrawn``
    the audit holds both a decision and a withdrawal for one request.
``delivered_differs`` / ``delivered_not_audited``
    the sled acted on a value the audit does not hold (another value, or no row).
``allow_without_audit``
    an allow reached the sled with no audit decision behind it (the worst kind).
``acknowledged_lost``
    a decider was told ``200`` but the audit holds another value, or none.
``not_final``
    the sled never settled the request (no answer and no denial of its own).
``unaccounted``
    the audit never ended the request (no decision and no withdrawal row).
``unknown_request``
    an answer or an audit row for a request no sled sent.

A decision in the audit that the sled never received (it denied the request
itself) is counted as ``decided_undelivered``: not a violation of these
checks, but the number the "recorded as undelivered" state is for.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The decisions the gateway audits (anything else in ``decision`` is not one).
DECISIONS = frozenset({"approve", "deny", "always_allow"})
WITHDRAWN = "withdrawn"
ALLOWS = frozenset({"approve", "always_allow"})

Key = tuple[str, str]  # (sled project, request id)

VIOLATION_KINDS = (
    "two_decisions",
    "decided_and_withdrawn",
    "delivered_differs",
    "delivered_not_audited",
    "allow_without_audit",
    "acknowledged_lost",
    "not_final",
    "unaccounted",
    "unknown_request",
)


def response_value(payload: Mapping[str, Any]) -> str:
    """The decision a ``perm_response`` payload carries."""
    if not payload.get("approved"):
        return "deny"
    return "always_allow" if payload.get("always_allow") else "approve"


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # sent | voted | delivered | denied_by_sled
    key: Key
    at: float
    value: str | None = None  # the decision voted or delivered; the sled's reason
    status: int | None = None  # a vote's HTTP status
    who: str | None = None  # the decider


@dataclass(frozen=True, slots=True)
class Violation:
    key: Key
    kind: str
    what: str

    def __str__(self) -> str:
        return f"{self.key[0]}/{self.key[1]}: {self.kind}: {self.what}"


@dataclass
class Verdict:
    counts: dict[str, int]
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> Counter[str]:
        return Counter(v.kind for v in self.violations)

    def of_kind(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def __str__(self) -> str:
        figures = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        if self.ok:
            return f"history OK: {figures}"
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.kinds().items()))
        shown = "\n".join(f"  {v}" for v in self.violations[:50])
        more = len(self.violations) - 50
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return (
            f"history has {len(self.violations)} violation(s) ({kinds}): {figures}\n{shown}{tail}"
        )


class History:
    """Thread-safe recorder of events; :meth:`check` judges them against the audit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []
        self.audit_rows: list[dict[str, Any]] = []

    def _add(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def sent(self, sled: str, req_id: str) -> None:
        self._add(Event("sent", (sled, req_id), time.monotonic()))

    def voted(self, decider: str, sled: str, req_id: str, decision: str, status: int) -> None:
        self._add(
            Event("voted", (sled, req_id), time.monotonic(), decision, status=status, who=decider)
        )

    def delivered(self, sled: str, req_id: str, payload: Mapping[str, Any]) -> None:
        self._add(Event("delivered", (sled, req_id), time.monotonic(), response_value(payload)))

    def denied_by_sled(self, sled: str, req_id: str, why: str) -> None:
        self._add(Event("denied_by_sled", (sled, req_id), time.monotonic(), why))

    def audited(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add the audit's rows (``GET /api/audit`` entries: project, req_id, decision, ...)."""
        with self._lock:
            self.audit_rows.extend(dict(r) for r in rows)

    # -- judging ----------------------------------------------------------------------

    def check(self) -> Verdict:
        with self._lock:
            events = list(self.events)
            rows = list(self.audit_rows)
        by_key: dict[Key, dict[str, list[Event]]] = defaultdict(lambda: defaultdict(list))
        for e in events:
            by_key[e.key][e.kind].append(e)
        decided: dict[Key, list[str]] = defaultdict(list)
        withdrawn: dict[Key, int] = Counter()
        for row in rows:
            key = (str(row["project"]), str(row["req_id"]))
            if row["decision"] in DECISIONS:
                decided[key].append(str(row["decision"]))
            elif row["decision"] == WITHDRAWN:
                withdrawn[key] += 1
        sent = {k for k, kinds in by_key.items() if kinds["sent"]}
        counts: Counter[str] = Counter()
        counts["sent"] = len(sent)
        out: list[Violation] = []
        for key in sorted(set(by_key) | set(decided) | set(withdrawn)):
            kinds = by_key.get(key, {})
            votes = kinds.get("voted", [])
            ok_votes = [v for v in votes if v.status == 200]
            deliveries = kinds.get("delivered", [])
            denials = kinds.get("denied_by_sled", [])
            audit = decided.get(key, [])
            counts["votes"] += len(votes)
            for v in votes:
                counts[f"votes_{v.status}"] += 1
            counts["delivered"] += len(deliveries)
            counts["delivered_allow"] += sum(d.value in ALLOWS for d in deliveries)
            counts["denied_by_sled"] += 1 if denials and not deliveries else 0
            counts["audit_decisions"] += len(audit)
            counts["audit_withdrawn"] += withdrawn[key]

            def bad(kind: str, what: str, key: Key = key) -> None:
                out.append(Violation(key, kind, what))

            if key not in sent:
                bad("unknown_request", f"never sent, yet audited {audit or 'withdrawn'}")
                continue
            if len(audit) > 1:
                bad("two_decisions", f"{len(audit)} decisions in the audit: {audit}")
            if len(ok_votes) > 1:
                bad(
                    "two_decisions",
                    f"{len(ok_votes)} deciders told 200: "
                    + ", ".join(f"{v.who}={v.value}" for v in ok_votes),
                )
            if len(deliveries) > 1:
                bad(
                    "two_decisions",
                    f"{len(deliveries)} perm_responses delivered: {[d.value for d in deliveries]}",
                )
            if audit and withdrawn[key]:
                bad("decided_and_withdrawn", f"audit holds {audit} and {withdrawn[key]} withdrawal")
            for d in deliveries:
                if not audit:
                    if d.value in ALLOWS:
                        bad("allow_without_audit", f"the sled got {d.value}; the audit has none")
                    else:
                        bad("delivered_not_audited", f"the sled got {d.value}; the audit has none")
                elif d.value not in audit:
                    bad("delivered_differs", f"the sled got {d.value}; the audit says {audit}")
            for v in ok_votes:
                if v.value not in audit:
                    bad(
                        "acknowledged_lost",
                        f"{v.who} was told 200 for {v.value}; the audit says {audit or 'nothing'}",
                    )
            if not deliveries and not denials:
                bad("not_final", "the sled neither got an answer nor denied it itself")
            if not audit and not withdrawn[key]:
                bad("unaccounted", "the audit has neither a decision nor a withdrawal")
            if audit and not deliveries and denials:
                counts["decided_undelivered"] += 1
        counts["violations"] = len(out)
        return Verdict(dict(counts), out)
