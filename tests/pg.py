"""A real PostgreSQL for the tests: one server per session, a fresh database per test.

The server is Debian's PostgreSQL 15 (``scripts/install-postgres.sh``) run
from a temporary directory that holds its data and its unix socket. PostgreSQL
refuses to run as root, so under root it runs as ``nobody`` (``setpriv``),
the directory owned by that user. It listens on 127.0.0.1 only, on a free
port, with ``trust`` authentication for loopback and its own socket (nothing
else can reach it). ``setpriv --pdeathsig`` makes the kernel stop it should
the test process die without its teardown (the parent it watches is one
thread kept for that, since the kernel signals when the starting *thread*
ends, and a test may start the server from any thread). The directory is
removed at the end; one left by a test process killed outright is removed
by the next session (:func:`remove_stale`).

Fixtures: ``postgres`` (the session's :class:`PostgresServer`, or a skip
with one reason when the binaries are missing) and ``pg_url`` (an empty
database of its own for one test, dropped after it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("SLED_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: The server's superuser (made by initdb; trust auth, so no password).
SUPERUSER = "sled"
#: Why the PostgreSQL tests skip, or None when they can run.
MISSING = (
    None
    if (PG_BIN / "postgres").is_file() and (PG_BIN / "initdb").is_file()
    else f"PostgreSQL 15 is not installed ({PG_BIN}/postgres missing; "
    "scripts/install-postgres.sh installs it as root)"
)
_START_TIMEOUT = 30.0
_PREFIX = "sled-pg-"
#: A directory this old without a live server is a killed session's.
_STALE_AFTER_S = 600.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def remove_stale() -> None:
    """Remove the directories of servers whose test process was killed (``kill -9``
    leaves no teardown; the kernel stopped the server, the files stay)."""
    for root in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            if time.time() - root.stat().st_mtime < _STALE_AFTER_S:
                continue  # perhaps another session's, still starting
            pid_file = root / "data" / "postmaster.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text().split()[0]), 0)
                continue  # its server runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(root, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL server in a temporary directory; :meth:`stop` and :meth:`start`
    again keep its data (a test of the store's reconnection does that)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=_PREFIX))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._launcher = concurrent.futures.ThreadPoolExecutor(1, "postgres-launcher")
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            self._as: list[str] = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
            ]
            os.chown(self.root, user.pw_uid, user.pw_gid)
        else:
            self._as = ["setpriv"]
        os.chmod(self.root, 0o700)
        self._run(
            str(PG_BIN / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        # Loopback and the socket only; nothing in pg_hba.conf reaches further.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self._as, *argv], cwd=self.root, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr or done.stdout}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PostgresServer:
        self._proc = self._launcher.submit(self._launch).result()
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready in {_START_TIMEOUT} s")
            time.sleep(0.05)

    def _launch(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [
                    *self._as,
                    "--pdeathsig",
                    "SIGQUIT",
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    # Tests want speed, not crash safety of the machine: a commit
                    # still returns only once the server has it.
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Stop the server (SIGINT: PostgreSQL's fast shutdown, which drops every client)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._proc = proc
            self.thaw()  # a frozen server cannot stop
            self._proc = None
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, writer, checkpointer...)."""
        if self._proc is None:
            return []
        found = [self._proc.pid]
        for pid in found:  # grows while walked: children of children too
            try:  # a backend may exit while it is walked
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    found += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        return found

    def freeze(self) -> None:
        """SIGSTOP every process of the server: it keeps its sockets and answers nothing
        (a hung host, as its clients see it)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        self.thaw()
        self.stop()
        self._launcher.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql: {done.stderr}")
        return done.stdout

    def create_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        if self.running:
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if MISSING:
        pytest.skip(MISSING)
    remove_stale()
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of an empty database for this test alone (dropped after it)."""
    name = postgres.create_database()
    yield postgres.url(name)
    if not postgres.running:  # a test stopped it: later tests need it back
        postgres.start()
    postgres.drop_database(name)
