"""Fault injection: the uplink survives faults, floods, long runs and fuzzing.

Run alone with ``pytest -m faults``; it also runs in the full suite. Each test
prints its measured detection/recovery times (``pytest -s`` shows them).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging
from protocol import Decision, Reason
from tests.conftest import FAST, eventually, scaled
from tests.support.faulty import RawServer, never_answer
from tests.support.gateway import Gateway, Session
from tests.support.relay import FreezableRelay

pytestmark = pytest.mark.faults


def report(name: str, **figures: float) -> None:
    print(f"\nFAULT {name}: " + ", ".join(f"{k}={v:.3f}s" for k, v in figures.items()))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connection_state(uplink: Uplink) -> dict[str, Any]:
    return uplink.status()["connection"]


# ── 1. half-open ────────────────────────────────────────────────────────────


def test_half_open_connection_is_detected_denied_and_healed(gateway: Gateway, make_uplink) -> None:
    ping_interval, ping_timeout = 0.5, 0.5
    with FreezableRelay(gateway.port) as relay:
        uplink = make_uplink(
            relay.url(f"/api/sled-uplink?token={gateway.token}"),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_initial=0.05,
            open_timeout=0.5,
        )
        gateway.frame(gateway.session(1), "identity")
        in_flight = [uplink.request_permission("Bash", {"n": i}) for i in range(3)]
        gateway.wait_until(lambda: len(gateway.sessions[0].of_type("perm_request")) == 3)
        relay.freeze()
        frozen_at = time.monotonic()
        outcomes = [f.result(timeout=scaled(10)) for f in in_flight]
        detected = time.monotonic() - frozen_at
        assert {(o.decision, o.reason) for o in outcomes} == {(Decision.DENY, Reason.SESSION_ENDED)}
        assert detected <= ping_interval + ping_timeout + 1.0 + scaled(0.5)
        relay.heal()
        healed_at = time.monotonic()
        gateway.frame(gateway.session(2, timeout=scaled(10)), "identity")
        recovered = time.monotonic() - healed_at
        report("half-open", detect=detected, recover=recovered)


# ── 2. gateway faults ───────────────────────────────────────────────────────


def _ended_then_reconnected(gateway: Gateway, uplink: Uplink, act, expect_in_reason: str) -> None:
    first = gateway.session(1)
    gateway.frame(first, "identity")
    pending = uplink.request_permission("Bash", {})
    gateway.frame(first, "perm_request")
    started = time.monotonic()
    act(first)
    outcome = pending.result(timeout=scaled(5))
    detected = time.monotonic() - started
    assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SESSION_ENDED)
    gateway.frame(gateway.session(2, timeout=scaled(5)), "identity")
    recovered = time.monotonic() - started
    # the log (and /status) say why
    last_end = connection_state(uplink)["last_end"] or ""
    history = uplink.status()["connection"]
    assert expect_in_reason in last_end, (last_end, history)
    return detected, recovered


def test_abrupt_abort_mid_frame(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    detected, recovered = _ended_then_reconnected(
        gateway, uplink, gateway.abort_mid_frame, "without a close frame"
    )
    report("abort mid-frame", detect=detected, recover=recovered)


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 1012, 4000, 4999])
def test_close_frames_with_various_codes(gateway: Gateway, make_uplink, code: int) -> None:
    uplink = make_uplink(gateway.url)
    detected, recovered = _ended_then_reconnected(
        gateway, uplink, lambda s: gateway.close(s, code, "test close"), f"code {code}"
    )
    report(f"close {code}", detect=detected, recover=recovered)


def test_refused_connections_back_off_then_connect(make_uplink) -> None:
    with Gateway() as gw:
        port, url = gw.port, gw.url
    started = time.monotonic()
    uplink = make_uplink(url, backoff_initial=0.05, backoff_max=0.4)
    time.sleep(1.5)
    attempts = connection_state(uplink)["sessions_started"]
    # 0.05+0.1+0.2+0.4+0.4… ≈ 6–7 attempts in 1.5 s (±20 %); a busy loop would be thousands.
    assert 3 <= attempts <= 12, attempts
    assert (
        "Refused" in connection_state(uplink)["last_end"]
        or "refused" in connection_state(uplink)["last_end"]
    )
    revived = Gateway()
    revived.start(port)
    try:
        revived_at = time.monotonic()
        revived.frame(revived.session(1, timeout=scaled(3)), "identity")
        report("refused", recover=time.monotonic() - revived_at)
        print(f"  {attempts} connect attempts in 1.5 s (no busy loop)")
    finally:
        revived.stop()
    assert time.monotonic() - started < scaled(10)


def test_handshake_that_never_completes_hits_the_open_timeout(make_uplink) -> None:
    with RawServer(never_answer) as server:
        uplink = make_uplink(server.url(), open_timeout=0.3, backoff_initial=0.05, backoff_max=0.2)
        started = time.monotonic()
        eventually(lambda: server.accepted >= 3, timeout=5)
        state = connection_state(uplink)
        assert "handshake timed out" in state["last_end"]
        assert state["sessions_up"] == 0
        report("open timeout", detect=(time.monotonic() - started) / 3)


@pytest.mark.parametrize("status", [401, 403, 500])
def test_handshake_refused_with_http_status(make_uplink, status: int) -> None:
    with Gateway(reject_status=status) as gw:
        uplink = make_uplink(gw.url, backoff_initial=0.05, backoff_max=0.6)
        gw.wait_until(lambda: gw.handshakes >= 2, timeout=scaled(5))
        times = []
        gw.wait_until(
            lambda: times.append(time.monotonic()) or gw.handshakes >= 3, timeout=scaled(5)
        )
        last_end = connection_state(uplink)["last_end"]
        assert f"HTTP {status}" in last_end
        if status in (401, 403):
            assert "token" in last_end
        gw.reject_status = None
        fixed_at = time.monotonic()
        gw.frame(gw.session(1, timeout=scaled(5)), "identity")
        report(f"HTTP {status}", recover=time.monotonic() - fixed_at)


# ── 3. floods and size ──────────────────────────────────────────────────────


def test_flood_of_unknown_frames_and_responses(gateway: Gateway, make_uplink) -> None:
    gateway.auto = "approve"
    uplink = make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    before = rss_kib()

    async def burst() -> None:
        for i in range(20_000):
            await session.ws.send(f'{{"type":"flood","req_id":"{i}","payload":null}}')
        for i in range(2_000):
            await session.ws.send(
                f'{{"type":"perm_response","req_id":"ghost-{i}","payload":{{"approved":true}}}}'
            )

    started = time.monotonic()
    gateway._call(burst, timeout=scaled(60))
    eventually(
        lambda: uplink.status()["counters"].get("frames_in", {}).get("perm_response", 0) >= 2_000,
        timeout=60,
    )
    drained = time.monotonic() - started
    counters = uplink.status()["counters"]
    assert counters["frames_dropped"]["unknown_type"] == 20_000
    assert "decisions" not in counters, "a ghost response must decide nothing"
    assert uplink.decide("Bash", {}, timeout=scaled(5)).decision is Decision.APPROVE
    assert not session.closed and len(gateway.sessions) == 1
    grown_mib = (rss_kib() - before) / 1024
    assert grown_mib < 64, grown_mib
    report("flood 22k frames", drain=drained)


def test_text_frame_over_the_maximum_size(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    started = time.monotonic()
    gateway.send_raw(session, "x" * (16 * 1024 * 1024 + 1))
    gateway.wait_closed(session, timeout=scaled(10))
    assert session.close_code == 1009
    gateway.frame(gateway.session(2, timeout=scaled(5)), "identity")
    assert "1009" in connection_state(uplink)["last_end"]
    report("frame > 16 MiB", recover=time.monotonic() - started)


def test_storm_of_permission_requests(gateway: Gateway, make_uplink) -> None:
    gateway.auto = "approve"
    uplink = make_uplink(gateway.url)
    gateway.frame(gateway.session(1), "identity")
    started = time.monotonic()
    futures = [uplink.request_permission("Bash", {"i": i}) for i in range(5_000)]
    outcomes = [f.result(timeout=scaled(60)) for f in futures]
    elapsed = time.monotonic() - started
    assert all(o.decision is Decision.APPROVE for o in outcomes)
    assert len({o.request_id for o in outcomes}) == 5_000
    assert sum(uplink.status()["counters"]["decisions"].values()) == 5_000
    eventually(lambda: uplink.status()["permissions"]["pending"] == 0, timeout=5)
    report("storm 5000", total=elapsed)


# ── 5. soak ─────────────────────────────────────────────────────────────────


def _proc_figures(pid: int) -> tuple[int, int, int]:
    """(threads, open fds, RSS KiB) of another process, from /proc."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return threads, fds, rss


