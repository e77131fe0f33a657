"""Debian's HAProxy (2.6) in front of gateway replicas, on loopback, in a temp dir.

:func:`config` writes the configuration docs/deploy.md shows in full (the
tests and ``scripts/cluster.sh`` run exactly this text): ``balance
leastconn``, a ``timeout tunnel`` above three heartbeats so that an idle
sled's WebSocket is never cut between two heartbeats, and health checks
``GET /readyz`` every second so that a draining replica or one that lost its
database gets no new sleds; ``send-proxy-v2-ssl`` on every server, so that each
connection to a replica begins with a PROXY protocol header naming the client
(the replicas take it from HAProxy's address, their ``--trusted-proxy``).
On one machine HAProxy connects to the replicas from :data:`SOURCE`, an
address of its own on loopback: the replicas trust only that one, and a test
or a person reaching a replica directly from 127.0.0.1 is an ordinary client
(HAProxy's ``source`` is the one line the docs' configuration leaves out).
:class:`HAProxy` runs it in the foreground
(``-db``) as an unprivileged user when the caller is root, and stops it.

No pytest here: ``scripts/cluster.sh`` imports this module on a venv
without the test extra.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BINARY = os.environ.get("SLED_HAPROXY", "haproxy")
#: The loopback address HAProxy connects to the replicas from (Linux routes all of
#: 127/8 to ``lo``): what the replicas' ``--trusted-proxy`` names.
SOURCE = "127.0.0.2"


def skip_reason() -> str | None:
    if shutil.which(BINARY) is None:
        return "haproxy is not installed (scripts/install-haproxy.sh installs it as root)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(
    listen: str,
    replicas: Sequence[str],
    *,
    heartbeat_interval: float = 10.0,
    check_every: float = 1.0,
    source: str | None = SOURCE,
) -> str:
    """The HAProxy configuration for ``replicas`` (``HOST:PORT`` each) behind ``listen``.

    ``source``: the address HAProxy connects to the replicas from (None: the
    system's choice, as in a deployment where HAProxy has a host of its own).
    """
    # Above three heartbeats: a sled sends one every interval, the gateway calls it stale
    # after three missed, so the tunnel's idle timeout must never fire first.
    tunnel = max(60, int(4 * heartbeat_interval))
    check_ms = max(100, int(check_every * 1000))
    servers = "\n".join(
        f"    server replica{i} {address} check" for i, address in enumerate(replicas, 1)
    )
    # Only on one machine: tells HAProxy's connections apart from every other local one.
    source_line = f"    source {source}\n" if source else ""
    return f"""\
global
    # No maxconn: HAProxy derives it from the file-descriptor limit (ulimit -n), one
    # sled holding two descriptors (its side and the replica's).

defaults
    mode http
    timeout connect 5s
    # Above the replicas' --mcp-timeout (30 s by default): a slow MCP relay answers 504 itself.
    timeout client 60s
    timeout server 60s
    # A sled's WebSocket once upgraded: idle for at most this long (heartbeats keep it busy).
    timeout tunnel {tunnel}s
    timeout client-fin 5s
    timeout http-request 10s
    # The replicas never read it (the PROXY header names the client); kept so that
    # anything else that does finds HAProxy's own hop last.
    option forwardfor
    # A replica that just died refuses the connection before its health check fails:
    # try another one instead of answering 503.
    retries 3
    option redispatch 1

frontend sled_gateway
    bind {listen}
    default_backend replicas

backend replicas
    balance leastconn
    # /readyz answers 503 while a replica drains or has lost its database.
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    default-server inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 2 rise 2
    # Each connection to a replica begins with a PROXY protocol v2 header naming the
    # client (the health checks' says LOCAL), and whether it came over TLS: the replicas'
    # per-client caps and logs see people and sleds, not HAProxy, and know https.
    # Their --trusted-proxy names this host.
    default-server send-proxy-v2-ssl
{source_line}{servers}
"""


def _unprivileged() -> str | None:
    if os.getuid() != 0:
        return None
    for name in ("haproxy", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


class HAProxy:
    """One HAProxy in the foreground; :meth:`start`, :meth:`stop`, :meth:`cleanup`."""

    def __init__(
        self,
        replicas: Sequence[str],
        *,
        heartbeat_interval: float = 10.0,
        port: int = 0,
        check_every: float = 1.0,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sled-haproxy-"))
        self.dir.chmod(0o755)
        self.config_file = self.dir / "haproxy.cfg"
        self.config_file.write_text(
            config(
                f"127.0.0.1:{self.port}",
                replicas,
                heartbeat_interval=heartbeat_interval,
                check_every=check_every,
            )
        )
        self.config_file.chmod(0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> HAProxy:
        log = (self.dir / "haproxy.log").open("ab")
        self.proc = subprocess.Popen(
            [BINARY, "-db", "-f", str(self.config_file)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=_unprivileged(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"haproxy did not listen in {timeout} s: {self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # soft stop: ends when its connections do
            proc.terminate()  # then hard: the sleds' tunnels would keep it up for minutes
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        try:
            return (self.dir / "haproxy.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
