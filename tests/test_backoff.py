"""Reconnect back-off: the pure rules, then the real uplink.

The pure tests drive :class:`Backoff` with an injected RNG; the end-to-end
ones watch a real uplink retry against the test gateway (or a closed port),
with short configured delays and generous margins.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from actors import Uplink
from actors.backoff import Backoff
from actors.messages import GetSnapshot
from protocol import Decision
from tests.conftest import closed_port, eventually, scaled
from tests.support.gateway import Gateway, Session


def _backoff(rng: Callable[[], float] = lambda: 0.5, **overrides: float) -> Backoff:
    settings: dict[str, float] = {
        "initial": 1.0,
        "maximum": 60.0,
        "multiplier": 2.0,
        "reset_after": 30.0,
    }
    settings.update(overrides)
    return Backoff(rng=rng, **settings)  # type: ignore[arg-type]


# ═══ pure logic ═════════════════════════════════════════════════════════════


def test_waits_grow_by_the_multiplier_up_to_the_cap() -> None:
    backoff = _backoff()  # rng 0.5: no jitter
    waits = [backoff.next_delay(None) for _ in range(9)]
    assert waits == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60])


def test_short_sessions_grow_the_wait_like_failed_connects() -> None:
    backoff = _backoff()
    waits = [backoff.next_delay(up_for) for up_for in (None, 0.0, 5.0, 29.9)]
    assert waits == pytest.approx([1, 2, 4, 8])


def test_other_multipliers_and_initials() -> None:
    backoff = _backoff(initial=0.5, maximum=10.0, multiplier=3.0)
    assert [backoff.next_delay(None) for _ in range(5)] == pytest.approx([0.5, 1.5, 4.5, 10, 10])
    flat = _backoff(initial=2.0, maximum=10.0, multiplier=1.0)
    assert [flat.next_delay(None) for _ in range(3)] == pytest.approx([2, 2, 2])


def test_jitter_bounds() -> None:
    low = _backoff(rng=lambda: 0.0)
    assert [low.next_delay(None) for _ in range(3)] == pytest.approx([0.8, 1.6, 3.2])
    high = _backoff(rng=lambda: 1.0)
    assert [high.next_delay(None) for _ in range(3)] == pytest.approx([1.2, 2.4, 4.8])


def test_jitter_applies_after_the_cap() -> None:
    high = _backoff(rng=lambda: 1.0, initial=1.0, maximum=4.0)
    assert [high.next_delay(None) for _ in range(5)] == pytest.approx([1.2, 2.4, 4.8, 4.8, 4.8])
    low = _backoff(rng=lambda: 0.0, initial=1.0, maximum=4.0)
    assert [low.next_delay(None) for _ in range(5)] == pytest.approx([0.8, 1.6, 3.2, 3.2, 3.2])


def test_jitter_stays_within_twenty_percent_with_a_real_rng() -> None:
    rng = random.Random(1)
    backoff = _backoff(rng=rng.random, initial=1.0, maximum=8.0)
    bases = [1, 2, 4, 8, 8, 8]
    ratios = []
    for _ in range(300):
        backoff.base = backoff.initial
        for base in bases:
            ratios.append(backoff.next_delay(None) / base)
    assert all(0.8 <= r <= 1.2 for r in ratios)
    assert min(ratios) < 0.82
    assert max(ratios) > 1.18


def test_a_session_that_stayed_up_for_reset_after_resets_the_wait() -> None:
    backoff = _backoff()
    for _ in range(5):
        backoff.next_delay(None)  # grown to 32 next
    assert backoff.next_delay(30.0) == pytest.approx(1)  # stayed up exactly reset_after
    assert backoff.next_delay(None) == pytest.approx(2)  # and grows again from there
    assert backoff.next_delay(31.0) == pytest.approx(1)
    assert backoff.next_delay(29.0) == pytest.approx(2)  # short: no reset


@pytest.mark.parametrize(("rng_value", "expected"), [(0.0, 48.0), (0.5, 60.0), (1.0, 72.0)])
def test_auth_failure_waits_the_jittered_maximum(rng_value: float, expected: float) -> None:
    backoff = _backoff(rng=lambda: rng_value)
    assert backoff.next_delay(None, auth_failed=True) == pytest.approx(expected)
    assert backoff.next_delay(None, auth_failed=True) == pytest.approx(expected)


def test_after_an_auth_failure_the_usual_reset_rule_applies() -> None:
    backoff = _backoff()
    assert backoff.next_delay(None, auth_failed=True) == pytest.approx(60)
    assert backoff.next_delay(45.0) == pytest.approx(1)  # the token was fixed; it stayed up


# ═══ end to end ═════════════════════════════════════════════════════════════


@pytest.fixture
def log_records() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink_id = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink_id)


_BACKOFF_LINE = re.compile(r"-> backoff \(reconnecting in ([0-9.]+)s\)")
ROUNDING = 0.006  # the log line shows two decimals


def _connected(gateway: Gateway, uplink: Uplink, number: int = 1) -> Session:
    session = gateway.session(number, timeout=scaled(5))
    gateway.frame(session, "identity", timeout=scaled(5))
    assert uplink.wait_connected(scaled(5))
    return session


def _backoff_after(records: list[dict[str, Any]], nth: int, timeout: float = 5) -> float:
    """The back-off the supervisor chose after the ``nth`` session ended.

    Read from its state log lines ("... -> backoff (reconnecting in 0.05s)"),
    which, unlike polling the status, cannot miss a short wait.
    """

    def waits() -> list[float]:
        found = []
        for record in list(records):
            if record["extra"].get("actor") == "supervisor":
                match = _BACKOFF_LINE.search(record["message"])
                if match:
                    found.append(float(match.group(1)))
        return found

    return eventually(lambda: len(waits()) >= nth and waits(), timeout, f"back-off #{nth}")[nth - 1]


def _handshake_times(gateway: Gateway, count: int, timeout: float) -> list[float]:
    times: list[float] = []
    seen = 0

    def record() -> bool:
        nonlocal seen
        while seen < gateway.handshakes:
            seen += 1
            times.append(time.monotonic())
        return len(times) >= count

    gateway.wait_until(record, timeout=scaled(timeout))
    return times


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_logs_an_error_and_waits_the_maximum(
    gateway: Gateway, make_uplink, log_records: list[dict[str, Any]], status: int
) -> None:
    gateway.reject_status = status
    uplink = make_uplink(gateway.url, backoff_initial=0.05, backoff_max=0.6)
    times = _handshake_times(gateway, 3, timeout=5)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.6 s ±20 %; the normal schedule would have retried after 0.05 s and 0.1 s.
    assert all(0.6 * 0.8 - 0.02 <= gap <= scaled(0.6 * 1.2 + 1.0) for gap in gaps), gaps
    assert uplink.status()["connection"]["state"] in ("backoff", "connecting")
    assert len(gateway.sessions) == 0
    errors = [r for r in log_records if r["level"].name == "ERROR"]
    assert errors, "a refused token must be logged as an error"
    text = " ".join(r["message"] for r in errors)
    assert "token" in text, text
    assert str(status) in text, text
    assert gateway.token not in text


def test_refused_token_heals_when_the_gateway_accepts_again(gateway: Gateway, make_uplink) -> None:
    gateway.reject_status = 401
    uplink = make_uplink(gateway.url, backoff_initial=0.05, backoff_max=0.3)
    gateway.wait_until(lambda: gateway.handshakes >= 1, timeout=scaled(5))
    gateway.reject_status = None
    _connected(gateway, uplink)
    gateway.auto = "approve"
    assert uplink.decide("Bash", timeout=scaled(5)).decision is Decision.APPROVE


def test_failed_connects_grow_the_wait(make_uplink, log_records: list[dict[str, Any]]) -> None:
    uplink = make_uplink(
        f"ws://127.0.0.1:{closed_port()}/api/sled-uplink", backoff_initial=0.05, backoff_max=0.8
    )
    waits = [_backoff_after(log_records, n) for n in range(1, 7)]
    bases = [0.05, 0.1, 0.2, 0.4, 0.8, 0.8]
    for wait, base in zip(waits, bases, strict=True):
        assert base * 0.8 - ROUNDING <= wait <= base * 1.2 + ROUNDING, (waits, bases)
    assert uplink.status()["connection"]["sessions_up"] == 0


def test_short_sessions_grow_the_wait_and_a_long_one_resets_it(
    gateway: Gateway, make_uplink, log_records: list[dict[str, Any]]
) -> None:
    uplink = make_uplink(
        gateway.url, backoff_initial=0.05, backoff_max=5.0, backoff_reset_after=0.4
    )
    waits = []
    for number in (1, 2, 3):
        session = _connected(gateway, uplink, number)
        gateway.close(session, 1000)  # a short session: closed right after identity
        waits.append(_backoff_after(log_records, number))
    for wait, base in zip(waits, [0.05, 0.1, 0.2], strict=True):
        assert base * 0.8 - ROUNDING <= wait <= base * 1.2 + ROUNDING, waits
    fourth = _connected(gateway, uplink, 4)
    time.sleep(0.5)  # stays up past reset_after
    gateway.close(fourth, 1000)
    assert 0.04 - ROUNDING <= _backoff_after(log_records, 4) <= 0.06 + ROUNDING


def test_reconnect_during_a_long_backoff_connects_at_once(
    gateway: Gateway, make_uplink, log_records: list[dict[str, Any]]
) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=30.0, backoff_max=60.0)
    first = _connected(gateway, uplink)
    gateway.close(first, 1000)
    assert _backoff_after(log_records, 1) >= 24.0
    assert uplink.status()["connection"]["backoff"] >= 24.0
    with pytest.raises(TimeoutError):  # it really is waiting
        gateway.session(2, timeout=0.3)
    started = time.monotonic()
    uplink.reconnect()
    second = _connected(gateway, uplink, 2)
    assert time.monotonic() - started < scaled(2.0)
    assert second.frames[0]["type"] == "identity"
    assert any("reconnecting now" in r["message"] for r in log_records)


def test_reconnect_while_connected_is_ignored(
    gateway: Gateway, make_uplink, log_records: list[dict[str, Any]]
) -> None:
    gateway.auto = "approve"
    uplink = make_uplink(gateway.url)
    first = _connected(gateway, uplink)
    uplink.reconnect()
    supervisor = uplink.context.directory.get("supervisor")
    assert supervisor is not None
    supervisor.ask(GetSnapshot(), timeout=5)  # FIFO mailbox: Reconnect was handled
    assert any("ignored" in r["message"] and "SIGHUP" in r["message"] for r in log_records)
    with pytest.raises(TimeoutError):
        gateway.session(2, timeout=0.3)
    connection = uplink.status()["connection"]
    assert (connection["state"], connection["sessions_started"]) == ("connected", 1)
    assert not first.closed
    assert uplink.decide("Bash", timeout=scaled(5)).decision is Decision.APPROVE
    assert len(gateway.sessions) == 1
