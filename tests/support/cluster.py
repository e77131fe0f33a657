"""A whole replicated gateway for tests: PostgreSQL, nats-server, N replicas and HAProxy.

Everything on 127.0.0.1 and free ports, every engine a real one:
``tests/pg.py``'s server (one database for the cluster), ``tests/support/nats.py``'s
nats-server, ``run_gateway.py`` replicas with ``--db postgresql://... --bus
nats://...``, and ``tests/support/haproxy.py`` in front. :class:`Cluster` is a
context manager that stops all of them, in reverse order, whatever the test
did (a replica left SIGSTOPped is continued and killed, a frozen PostgreSQL
thawed), so no process outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from tests.pg import PostgresServer
from tests.support.haproxy import SOURCE as HAPROXY_SOURCE
from tests.support.haproxy import HAProxy, free_port
from tests.support.nats import NatsServer
from tests.support.proc import WatchedProcess

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "cluster-operator-" + "t" * 24
SLED_TOKEN = "cluster-sled-t0ken"


def skip_reason() -> str | None:
    """Why a cluster cannot start here, or None."""
    from tests import pg
    from tests.support import haproxy, nats

    return pg.MISSING or nats.skip_reason() or haproxy.skip_reason()


class Replica:
    """One ``run_gateway.py`` on a fixed port (so HAProxy's list stays right across restarts)."""

    def __init__(
        self,
        db: str,
        bus: str,
        *,
        extra: Sequence[str] = (),
        timeout: float = 20.0,
        operator_token: str = OPERATOR,
        sled_token: str = SLED_TOKEN,
    ):
        self.db, self.bus, self.extra, self.timeout = db, bus, tuple(extra), timeout
        self.operator_token, self.sled_token = operator_token, sled_token
        self.port = free_port()
        self.proc: WatchedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.address}"

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
        env.update(
            PYTHONUNBUFFERED="1",
            SLED_GATEWAY_OPERATOR_TOKEN=self.operator_token,
            SLED_GATEWAY_TOKEN=self.sled_token,
        )
        argv = [sys.executable, str(ROOT / "run_gateway.py"), "--listen", self.address]
        argv += ["--db", self.db, "--bus", self.bus, "--log-level", "INFO"]
        argv += ["--trusted-proxy", HAPROXY_SOURCE, *self.extra]
        self.proc = WatchedProcess(argv, cwd=ROOT, env=env, timeout=self.timeout)
        self.proc.wait_for(r"gateway listening on http://")
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.proc.wait(timeout)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()  # SIGCONT first, then SIGKILL, reaped, pipes closed


class Cluster:
    """``with Cluster(replicas=3) as c:``; ``c.http``/``c.ws`` are HAProxy's URLs."""

    def __init__(
        self,
        replicas: int = 3,
        *,
        extra: Sequence[str] = (),
        heartbeat_interval: float = 10.0,
        timeout: float = 20.0,
        operator_token: str = OPERATOR,
        sled_token: str = SLED_TOKEN,
    ) -> None:
        self.count = replicas
        self.operator_token, self.sled_token = operator_token, sled_token
        self.extra = ("--heartbeat-interval", f"{heartbeat_interval:g}", *extra)
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.postgres: PostgresServer | None = None
        self.nats: NatsServer | None = None
        self.replicas: list[Replica] = []
        self.haproxy: HAProxy | None = None
        self.db = ""

    def __enter__(self) -> Cluster:
        try:
            self.postgres = PostgresServer()  # kept before starting: stop() removes it
            self.postgres.start()
            self.db = self.postgres.url(self.postgres.create_database())
            self.nats = NatsServer()
            self.nats.start()
            # One replica first: it creates the schema; the others find it made.
            for _ in range(self.count):
                replica = Replica(
                    self.db,
                    self.nats.url,
                    extra=self.extra,
                    timeout=self.timeout,
                    operator_token=self.operator_token,
                    sled_token=self.sled_token,
                )
                self.replicas.append(replica)
                replica.start()
            self.haproxy = HAProxy(
                [r.address for r in self.replicas], heartbeat_interval=self.heartbeat_interval
            )
            self.haproxy.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop everything in reverse order; each step runs whatever the previous did."""
        if self.haproxy is not None:
            with contextlib.suppress(Exception):
                self.haproxy.cleanup()
        for replica in reversed(self.replicas):
            with contextlib.suppress(Exception):
                replica.kill()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                self.nats.cleanup()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.remove()  # thaws, stops, removes its directory

    @property
    def http(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.http

    @property
    def ws(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.ws

    @property
    def sled_url(self) -> str:
        return f"{self.ws}/api/sled-uplink"

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.operator_token}",
            "Content-Type": "application/json",
        }

    def readyz(self, base: str | None = None) -> int:
        try:
            return httpx.get((base or self.http) + "/readyz", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def drain(self, i: int, timeout: float) -> int:
        """SIGTERM replica ``i`` (its drain) and wait for it to exit; its exit status."""
        replica = self.replicas[i]
        replica.signal(signal.SIGTERM)
        status = replica.wait(timeout)
        replica.kill()
        return status