@pytest.mark.slow
def test_soak_connect_identity_close_cycles() -> None:
    """500 sessions of a real run_uplink.py process; its threads, fds and RSS stay flat."""
    repo = Path(__file__).resolve().parents[1]
    with Gateway() as gw:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(repo / "run_uplink.py"),
                "--upstream-gateway",
                gw.url,
                "--listen",
                "off",
                "--backoff-initial",
                "0.001",
                "--backoff-max",
                "0.002",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            closed = 0

            def cycle_to(n: int) -> None:
                nonlocal closed
                while closed < n:
                    closed += 1
                    session = gw.session(closed, timeout=scaled(10))
                    gw.frame(session, "identity")
                    gw.close(session, 1000)
                    # The gateway forgets what it no longer needs: measure the uplink, not us.
                    session.frames.clear()
                    session.raw.clear()

            cycle_to(50)
            time.sleep(0.2)
            baseline = _proc_figures(proc.pid)
            started = time.monotonic()
            cycle_to(500)
            elapsed = time.monotonic() - started
            time.sleep(0.3)  # let the last connection actor finish stopping
            after = _proc_figures(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    assert after[0] <= baseline[0] + 1, (baseline, after)  # threads: +1 at most (a live session)
    assert after[1] <= baseline[1] + 4, (baseline, after)  # fds: +4 at most
    assert after[2] - baseline[2] < 8 * 1024, (baseline, after)  # RSS: < 8 MiB growth
    report("soak 450 cycles", total=elapsed)
    print(f"  threads/fds/RSS KiB after 50 cycles {baseline}, after 500 {after}")


@pytest.mark.slow
def test_soak_permission_round_trips_do_not_grow_state(gateway: Gateway, make_uplink) -> None:
    configure_logging("WARNING")  # captured DEBUG output would itself grow RSS
    gateway.auto = "approve"
    uplink = make_uplink(gateway.url)
    gateway.frame(gateway.session(1), "identity")
    registry_ref = uplink.context.directory.get("permissions")
    for _ in range(1_000):
        uplink.decide("Bash", {}, timeout=scaled(5))
    rss_before = rss_kib()
    started = time.monotonic()
    for _ in range(10_000):
        assert uplink.decide("Bash", {}, timeout=scaled(5)).decision is Decision.APPROVE
    elapsed = time.monotonic() - started
    book = registry_ref.proxy().book.get(timeout=5)  # the actor's own object (not a copy)
    assert not book.pending and not book.held
    assert len(book._deadlines) <= 64
    assert (rss_kib() - rss_before) < 16 * 1024
    report("10k round trips", total=elapsed)


# ── 7. fuzz ─────────────────────────────────────────────────────────────────

Op = tuple[str, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "submit",
                "approve",
                "deny",
                "always",
                "contradict",
                "wrong_session",
                "garbage",
                "ghost",
                "close",
                "abort",
                "duplicate",
            ]
        ),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops)
