"""Replicas on one PostgreSQL database and one NATS bus share console sessions and rules.

Two ``run_gateway.py`` replicas, a real PostgreSQL server (``tests/pg.py``, an
empty database per test) and a real nats-server (``tests/support/nats.py``).
A browser behind a load balancer addresses one host and port whatever replica
answers; the tests send each request to a replica's own socket with the
``Host`` the browser would send (the other replica's address), as HAProxy
passes it on.

- A console session opened on A is valid on B; a logout on B ends it on A (at
  once with NATS, within the cache bound without); a restarted replica still
  knows it. Forged, unknown and expired ids are 401 on either replica, and a
  session of another gateway's database is 401 here.
- A rule made on A decides a sled's request on B; a revoked allow rule stops
  allowing on B, with NATS up (the message) and with NATS stopped (the sweep).
- When NATS comes back, a replica re-reads the rules and forgets the sessions it
  held, since messages may have been lost meanwhile (``Bus.on_reconnect``).
- Through a real HAProxy (round robin), one cookie works whichever replica
  answers, and one logout ends it on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from websockets.asyncio.client import connect

from sled_gateway import Gateway
from sled_gateway.auth.console import SESSION_CACHE_S
from sled_gateway.sharing import RULES_SWEEP_S
from sled_gateway.store.postgresql import COMMIT_GRACE_S, OPERATION_TIMEOUT_S
from tests.conftest import eventually
from tests.support import nats as nats_support
from tests.support.nats import NatsServer
from tests.support.proc import WatchedProcess

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
T = 5.0 * float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))
OPERATOR = "shared-operator-t0ken"
SLED_TOKEN = "shared-sled-t0ken"
JSON = {"Content-Type": "application/json"}
BEARER = {"Authorization": f"Bearer {OPERATOR}", **JSON}
#: The bound this file holds the replicas to when no bus message arrives: the sweep
#: (or the session cache), and a generous margin for a loaded machine.
WITHOUT_BUS = max(RULES_SWEEP_S, SESSION_CACHE_S) + 3 * T


class Replica(WatchedProcess):
    """One ``run_gateway.py`` on loopback (on ``port``, 0 for any)."""

    def __init__(self, db: str, bus: str, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
        env.update(
            PYTHONUNBUFFERED="1",
            SLED_GATEWAY_OPERATOR_TOKEN=OPERATOR,
            SLED_GATEWAY_TOKEN=SLED_TOKEN,
        )
        argv = [sys.executable, str(ROOT / "run_gateway.py"), "--listen", f"127.0.0.1:{port}"]
        argv += ["--db", db, "--bus", bus, "--log-level", "INFO", *extra]
        super().__init__(argv, cwd=ROOT, env=env, timeout=3 * T)
        self.db, self.bus, self.extra = db, bus, extra
        self.port = int(self.wait_for(r"gateway listening on http://[^\s]+:(\d+)").group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:  # as a Gateway names it, for helpers written for one
        return self.url

    def restarted(self) -> Replica:
        self.kill()
        return Replica(self.db, self.bus, self.port, self.extra)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    nats_support.require()
    server = NatsServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def two(pg_url: str, nats_server: NatsServer) -> Iterator[list[Replica]]:
    made = [Replica(pg_url, nats_server.url)]
    made.append(Replica(pg_url, nats_server.url))  # after A made the schema: no race to test
    yield made
    for replica in made:
        replica.kill()


# -- a browser behind the load balancer ----------------------------------------------


def as_browser_of(
    front: Replica, to: Replica, session: str | None = None, timeout: float = T
) -> httpx.Client:
    """A client that talks to ``to``'s socket as a browser addressing ``front`` does."""
    cookies = {f"sled_gateway_{front.port}": session} if session is not None else {}
    return httpx.Client(
        base_url=to.url,
        headers={"Host": f"127.0.0.1:{front.port}", "Origin": front.url, **JSON},
        cookies=cookies,
        timeout=timeout,
    )


def open_console(front: Replica, to: Replica) -> str:
    """``/?token=`` on ``to``, as a browser of ``front``: the session id it is given."""
    with as_browser_of(front, to) as browser:
        response = browser.get("/", params={"token": OPERATOR})
        assert response.status_code == 303, response.text
        session = response.cookies.get(f"sled_gateway_{front.port}")
        assert session, response.headers
        return session


def status(front: Replica, to: Replica, session: str, timeout: float = T) -> int:
    with as_browser_of(front, to, session, timeout) as browser:
        return browser.get("/api/me").status_code


def logout(front: Replica, to: Replica, session: str) -> None:
    with as_browser_of(front, to, session) as browser:
        response = browser.post("/logout", json={})
        assert response.status_code == 200, response.text


