"""A real nats-server for the NATS bus tests, on a free 127.0.0.1 port, in a temp dir.

Debian's package (``scripts/install-nats.sh`` installs it). Run as the
``nats`` system user when the tests run as root (it needs no privilege), with
``-a 127.0.0.1 -p PORT`` and nothing else: no JetStream, no monitoring port.
:meth:`NatsServer.stop` and :meth:`NatsServer.start` again on the same port
are how a test takes NATS away and brings it back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARY = os.environ.get("SLED_NATS_SERVER", "nats-server")


def skip_reason() -> str | None:
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (the `cluster` extra)"
    if shutil.which(BINARY) is None:
        return "nats-server is not installed (scripts/install-nats.sh installs it as root)"
    return None


def require() -> None:
    """Skip the calling test, with the reason, when there is no nats-server."""
    import pytest  # here: scripts/cluster.sh imports this module without the test extra

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged() -> str | None:
    if os.getuid() != 0:
        return None
    for name in ("nats", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


class NatsServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sled-nats-"))
        self.dir.chmod(0o777)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        log = (self.dir / "nats.log").open("ab")
        self.proc = subprocess.Popen(
            [BINARY, "-a", "127.0.0.1", "-p", str(self.port)],
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=_unprivileged(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen in {timeout} s: {self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        try:
            return (self.dir / "nats.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_server() -> Iterator[NatsServer]:
    """A started :class:`NatsServer`, removed on exit; skips the caller without one."""
    require()
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.cleanup()
