"""The per-client limits on starting sign-ins (sled_gateway.auth.login_limits), on a
hand-moved clock: the bucket's rate and burst, the share of logins in flight, one
log line per client per window, and a table of clients that stays bounded under a
flood from many addresses. (The limits in the real sign-in flow, against a real
provider: tests/test_oidc_browser.py.)"""

from __future__ import annotations

import pytest

from sled_gateway.auth.login_limits import LOG_WINDOW, LoginLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_burst_then_the_rate_then_429_with_the_wait(clock: Clock) -> None:
    limits = LoginLimiter(rate=10, ttl=600, clock=clock)  # burst 20, 30 in flight
    assert all(limits.start("192.0.2.1") is None for _ in range(20))
    refused = limits.start("192.0.2.1")
    assert refused is not None and refused.retry_after == 6  # one every 6 s
    clock.now += 6
    assert limits.start("192.0.2.1") is None
    assert limits.start("192.0.2.1") is not None
    # Another client has its own bucket.
    assert limits.start("192.0.2.2") is None


def test_a_person_retrying_now_and_then_is_never_refused(clock: Clock) -> None:
    limits = LoginLimiter(rate=10, ttl=600, clock=clock)
    for _ in range(100):  # a start every 30 s, for 50 minutes
        assert limits.start("192.0.2.1") is None
        clock.now += 30


def test_one_client_holds_at_most_its_share_of_the_logins_in_flight(clock: Clock) -> None:
    limits = LoginLimiter(rate=10, ttl=600, clock=clock)  # 30 in flight
    started = 0
    while limits.start("192.0.2.1") is None:
        started += 1
        clock.now += 6  # as fast as the bucket allows
    assert started == 30
    refused = limits.start("192.0.2.1")
    assert refused is not None and "in 600 s" in refused.why
    assert 0 < refused.retry_after <= 600
    clock.now += refused.retry_after  # the oldest expired: room for one
    assert limits.start("192.0.2.1") is None


def test_a_client_the_store_refused_is_held_here_until_its_oldest_login_expires(
    clock: Clock,
) -> None:
    """Its share is full on other replicas: further starts here are refused without a
    store write, logged once, and it is as any client again once the wait is over."""
    limits = LoginLimiter(rate=10, ttl=600, clock=clock)
    assert limits.start("2001:db8::1") is None
    held = limits.hold("2001:db8::2", 42.5, "6 sign-ins in flight from this client")
    assert held.retry_after == 43 and held.log
    clock.now += 10
    again = limits.start("2001:db8::3")  # the same /64
    assert again is not None and again.why == held.why
    assert again.retry_after == 33 and not again.log
    assert limits.start("2001:db9::1") is None  # another client is not held
    clock.now += 33
    assert limits.start("2001:db8::4") is None
    # Held entries are not dropped as idle while held.
    limits.hold("192.0.2.9", 600, "full")
    clock.now += 300
    for n in range(20):
        limits.start(f"198.51.100.{n}")
    assert limits.start("192.0.2.9") is not None


def test_a_refused_client_is_logged_once_per_window(clock: Clock) -> None:
    limits = LoginLimiter(rate=1, burst=1, in_flight=1, ttl=600, clock=clock)
    assert limits.start("192.0.2.1") is None
    logged = []
    for _ in range(50):
        refusal = limits.start("192.0.2.1")
        assert refusal is not None
        logged.append(refusal.log)
        clock.now += 0.5
    assert logged.count(True) == 1
    clock.now += LOG_WINDOW
    refusal = limits.start("192.0.2.1")
    assert refusal is not None and refusal.log


def test_an_ipv6_host_counts_as_its_64(clock: Clock) -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    limits = LoginLimiter(rate=1, burst=2, ttl=600, clock=clock)
    assert limits.start("2001:db8::1") is None
    assert limits.start("2001:db8::2") is None
    assert limits.start("2001:db8::3") is not None


def test_the_table_of_clients_stays_bounded_under_a_flood_of_addresses(clock: Clock) -> None:
    limits = LoginLimiter(rate=10, ttl=600, max_clients=500, clock=clock)
    for i in range(20_000):
        limits.start(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(limits) <= 500
    # Entries as good as new are dropped as requests come: an hour later, a trickle
    # of new clients empties the table of the flood's.
    clock.now += 3600
    for i in range(200):
        limits.start(f"192.0.2.{i}")
    assert len(limits) <= 200 + 4


def test_a_refusal_counts_nothing(clock: Clock) -> None:
    limits = LoginLimiter(rate=6, burst=1, ttl=600, clock=clock)  # one every 10 s
    assert limits.start("192.0.2.1") is None
    for _ in range(100):
        assert limits.start("192.0.2.1") is not None
    clock.now += 10
    assert limits.start("192.0.2.1") is None


def test_a_start_given_back_does_not_count(clock: Clock) -> None:
    limits = LoginLimiter(rate=1, burst=2, in_flight=2, ttl=600, clock=clock)
    for _ in range(10):  # the provider down: each start is given back
        assert limits.start("192.0.2.1") is None
        limits.refund("192.0.2.1")
    assert limits.start("192.0.2.1") is None
    assert limits.start("192.0.2.1") is None
    assert limits.start("192.0.2.1") is not None
    limits.refund("192.0.2.9")  # a client never seen: nothing to give back