def test_a_session_opened_on_a_works_on_b_and_a_logout_on_b_ends_it_on_a(
    two: list[Replica],
) -> None:
    a, b = two
    session = open_console(a, a)
    assert status(a, a, session) == 200
    assert status(a, b, session) == 200, "B does not know A's session"
    with as_browser_of(a, b, session) as browser:
        me = browser.get("/api/me").json()
        assert me["who"] == "operator" and me["channel"] == "console"
    # Both replicas hold it in their short caches now; the logout lands on B.
    logout(a, b, session)
    began = time.monotonic()
    eventually(lambda: status(a, a, session) == 401, 2 * T, "the logout reaching A")
    assert time.monotonic() - began < WITHOUT_BUS
    assert status(a, b, session) == 401


def test_a_logout_reaches_the_other_replica_within_the_cache_bound_with_nats_stopped(
    two: list[Replica], nats_server: NatsServer
) -> None:
    a, b = two
    session = open_console(a, b)
    assert status(a, a, session) == 200 and status(a, b, session) == 200
    nats_server.stop()
    logout(a, b, session)
    began = time.monotonic()
    eventually(lambda: status(a, a, session) == 401, WITHOUT_BUS, "the logout reaching A")
    took = time.monotonic() - began
    assert took < WITHOUT_BUS, took


def test_a_session_survives_a_restart_of_the_replica_that_opened_it(two: list[Replica]) -> None:
    a, b = two
    session = open_console(a, a)
    two[0] = a = a.restarted()
    assert status(a, a, session) == 200, "the restart signed the operator out"
    assert status(a, b, session) == 200


def test_a_new_login_rotates_the_session_on_every_replica(two: list[Replica]) -> None:
    a, b = two
    planted = open_console(a, a)  # an attacker's session, planted in the victim's browser
    with as_browser_of(a, b, planted) as browser:
        response = browser.get("/", params={"token": OPERATOR})
        assert response.status_code == 303
        fresh = response.cookies.get(f"sled_gateway_{a.port}")
    assert fresh and fresh != planted
    eventually(lambda: status(a, a, planted) == 401, WITHOUT_BUS, "the planted session ending")
    assert status(a, b, planted) == 401 and status(a, a, fresh) == 200


def test_forged_unknown_and_expired_sessions_are_401_on_either_replica(
    two: list[Replica], pg_url: str
) -> None:
    a, b = two
    live = open_console(a, a)
    stale = open_console(a, b)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            digest = hashlib.sha256(stale.encode()).hexdigest()
            changed = conn.execute(
                text("UPDATE console_sessions SET expires_at = :t WHERE id_sha256 = :h"),
                {"t": time.time() - 1, "h": digest},
            ).rowcount
            assert changed == 1
            # What the table holds is the hash alone: the cookie's value is nowhere in it.
            rows = conn.execute(text("SELECT * FROM console_sessions")).all()
            assert live not in json.dumps([list(map(str, r)) for r in rows])
    finally:
        engine.dispose()
    for replica in (a, b):
        for forged in ("forged", live[:-1] + ("A" if live[-1] != "A" else "B"), "", "x" * 5000):
            assert status(a, replica, forged) == 401, forged[:20]
        eventually(lambda r=replica: status(a, r, stale) == 401, WITHOUT_BUS, "expiry")
        assert status(a, replica, live) == 200


def test_a_session_of_another_gateways_database_is_401_here(
    two: list[Replica], postgres: Any, nats_server: NatsServer
) -> None:
    a, _b = two
    other_db = postgres.url(postgres.create_database())
    other = Replica(other_db, "local")
    try:
        theirs = open_console(other, other)
        assert status(other, other, theirs) == 200
        # The same cookie, presented to this gateway as if it were its own.
        assert status(a, a, theirs) == 401
        assert status(a, _b, theirs) == 401
    finally:
        other.kill()


# -- rules -----------------------------------------------------------------------------


def check(replica: Replica, command: str) -> str:
    """What ``replica``'s rules say of a Bash command on sled ``web`` (the action)."""
    return check_on(replica.url, command)


def check_on(base_url: str, command: str) -> str:
    response = httpx.post(
        base_url + "/api/rules/check",
        headers=BEARER,
        json={"tool_name": "Bash", "tool_input": {"command": command}, "project": "web"},
        timeout=T,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["action"])


async def ask_as_sled(replica: Replica, req_id: str, command: str, wait: float) -> Any:
    """A sled on ``replica`` sends one Bash request: its perm_response's payload, or None
    when none came within ``wait`` seconds (the request is then pending)."""
    url = f"ws://127.0.0.1:{replica.port}/api/sled-uplink?token={SLED_TOKEN}"
    async with connect(url) as ws:
        await ws.send(
            json.dumps({"type": "identity", "req_id": "identity", "payload": {"project": "web"}})
        )
        await ws.send(
            json.dumps(
                {
                    "type": "perm_request",
                    "req_id": req_id,
                    "payload": {"tool_name": "Bash", "tool_input": {"command": command}},
                }
            )
        )
        try:
            async with asyncio.timeout(wait):
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("type") == "perm_response" and message["req_id"] == req_id:
                        return message["payload"]
        except TimeoutError:
            return None


