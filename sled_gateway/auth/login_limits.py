"""How many sign-ins one client may start: the limits on the public ``GET /login``.

Anyone may start a sign-in, and each one keeps a login in flight in the store (at
most ``max_logins``, for :data:`~sled_gateway.auth.oidc.LOGIN_TTL`). Unlimited, one
anonymous client looping on ``/login`` would write the store at any rate, and
could push out the login a person started a moment ago at the provider, whose
callback would then fail. Three parts, each answering one of these:

- **A token bucket per client** (``rate`` a minute, bursts of ``burst``): beyond,
  ``429`` with ``Retry-After``. A person retrying a sign-in starts a few a minute;
  a loop starts hundreds.
- **A share of the logins in flight per client**: at most ``in_flight`` started by
  one client within the login TTL (``429`` with ``Retry-After`` until its oldest
  expires), so that filling the store's table takes many clients, not one.
- **No eviction when the table is full** (the store's ``LoginsFull``): a new login
  is refused (``503``, ``Retry-After``) instead of forgetting one that someone else
  started. Of the two ways a flood from many addresses can hurt, delaying new
  sign-ins for a few minutes is the one that fails closed; failing a person's
  sign-in halfway, after they typed their password at the provider, is not.
  People already signed in are never affected (their sessions are the gateway's).

A client is its address as the gateway sees it (``scope["client"]``, which a
trusted proxy's PROXY header sets), an IPv6 address counted by its /64: one host
usually holds a whole /64 and could otherwise change address per request.

The bucket is per replica (in memory): behind a balancer spreading one client
over N replicas, it gets N times the rate. The share of logins in flight is
counted twice: here, so that a client over it costs no store write, and in the
store, in the transaction that keeps the login (each row names its client), so
that over every replica on one database a client still holds at most
``in_flight``. A client the store refused is held here (:meth:`LoginLimiter.hold`)
until its oldest login expires. The store's cap on all logins is shared too.

Memory is bounded: a client's entry is dropped once it is as good as new (bucket
full again, no login in flight), checked for the least recently seen entries on
every request, and the table holds at most ``max_clients``, the least recently
seen out first (which can only make a limit more lenient for that client, as a
new address would be). A refused client is logged once per minute, not once per
request.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

#: ``GET /login`` a minute one client may start, by default (``--login-rate``).
LOGIN_RATE = 10
#: Logins in flight at once (anyone may start one); new ones are refused beyond.
MAX_LOGINS = 10_000
#: Clients remembered at once; the least recently seen are forgotten beyond.
MAX_CLIENTS = 10_000
#: A client refused again within this many seconds is not logged again.
LOG_WINDOW = 60.0
#: Idle entries looked at (from the least recently seen) on each request.
_SWEEP = 4


def client_key(host: str) -> str:
    """What counts as one client: the IPv4 address, or the IPv6 address's /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A start refused: why, the seconds to wait, and whether to log it (the first
    refusal of this client in :data:`LOG_WINDOW`)."""

    why: str
    retry_after: int
    log: bool


@dataclass(slots=True)
class _Client:
    tokens: float
    refilled_at: float
    started: deque[float] = field(default_factory=deque)
    quiet_until: float = -math.inf
    #: Refused until then, for ``held_why``: its share is full on other replicas.
    held_until: float = -math.inf
    held_why: str = ""


class LoginLimiter:
    """The per-client limits on starting sign-ins (see the module's docstring)."""

    def __init__(
        self,
        *,
        rate: int = LOGIN_RATE,
        burst: int | None = None,
        in_flight: int | None = None,
        ttl: float,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = rate / 60.0
        self.burst = burst if burst is not None else 2 * rate
        self.in_flight = in_flight if in_flight is not None else 3 * rate
        self.ttl = ttl
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def _refill(self, client: _Client, now: float) -> None:
        client.tokens = min(
            float(self.burst), client.tokens + (now - client.refilled_at) * self.per_second
        )
        client.refilled_at = now
        while client.started and client.started[0] <= now - self.ttl:
            client.started.popleft()

    def _as_good_as_new(self, client: _Client, now: float) -> bool:
        self._refill(client, now)
        return (
            client.tokens >= self.burst
            and not client.started
            and now >= client.quiet_until
            and now >= client.held_until
        )

    def _sweep(self, now: float) -> None:
        for _ in range(_SWEEP):
            if not self._clients:
                return
            key, oldest = next(iter(self._clients.items()))
            if not self._as_good_as_new(oldest, now):
                return
            del self._clients[key]

    def _seen(self, host: str, now: float) -> _Client:
        key = client_key(host)
        client = self._clients.get(key)
        if client is None:
            while len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
            client = self._clients[key] = _Client(tokens=float(self.burst), refilled_at=now)
        else:
            self._clients.move_to_end(key)
            self._refill(client, now)
        return client

    def _refusal(self, client: _Client, why: str, wait: float, now: float) -> Refusal:
        log = now >= client.quiet_until
        if log:
            client.quiet_until = now + LOG_WINDOW
        return Refusal(why, max(1, math.ceil(wait)), log)

    def start(self, host: str) -> Refusal | None:
        """Count a sign-in that ``host`` starts; a :class:`Refusal` (nothing counted)
        when it is over a limit."""
        now = self.clock()
        self._sweep(now)
        client = self._seen(host, now)
        if now < client.held_until:
            why = client.held_why
            wait = client.held_until - now
        elif len(client.started) >= self.in_flight:
            why = f"{len(client.started)} sign-ins started in {self.ttl:g} s"
            wait = client.started[0] + self.ttl - now
        elif client.tokens < 1.0:
            why = f"more than {self.burst} sign-ins at once, or {self.per_second * 60:g} a minute"
            wait = (1.0 - client.tokens) / self.per_second
        else:
            client.tokens -= 1.0
            client.started.append(now)
            return None
        return self._refusal(client, why, wait, now)

    def hold(self, host: str, seconds: float, why: str) -> Refusal:
        """Refuse ``host`` for ``seconds`` more: the store found its share of the logins
        in flight full, most of them started on other replicas. Its start stays
        counted here, so that being refused by the store is not free."""
        now = self.clock()
        client = self._seen(host, now)
        client.held_until = max(client.held_until, now + seconds)
        client.held_why = why
        return self._refusal(client, why, seconds, now)

    def refund(self, host: str) -> None:
        """Take back the last start of ``host``: it wrote no login (the provider could
        not be reached), and a person polling a provider that is down must not use up
        their sign-ins."""
        client = self._clients.get(client_key(host))
        if client is not None:
            client.tokens = min(float(self.burst), client.tokens + 1.0)
            if client.started:
                client.started.pop()


__all__ = ["LOGIN_RATE", "MAX_CLIENTS", "MAX_LOGINS", "LoginLimiter", "Refusal", "client_key"]
