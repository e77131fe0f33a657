"""What replicas share through the store, run against every engine
(``tests/test_store_interface.py``'s engines: SQLite file, SQLite in memory,
PostgreSQL): console sessions with their bounds and expiry, logins in flight,
settings made once, and the rules read again after another store changed them.

Two stores on one database stand for two replicas (PostgreSQL only: a SQLite
file takes one gateway, by its lock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sled_gateway.auth.console import Sessions
from sled_gateway.people import Person
from sled_gateway.store import ClientLoginsFull, LoginsFull, make_store
from tests.test_store_interface import ENGINES, Engine, _engine, rule, run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(request, tmp_path)


@pytest.fixture
def shared(pg_url: str) -> Iterator[tuple[Engine, Engine]]:
    """Two stores on one PostgreSQL database (two replicas)."""
    first, second = Engine(pg_url, persistent=True), Engine(pg_url, persistent=True)
    yield first, second
    for store in first.opened + second.opened:
        store.close()


def test_sessions_keep_their_bounds_and_expire(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        sessions = Sessions(store, limit=6, per_person=2, cache_seconds=0)
        operator = await sessions.create()
        mallory = Person(
            "https://idp.test", "mallory", email="m@example.test", groups=frozenset({"g"})
        )
        hers = [await sessions.create(mallory) for _ in range(5)]
        assert [await sessions.valid(s) for s in hers] == [False, False, False, True, True]
        found = await sessions.get(hers[-1])
        assert found is not None and found.person == mallory  # groups and email kept
        others = [await sessions.create(Person("https://idp.test", f"p{i}")) for i in range(6)]
        assert not await sessions.valid(operator), "the global bound did not push the oldest out"
        assert all([await sessions.valid(s) for s in others])
        short = Sessions(store, ttl=0.2, limit=6, per_person=2)
        brief = await short.create()
        assert await short.valid(brief)
        await asyncio.sleep(0.3)
        assert not await short.valid(brief), "an expired session (cached) still counted"
        assert not await sessions.valid(brief)

    run(scenario())


def test_a_session_outlives_its_store_being_closed(tmp_path: Path, pg_url: str) -> None:
    for location in (str(tmp_path / "g.db"), pg_url):
        store = make_store(location).open()
        session_id = run(Sessions(store).create(Person("https://idp.test", "alice")))
        store.close()
        again = make_store(location).open()
        try:
            found = run(Sessions(again).get(session_id))
            assert found is not None and found.person == Person("https://idp.test", "alice")
        finally:
            again.close()


def test_a_session_ended_by_one_replica_ends_on_the_other_within_its_cache_bound(
    shared: tuple[Engine, Engine],
) -> None:
    a, b = (engine.open() for engine in shared)

    async def scenario() -> None:
        on_a, on_b = Sessions(a, cache_seconds=0.5), Sessions(b, cache_seconds=0.5)
        session_id = await on_a.create()
        assert await on_b.valid(session_id)  # B reads it, and keeps it for 0.5 s
        assert await on_a.end(session_id)  # no bus here: B hears nothing
        began = time.monotonic()
        while await on_b.valid(session_id):
            assert time.monotonic() - began < 0.5 + 1.0, "B kept an ended session"
            await asyncio.sleep(0.05)
        # With the bus's word, at once.
        other = await on_a.create()
        assert await on_b.valid(other)
        await on_a.end(other)
        on_b.on_bus_message({"ended": [Sessions._key(other)]})
        assert not await on_b.valid(other)

    run(scenario())


def test_logins_in_flight_are_single_use_bounded_and_expire(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        await store.set_login_state("k1", "v1", 60, limit=3)
        assert await store.login_state("k1") == "v1"
        await store.delete_login_state("k1")
        assert await store.login_state("k1") is None
        for i in range(3):
            await store.set_login_state(f"n{i}", str(i), 60, limit=3)
        # Full of unexpired logins: a new one is refused, none someone started is forgotten.
        for i in (3, 4):
            with pytest.raises(LoginsFull):
                await store.set_login_state(f"n{i}", str(i), 60, limit=3)
        assert [await store.login_state(f"n{i}") for i in range(5)] == ["0", "1", "2", None, None]
        await store.delete_login_state("n0")
        await store.set_login_state("short", "x", 0.05, limit=3)
        await asyncio.sleep(0.1)
        assert await store.login_state("short") is None
        await store.set_login_state("after", "y", 60, limit=3)  # the expired one made room
        assert await store.login_state("after") == "y"

    run(scenario())


def test_one_clients_share_of_the_logins_in_flight_is_kept_by_the_store(engine: Engine) -> None:
    store = engine.open()

    async def scenario() -> None:
        def start(key: str, client: str, ttl: float = 60) -> Any:
            return store.set_login_state(key, "v", ttl, limit=10, client=client, per_client=2)

        await start("a1", "198.51.100.7")
        await start("a2", "198.51.100.7", ttl=30)
        with pytest.raises(ClientLoginsFull) as refused:
            await start("a3", "198.51.100.7")
        # Until the client's oldest login expires, not a full ttl.
        assert 25 < refused.value.retry_after <= 30
        assert await store.login_state("a3") is None
        await start("b1", "2001:db8::/64")  # another client has its own share
        await store.delete_login_state("a1")  # a login that ended frees its place
        await start("a3", "198.51.100.7")
        await store.set_login_state("short", "v", 0.05, limit=10, client="c", per_client=1)
        await asyncio.sleep(0.1)
        await store.set_login_state("again", "v", 60, limit=10, client="c", per_client=1)
        # The table's own bound still holds for everyone.
        for i in range(6):  # 4 kept, and 6 more from 6 clients: the table's 10
            await start(f"n{i}", f"203.0.113.{i}")
        with pytest.raises(LoginsFull):
            await start("n6", "203.0.113.6")

    run(scenario())


def test_a_clients_share_spans_replicas(shared: tuple[Engine, Engine]) -> None:
    """A client sending its sign-ins to two replicas in turn gets no bigger share."""
    a, b = (engine.open() for engine in shared)

    async def scenario() -> None:
        for n, store in enumerate((a, b, a)):
            await store.set_login_state(f"k{n}", "v", 60, limit=100, client="x", per_client=3)
        for store in (b, a):
            with pytest.raises(ClientLoginsFull):
                await store.set_login_state("k9", "v", 60, limit=100, client="x", per_client=3)

    run(scenario())


def test_a_setting_is_made_once_whoever_asks_first(shared: tuple[Engine, Engine]) -> None:
    a, b = (engine.open() for engine in shared)

    async def scenario() -> None:
        made = await asyncio.gather(
            *(s.setting("key", lambda i=i: f"value-{i}") for i, s in enumerate((a, b, a, b)))
        )
        assert len(set(made)) == 1, made
        assert await b.setting("key", lambda: "other") == made[0]

    run(scenario())


def test_rules_changed_by_another_store_are_read_again_and_only_then(
    shared: tuple[Engine, Engine],
) -> None:
    a, b = (engine.open() for engine in shared)

    async def scenario() -> None:
        assert not await b.reload_rules(), "nothing changed, yet the rules were read"
        made = await a.add_rule(rule())
        assert b.policy.match("p", "Bash", {"command": "make"}) is None
        assert await b.reload_rules()
        assert b.policy.match("p", "Bash", {"command": "make"}) == made
        assert not await b.reload_rules()
        await a.revoke_rule(made.id, "operator")
        assert await b.reload_rules()
        assert b.policy.match("p", "Bash", {"command": "make"}) is None

    run(scenario())


def test_a_reload_racing_a_revocation_here_never_brings_the_rule_back(
    shared: tuple[Engine, Engine],
) -> None:
    a, b = (engine.open() for engine in shared)

    async def scenario() -> None:
        for i in range(30):
            made = await b.add_rule(rule(key=f"cmd{i}"))
            await a.add_rule(rule(key=f"other{i}"))  # so that B's reload reads rows
            # The reload is queued before the revocation: it may read the rule as active.
            reload = asyncio.ensure_future(b.reload_rules())
            await b.revoke_rule(made.id, "operator")
            await reload
            assert b.policy.match("p", "Bash", {"command": f"cmd{i}"}) is None, i

    run(scenario())