def make_rule(replica: Replica, rule: str, action: str = "allow") -> int:
    return make_rule_on(replica.url, rule, action)


def make_rule_on(base_url: str, rule: str, action: str = "allow") -> int:
    response = httpx.post(
        base_url + "/api/rules", headers=BEARER, json={"rule": rule, "action": action}, timeout=T
    )
    assert response.status_code == 201, response.text
    return int(response.json()["rule"]["id"])


def revoke_rule(replica: Replica, rule_id: int) -> None:
    response = httpx.delete(f"{replica.url}/api/rules/{rule_id}", headers=BEARER, timeout=T)
    assert response.status_code == 200, response.text


def test_a_rule_made_on_a_decides_on_b_and_its_revocation_stops_it_on_b(
    two: list[Replica],
) -> None:
    a, b = two
    assert check(b, "npm test") != "allow"
    rule_id = make_rule(a, "Bash(npm test:*)")
    eventually(lambda: check(b, "npm test") == "allow", 2 * T, "A's rule reaching B")
    answer = asyncio.run(ask_as_sled(b, "r1", "npm test --watch", T))
    assert answer is not None and answer["approved"] is True, answer
    revoke_rule(a, rule_id)
    began = time.monotonic()
    eventually(lambda: check(b, "npm test") != "allow", WITHOUT_BUS, "the revocation at B")
    assert time.monotonic() - began < WITHOUT_BUS
    assert asyncio.run(ask_as_sled(b, "r2", "npm test", 1.0)) is None, "B still allows"


def test_with_nats_stopped_a_revoked_rule_stops_on_b_within_the_sweep(
    two: list[Replica], nats_server: NatsServer
) -> None:
    a, b = two
    rule_id = make_rule(a, "Bash(make:*)")
    eventually(lambda: check(b, "make all") == "allow", 2 * T, "A's rule reaching B")
    nats_server.stop()
    revoke_rule(a, rule_id)
    began = time.monotonic()
    eventually(lambda: check(b, "make all") != "allow", WITHOUT_BUS, "the revocation at B")
    took = time.monotonic() - began
    assert took < WITHOUT_BUS, took
    # And a rule made while the bus is away still arrives by the sweep.
    make_rule(a, "Bash(cargo build:*)")
    eventually(lambda: check(b, "cargo build") == "allow", WITHOUT_BUS, "the sweep at B")


@pytest.mark.slow  # 16 s (five revocations, each watched for 1.5 rule sweeps): in CI's second pass
def test_a_revoked_rule_never_allows_again_on_the_replica_that_revoked_it(
    two: list[Replica],
) -> None:
    # The replica that revokes re-reads its rules on sweeps and bus messages too: none
    # of those reads may bring the revoked rule back.
    a, _b = two
    for i in range(5):
        rule_id = make_rule(a, f"Bash(step{i}:*)")
        revoke_rule(a, rule_id)
        deadline = time.monotonic() + RULES_SWEEP_S * 1.5
        while time.monotonic() < deadline:
            assert check(a, f"step{i} x") != "allow"
            time.sleep(0.1)


# -- NATS coming back: what was lost meanwhile is read again at once ---------------------


def test_when_nats_comes_back_a_replica_reads_again_what_it_may_have_missed(
    pg_url: str, nats_server: NatsServer
) -> None:
    # In-process replicas, so that B's sweep and session cache can be made too long to
    # matter: what B learns after NATS returns, it learns from the reconnect alone.
    a = Gateway(db=pg_url, bus=nats_server.url, operator_token=OPERATOR).start()
    b = Gateway(db=pg_url, bus=nats_server.url, operator_token=OPERATOR).start()
    try:
        sharing, sessions = b._app.sharing, b._app.sessions
        sharing.sweep_seconds = 3600.0
        sessions.cache_seconds = 3600.0
        rule_id = make_rule_on(a.http_url, "Bash(deploy:*)")
        eventually(lambda: check_on(b.http_url, "deploy now") == "allow", 2 * T, "the rule at B")
        time.sleep(RULES_SWEEP_S + 0.5)  # B's sweep in progress ends; the next is an hour away
        name = f"sled_gateway_{a.port}"
        front = {"Host": f"127.0.0.1:{a.port}"}
        session = httpx.get(a.http_url + "/", params={"token": OPERATOR}).cookies.get(name)
        me = httpx.get(b.http_url + "/api/me", headers=front, cookies={name: session})
        assert me.status_code == 200  # B holds it now, for an hour

        nats_server.stop()
        response = httpx.delete(f"{a.http_url}/api/rules/{rule_id}", headers=BEARER, timeout=T)
        assert response.status_code == 200
        out = httpx.post(
            a.http_url + "/logout",
            headers={"Origin": a.http_url, **JSON},
            cookies={name: session},
            json={},
        )
        assert out.status_code == 200
        time.sleep(1.0)
        assert check_on(b.http_url, "deploy now") == "allow", "B heard of it some other way"
        assert httpx.get(b.http_url + "/api/me", headers=front, cookies={name: session}).is_success

        nats_server.start()
        eventually(lambda: check_on(b.http_url, "deploy now") != "allow", 6 * T, "the re-read at B")
        eventually(
            lambda: (
                httpx.get(
                    b.http_url + "/api/me", headers=front, cookies={name: session}
                ).status_code
                == 401
            ),
            2 * T,
            "the session forgotten at B",
        )
    finally:
        b.stop()
        a.stop()