def test_fuzz_sequences_decide_everything_exactly_once(sequence: list[Op]) -> None:
    approvals: set[tuple[str, int]] = set()  # (req_id, session) the gateway approved on
    # Every session each request id went out on (an id may be reused once decided).
    sent_on: dict[str, list[int]] = {}
    with Gateway() as gw:

        def record(session: Session, frame: dict[str, Any]) -> None:
            sent_on.setdefault(frame["req_id"], []).append(session.number)

        gw.auto = record
        config = UplinkConfig(
            upstream_url=gw.url,
            project="fuzz",
            **{**FAST, "backoff_initial": 0.01, "backoff_max": 0.05},
        )
        uplink = Uplink(config).start()
        futures: dict[str, concurrent.futures.Future] = {}
        try:
            for op, n in sequence:
                live = [s for s in gw.sessions if not s.closed]
                session = live[-1] if live else None
                known = [r for r in futures if r in sent_on]
                target = known[n % len(known)] if known else f"none-{n}"
                if op in ("submit", "duplicate"):
                    rid = target if op == "duplicate" and known else f"r{len(futures)}"
                    future = uplink.request_permission("Bash", {"n": n}, request_id=rid)
                    futures.setdefault(rid, future) if op == "submit" else futures.setdefault(
                        f"{rid}#dup{len(futures)}", future
                    )
                    if op == "submit":
                        try:
                            gw.wait_until(
                                lambda rid=rid, future=future: rid in sent_on or future.done(),
                                timeout=0.5,
                            )
                        except TimeoutError:
                            pass  # held while disconnected
                elif session is None:
                    continue
                elif op in ("approve", "always", "contradict", "deny", "wrong_session"):
                    payload = {
                        "approve": {"approved": True},
                        "always": {"always_allow": True},
                        "contradict": {"always_allow": True, "approved": False},
                        "deny": {"approved": False},
                        "wrong_session": {"approved": True},
                    }[op]
                    if op in ("approve", "always") and session.number in sent_on.get(target, []):
                        approvals.add((target, session.number))
                    if op == "wrong_session" and session.number in sent_on.get(target, []):
                        continue  # only meaningful on another session
                    try:
                        gw.respond(session, target, payload)
                    except Exception:
                        pass  # the session died meanwhile
                elif op == "garbage":
                    try:
                        gw.send_raw(session, "{{{not json")
                    except Exception:
                        pass
                elif op == "ghost":
                    try:
                        gw.respond(session, f"ghost-{n}", {"approved": True})
                    except Exception:
                        pass
                elif op == "close":
                    gw.close(session, 1000)
                elif op == "abort":
                    gw.abort(session)
            time.sleep(0.05)
        finally:
            uplink.stop()
        outcomes = {rid: f.result(timeout=scaled(5)) for rid, f in futures.items()}
        decisions = uplink.status()["counters"].get("decisions", {})
    # Exactly one decision each: the registry counted one per submission, no more.
    assert sum(decisions.values()) == len(futures), (decisions, len(futures))
    for rid, outcome in outcomes.items():
        base = rid.split("#")[0]
        if outcome.decision.allows:
            # Only what the gateway approved on the session the request went out on.
            approved_on = {s for r, s in approvals if r == base}
            assert approved_on & set(sent_on.get(base, [])), (rid, outcome, sent_on.get(base))
