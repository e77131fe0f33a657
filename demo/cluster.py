"""``scripts/cluster.sh``: PostgreSQL, NATS, three gateway replicas and HAProxy on loopback.

Everything runs from one temporary directory (removed at the end) on free
127.0.0.1 ports: Debian's PostgreSQL 15 (its own data directory, ``trust``
for loopback only), ``nats-server``, three ``run_gateway.py`` replicas with
``--db postgresql://... --bus nats://...``, and HAProxy in front with the
configuration docs/deploy.md shows (``tests/support/haproxy.py`` writes it).
It prints the console URL through HAProxy, the operator token and a sled
command to paste. Ctrl-C (or SIGTERM) stops them in reverse order, each
with a bounded wait before SIGKILL, and removes the directory. Under root,
PostgreSQL, NATS and HAProxy run as unprivileged users.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.support.haproxy import SOURCE as HAPROXY_SOURCE
from tests.support.haproxy import HAProxy, free_port
from tests.support.haproxy import skip_reason as haproxy_missing
from tests.support.nats import NatsServer
from tests.support.nats import skip_reason as nats_missing

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("SLED_PG_BIN", "/usr/lib/postgresql/15/bin"))
REPLICAS = 3
STOP_GRACE_S = 15.0


def say(text: str = "") -> None:
    print(text, flush=True)


class Postgres:
    """A throwaway PostgreSQL in ``root`` (nobody's, when run as root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: int | None = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.user = nobody.pw_uid
            root.mkdir(mode=0o700)
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
        else:
            root.mkdir(mode=0o700)

    def _run(self, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            argv,
            cwd=self.root,
            user=self.user,
            group=self.user and pwd.getpwnam("nobody").pw_gid,
            extra_groups=[] if self.user else None,
            **kw,
        )

    def start(self) -> str:
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        initdb = self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "sled",
            "--auth",
            "trust",
            "-E",
            "UTF8",
            "--locale",
            "C",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if initdb.wait(120) != 0:
            raise RuntimeError(f"initdb failed: see {self.root / 'postgres.log'}")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        self.proc = self._run(
            str(PG_BIN / "postgres"),
            "-D",
            str(self.data),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        ).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: see postgres.log")
            time.sleep(0.1)
        subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "sled",
                "sled_gateway",
            ],
            check=True,
        )
        return f"postgresql://sled@127.0.0.1:{self.port}/sled_gateway"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> int:
    for reason in (nats_missing(), haproxy_missing()):
        if reason:
            print(f"cluster.sh: {reason}", file=sys.stderr)
            return 2
    if not (PG_BIN / "postgres").is_file():
        print(
            "cluster.sh: PostgreSQL 15 is not installed (scripts/install-postgres.sh)",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    temp = Path(tempfile.mkdtemp(prefix="sled-cluster-"))
    temp.chmod(0o755)
    operator, sled_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    postgres = Postgres(temp / "postgres")
    nats: NatsServer | None = None
    haproxy: HAProxy | None = None
    replicas: list[subprocess.Popen[bytes]] = []
    status = 0
    try:
        db = postgres.start()
        nats = NatsServer().start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
        env.update(SLED_GATEWAY_OPERATOR_TOKEN=operator, SLED_GATEWAY_TOKEN=sled_token)
        ports = [free_port() for _ in range(REPLICAS)]
        for i, port in enumerate(ports, 1):
            with open(temp / f"replica{i}.log", "ab") as log:
                replicas.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(ROOT / "run_gateway.py"),
                            "--listen",
                            f"127.0.0.1:{port}",
                            "--db",
                            db,
                            "--bus",
                            nats.url,
                            "--drain-seconds",
                            "2",
                            # HAProxy's PROXY header names each client (docs/deploy.md).
                            "--trusted-proxy",
                            HAPROXY_SOURCE,
                        ],
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            if i == 1:  # the first makes the schema; the others find it made
                _wait_ready(f"http://127.0.0.1:{port}", replicas[0], stop)
        for port, proc in zip(ports, replicas, strict=True):
            _wait_ready(f"http://127.0.0.1:{port}", proc, stop)
        haproxy = HAProxy([f"127.0.0.1:{p}" for p in ports])
        haproxy.start()
        uplink = f"{haproxy.ws}/api/sled-uplink"
        direct = ",".join(f"ws://127.0.0.1:{p}/api/sled-uplink" for p in ports)
        say(f"temp dir: {temp}")
        say(f"PostgreSQL: {db}")
        say(f"NATS: {nats.url}")
        say("replicas: " + ", ".join(f"http://127.0.0.1:{p}" for p in ports))
        say(f"console: {haproxy.http}/?token={operator}")
        say(f"operator token: {operator}")
        say("a sled, through HAProxy (or give every replica's URL, comma-separated:")
        say(f"  {direct}):")
        say(
            f"  HUSKIES_UPSTREAM_TOKEN={sled_token} .venv/bin/python run_uplink.py "
            f"--upstream-gateway {uplink} --project my-project"
        )
        say("Ctrl-C stops everything.")
        while not stop.wait(0.5):
            for i, proc in enumerate(replicas, 1):
                if proc.poll() is not None:
                    print(
                        f"cluster.sh: replica {i} exited ({proc.returncode}); see replica{i}.log",
                        file=sys.stderr,
                    )
                    stop.set()
                    status = 1
    except RuntimeError as exc:
        print(f"cluster.sh: {exc}", file=sys.stderr)
        status = 1
    finally:
        say("stopping...")
        if haproxy is not None:
            haproxy.cleanup()
        for proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the drain
        for proc in replicas:
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if nats is not None:
            nats.cleanup()
        postgres.stop()
        shutil.rmtree(temp, ignore_errors=True)
        say("stopped")
    return status


def _wait_ready(base: str, proc: subprocess.Popen[bytes], stop: threading.Event) -> None:
    deadline = time.monotonic() + 60
    while not stop.is_set():
        if proc.poll() is not None:
            raise RuntimeError(f"a replica exited ({proc.returncode}) while starting")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} not ready in 60 s")
        time.sleep(0.2)
    raise RuntimeError("stopped while starting")


if __name__ == "__main__":
    sys.exit(main())