def test_with_the_database_away_no_session_is_opened_or_honoured_and_none_is_a_500(
    two: list[Replica], postgres: Any
) -> None:
    a, b = two
    session = open_console(a, a)
    postgres.stop()
    # A store operation may take its whole bound (OPERATION_TIMEOUT_S and the commit's
    # grace) to give up on a database that went away; the browser waits longer than that.
    patience = OPERATION_TIMEOUT_S + COMMIT_GRACE_S + T
    try:
        with as_browser_of(a, b, timeout=patience) as browser:
            response = browser.get("/", params={"token": OPERATOR})
            assert response.status_code == 503, response.text
            assert not response.cookies
        # Past the cache bound, a session the database cannot confirm opens nothing.
        time.sleep(SESSION_CACHE_S + 0.2)
        assert status(a, b, session, patience) == 401
        with as_browser_of(a, a, session, timeout=patience) as browser:
            # Logout needs a session the guard can confirm: refused, nothing half-done.
            assert browser.post("/logout", json={}).status_code == 401
    finally:
        postgres.start()
    # The first operations after the restart may still take the store's bound (a connection
    # replaced, a watchdog firing): each probe waits that long too, then tries again.
    eventually(
        lambda: status(a, b, session, patience) == 200, 6 * T, "the session back with the database"
    )


# -- through a real HAProxy: the browser knows one address ------------------------------


class HAProxy:
    """Debian's haproxy in front of the replicas, round robin (so that consecutive
    requests land on different replicas), run as ``nobody`` in a temp dir; each answer
    names the replica that gave it (``X-Served-By``)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.port = nats_support.free_port()
        # Not pytest's tmp_path: its parent is private to root, and haproxy runs as nobody.
        self.dir = Path(tempfile.mkdtemp(prefix="sled-haproxy-"))
        self.dir.chmod(0o755)
        servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port}" for i, r in enumerate(replicas))
        config = self.dir / "haproxy.cfg"
        config.write_text(
            "global\n    maxconn 200\n"
            "defaults\n    mode http\n    timeout connect 5s\n"
            "    timeout client 30s\n    timeout server 30s\n"
            f"frontend front\n    bind 127.0.0.1:{self.port}\n    default_backend replicas\n"
            "backend replicas\n    balance roundrobin\n"
            "    http-response set-header X-Served-By %[srv_name]\n"
            f"{servers}\n"
        )
        config.chmod(0o644)
        self.proc = subprocess.Popen(
            ["haproxy", "-f", str(config), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user="nobody" if os.getuid() == 0 else None,
        )
        eventually(self._listening, T, "haproxy listening")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_through_haproxy_a_console_session_works_whichever_replica_answers(
    two: list[Replica],
) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian's package)")
    balancer = HAProxy(two)
    try:
        name = f"sled_gateway_{balancer.port}"
        opened = httpx.get(balancer.url + "/", params={"token": OPERATOR}, timeout=T)
        assert opened.status_code == 303
        session = opened.cookies.get(name)
        assert session, opened.headers
        served: set[str] = set()
        for _ in range(6):  # a new connection each: round robin alternates
            me = httpx.get(balancer.url + "/api/me", cookies={name: session}, timeout=T)
            assert me.status_code == 200, (me.headers.get("x-served-by"), me.text)
            served.add(me.headers["x-served-by"])
        assert served == {"r0", "r1"}
        out = httpx.post(
            balancer.url + "/logout",
            headers={"Origin": balancer.url, **JSON},
            cookies={name: session},
            json={},
            timeout=T,
        )
        assert out.status_code == 200
        eventually(
            lambda: all(
                httpx.get(balancer.url + "/api/me", cookies={name: session}, timeout=T).status_code
                == 401
                for _ in range(4)
            ),
            WITHOUT_BUS,
            "the logout on every replica",
        )
    finally:
        balancer.stop()
