"""The read model (GatewayState) follows the gateway's events, and only them."""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections import Counter
from datetime import UTC, datetime

from sled_gateway.events import (
    Events,
    FrameReceived,
    PermissionDecided,
    PermissionRequested,
    PermissionWithdrawn,
    SledDown,
    SledHeartbeat,
    SledUp,
)
from sled_gateway.records import DecisionRecord, PendingPermission, iso
from sled_gateway.state import GatewayState, SledRecord, SledState, tally_states


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_read_model_follows_events() -> None:
    clock = Clock()
    state = GatewayState(10.0, mono=clock, wall=clock)
    events = Events()
    state.follow(events)

    events.publish(SledUp(1, "p", "127.0.0.1:5000", {"version": "x"}))
    events.publish(FrameReceived(1, "p", dropped=False))
    events.publish(FrameReceived(1, "p", dropped=True))
    events.publish(FrameReceived(99, "p", dropped=True))  # another session's: not this sled's
    clock.now += 5
    events.publish(SledHeartbeat(1, "p"))
    (sled,) = state.snapshot()["sleds"]
    assert (sled["state"], sled["frames_in"], sled["frames_dropped"]) == ("connected", 2, 1)
    assert sled["info"] == {"version": "x"}
    assert state.is_connected("p")

    item = PendingPermission("p", "r1", "Bash", {"command": "ls"}, clock.now, 1)
    events.publish(PermissionRequested(item))
    assert state.is_pending("p", "r1") and state.pending_count("p") == 1
    record = DecisionRecord("p", "r1", "Bash", "approve", "console", clock.now, 0.5)
    events.publish(PermissionDecided(record))
    assert not state.is_pending("p", "r1")
    assert state.decision_for("p", "r1") == record

    second = PendingPermission("p", "r2", "Read", {}, clock.now, 1)
    events.publish(PermissionRequested(second))
    withdrawn = DecisionRecord("p", "r2", "Read", "withdrawn", "sled_disconnected", clock.now, 1.0)
    events.publish(PermissionWithdrawn(second, withdrawn))
    events.publish(SledUp(2, "p", "127.0.0.1:5001", {}))  # a newer session replaces it
    events.publish(SledDown(1, "p", 1006))  # the old session's late end
    assert state.is_connected("p")
    events.publish(SledDown(2, "p", 1000))
    snap = state.snapshot()
    assert snap["sleds"][0]["state"] == "disconnected"
    assert snap["sleds"][0]["close_code"] == 1000
    assert [d["req_id"] for d in snap["decisions"]] == ["r2", "r1"]
    assert snap["pending"] == []


def test_a_wait_predicate_may_wait_on_a_change_another_thread_makes() -> None:
    """A test's predicate may ask the gateway's loop for something (``gw.audit()``), and
    the loop takes the state's lock to apply an event: the predicate must not run
    under that lock, or both wait until one times out."""
    state = GatewayState(10.0)
    events = Events()
    state.follow(events)
    first_answers: list[bool] = []

    def predicate(_snapshot: dict[str, object]) -> bool:
        applied = threading.Event()

        def change() -> None:
            events.publish(SledUp(1, "p", "127.0.0.1:5000", {}))
            applied.set()

        threading.Thread(target=change, daemon=True).start()
        answer = applied.wait(2.0)
        first_answers.append(answer)
        return answer

    state.wait_for(predicate, 10.0)
    assert first_answers[0], "the change waited for the predicate to give the lock back"
    assert state.is_connected("p")


def test_the_listed_sleds_are_the_first_by_name_as_sleds_come_go_and_move() -> None:
    """``/api/state?limit=N`` lists the first N sleds by name, from an order the read
    model keeps between polls: every way a sled comes, goes or changes hands (its own
    sessions, other replicas' reads, forgetting the long gone) must leave it exact."""
    clock = Clock()
    state = GatewayState(10.0, mono=clock, wall=clock)
    events = Events()
    state.follow(events)
    rng = random.Random(26)
    names = [f"sled{n}" for n in range(40)]
    session = itertools.count(1)
    sessions: dict[str, int] = {}

    def remote(project: str) -> SledRecord:
        return SledRecord(project, next(session), "10.0.0.1:1", clock.now, clock.now, replica="r2")

    for step in range(600):
        clock.now += rng.uniform(0, 3)
        project = rng.choice(names)
        action = rng.randrange(5)
        if action == 0:
            sessions[project] = next(session)
            events.publish(SledUp(sessions[project], project, "127.0.0.1:1", {}))
        elif action == 1 and project in sessions:
            events.publish(SledDown(sessions.pop(project), project, 1000))
        elif action == 2:
            state.forget_disconnected(older_than=rng.uniform(0, 10))
        elif action == 3:
            state.set_fleet([remote(p) for p in rng.sample(names, rng.randrange(8))], [])
        else:
            moved = rng.sample(names, rng.randrange(1, 6))
            held = [remote(p) for p in moved if rng.random() < 0.5]
            state.update_fleet(moved, held, [], [])
        whole = state.snapshot()
        listed = [s["project"] for s in whole["sleds"]]
        assert listed == sorted(set(listed)), f"step {step}: not in order, or twice"
        assert len(listed) == whole["counts"]["sleds"], f"step {step}: {listed}"
        for limit in (0, 1, 7):
            first = [s["project"] for s in state.snapshot(limit=limit)["sleds"]]
            assert first == listed[:limit], f"step {step}, limit {limit}"


def test_the_state_tally_counts_each_sled_as_its_own_state_says() -> None:
    """``counts`` in ``/api/state`` inlines :meth:`SledRecord.state_at`: the same rule."""
    rng = random.Random(5)
    now = 1000.0
    records = [
        SledRecord(
            f"s{n}",
            n,
            "127.0.0.1:1",
            now,
            # Around the stale bound, and exactly on it.
            now - rng.choice([0.0, 29.999, 30.0, 30.001, rng.uniform(0, 60)]),
            disconnected_at=now if rng.random() < 0.3 else None,
        )
        for n in range(500)
    ]
    expected = Counter(rec.state_at(now, 30.0) for rec in records)
    assert tally_states(records, now, 30.0) == {state: expected[state] for state in SledState}
    assert set(expected) == set(SledState)


def test_iso_writes_a_time_as_datetime_does_ties_and_carries_included() -> None:
    rng = random.Random(8)
    times = [rng.uniform(0, 4e9) for _ in range(20_000)]
    times += [rng.uniform(1.7e9, 1.8e9) for _ in range(20_000)]
    # Half a microsecond (a rounding tie), a fraction that rounds up to the next second,
    # the float just below each, the epoch.
    times += [1.7e9 + (k + 0.5) / 1e6 for k in range(0, 1_000_000, 997)]
    times += [1.7e9 + 0.9999995, 1733598000.9999999, 1733598000.9995, 0.0, 1.5]
    times += [math.nextafter(t, 0) for t in times[-2_000:]]
    for t in times:
        assert iso(t) == datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds"), t
    assert iso(None) is None
