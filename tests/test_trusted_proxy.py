"""The client's address behind a load balancer: ``--trusted-proxy`` and PROXY v2 (issue 24).

Behind HAProxy every replica's peer is HAProxy, so the per-client cap would
treat the whole fleet and every person as one client. With ``--trusted-proxy``
a connection from that address begins with a PROXY protocol v2 header naming
the client, and the gateway counts, and logs, that client instead. Nobody
else's header is believed, and a client's own ``X-Forwarded-For`` never is.

The first half plays the proxy with raw sockets on loopback (Linux routes all
of 127/8 to ``lo``, so a socket bound to 127.0.0.2 is a peer of its own); the
second half runs Debian's HAProxy in front (``tests/support/haproxy.py``, the
configuration docs/deploy.md shows) with clients on their own addresses.

The per-client cap counts connections still *receiving* a request: each test
client sends a request head announcing a large body and then a byte now and
then, as in ``tests/test_security_guard.py``.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from loguru import logger
from websockets.sync.client import connect as ws_connect

from actors.http_guard import _in_networks
from protocol import ConfigError
from protocol.proxy_header import build_proxy_v2
from sled_gateway import Gateway
from sled_gateway.config import GatewayConfig, parse_trusted_proxies
from tests.conftest import eventually, scaled
from tests.support import haproxy as haproxy_support
from tests.support.haproxy import HAProxy

pytestmark = [pytest.mark.security, pytest.mark.timeout(120)]

SLED_TOKEN = "proxy-sled-t0ken"
PROXY = haproxy_support.SOURCE  # 127.0.0.2: the trusted proxy
ALICE, BOB, MALLORY = "127.0.0.3", "127.0.0.4", "127.0.0.5"
CAP = 2


@pytest.fixture
def gateways() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        kwargs.setdefault("token", SLED_TOKEN)
        kwargs.setdefault("max_connections_per_client", CAP)
        kwargs.setdefault("header_timeout", 60.0)
        kwargs.setdefault("request_timeout", 120.0)  # the caps are tested, not the deadlines
        gw = Gateway(**kwargs).start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


def open_from(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(scaled(5))
    sock.connect(("127.0.0.1", port))
    return sock


def slow_head(gw: Gateway, extra: str = "") -> bytes:
    """A request whose handler waits for its 1000-byte body (the per-client cap counts it)."""
    return (
        "POST /api/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {gw.operator_token}\r\nContent-Length: 1000\r\n{extra}\r\n{{"
    ).encode()


def closed(sock: socket.socket, within: float) -> bool:
    """Whether the other end closed ``sock`` (an answer, then EOF, counts) within ``within``."""
    deadline = time.monotonic() + within
    sock.settimeout(0.1)
    try:
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False
    finally:
        sock.settimeout(scaled(5))


def closed_among(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """Those of ``socks`` the other end closed within ``within`` (one look at each after
    the first is closed, or after ``within``)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        readable, _, _ = select.select(socks, [], [], 0.1)
        if readable:
            break
    time.sleep(0.5)  # a second one over the cap would be closed in the same recount
    return [sock for sock in socks if closed(sock, 0.1)]


def still_served(sock: socket.socket) -> int:
    """Finish the slow request's body; the status of the answer (a bad rule: 400)."""
    sock.sendall(b" " * 999)
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        answer += chunk
    return int(answer.split()[1])


def sled_remote(gw: Gateway, project: str) -> str:
    state = gw.wait_for(lambda s: any(x["project"] == project for x in s["sleds"]), scaled(10))
    (sled,) = [x for x in state["sleds"] if x["project"] == project]
    return str(sled["remote"])


@contextlib.contextmanager
def connect_sled(
    port: int,
    source: str,
    project: str,
    *,
    before: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A sled's WebSocket from ``source``, ``before`` sent first (a PROXY header)."""
    sock = open_from(port, source)
    if before:
        sock.sendall(before)
    with ws_connect(
        f"ws://127.0.0.1:{port}/api/sled-uplink?token={SLED_TOKEN}",
        sock=sock,
        open_timeout=scaled(5),
        additional_headers=headers,
    ) as ws:
        identity = {"type": "identity", "req_id": "identity", "payload": {"project": project}}
        ws.send(json.dumps(identity))
        yield ws


# -- a trusted proxy's header, and everybody else's ---------------------------------------


def test_a_trusted_proxys_header_names_the_client_of_a_sled_and_of_the_logs(
    gateways: Callable[..., Gateway], logged: list[str]
) -> None:
    gw = gateways(trusted_proxy=PROXY)
    with connect_sled(gw.port, PROXY, "named", before=build_proxy_v2(("192.0.2.7", 51000))):
        assert sled_remote(gw, "named") == "192.0.2.7:51000"
    sock = open_from(gw.port, PROXY)
    sock.sendall(
        build_proxy_v2(("198.51.100.9", 4444))
        + b"GET /?token=wrong HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert closed(sock, scaled(5))
    sock.close()
    assert any("console login with a wrong token from 198.51.100.9:4444" in x for x in logged)


@pytest.mark.parametrize("tls", [True, False])
def test_the_scheme_comes_from_the_trusted_proxys_header_alone(
    gateways: Callable[..., Gateway], tls: bool
) -> None:
    """Behind a TLS-terminating proxy (``send-proxy-v2-ssl``) the console's cookie is
    ``Secure``; a client's own ``X-Forwarded-Proto`` changes nothing."""
    gw = gateways(trusted_proxy=PROXY)
    sock = open_from(gw.port, PROXY)
    sock.sendall(
        build_proxy_v2(("192.0.2.7", 51000), tls=tls)
        + f"GET /?token={gw.operator_token} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    )
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    (cookie,) = [x for x in answer.split(b"\r\n") if x.lower().startswith(b"set-cookie:")]
    assert (b"; secure" in cookie.lower()) is tls, cookie


def test_a_trusted_proxys_clients_get_a_cap_each(gateways: Callable[..., Gateway]) -> None:
    gw = gateways(trusted_proxy=PROXY)
    # Three of 10.0.0.1's requests, then two of 10.0.0.2's, all from the one proxy.
    first = [open_from(gw.port, PROXY) for _ in range(CAP + 1)]
    second = [open_from(gw.port, PROXY) for _ in range(CAP)]
    for i, sock in enumerate(first):
        sock.sendall(build_proxy_v2(("10.0.0.1", 1000 + i)) + slow_head(gw))
    for i, sock in enumerate(second):
        sock.sendall(build_proxy_v2(("10.0.0.2", 2000 + i)) + slow_head(gw))
    assert closed(first[0], scaled(5)), "the first client's oldest, over its cap"
    assert not any(closed(s, 1.0) for s in first[1:] + second)
    assert [still_served(s) for s in first[1:] + second] == [400] * (2 * CAP)
    for sock in first + second:
        sock.close()


def test_a_proxy_line_from_an_untrusted_peer_is_not_believed(
    gateways: Callable[..., Gateway],
) -> None:
    """Attack: a client reaching the replica directly names another address.

    Fails with the trust check removed (``_in_networks`` always true): the header
    would then be read, and the sled connected as 10.9.9.9.
    """
    gw = gateways(trusted_proxy=PROXY)
    sock = open_from(gw.port, MALLORY)
    sock.sendall(
        build_proxy_v2(("10.9.9.9", 9999))
        + f"GET /api/sled-uplink?token={SLED_TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert gw.state()["sleds"] == []


def test_a_client_cannot_name_itself_with_x_forwarded_for(gateways: Callable[..., Gateway]) -> None:
    """Attack: ``X-Forwarded-For`` straight to the replica, from loopback.

    uvicorn believes that header from 127.0.0.1 by default; the gateway turns that
    off, so this fails if ``proxy_headers=False`` is removed from the server.
    """
    gw = gateways(trusted_proxy=PROXY)
    with connect_sled(gw.port, "127.0.0.1", "forged", headers={"X-Forwarded-For": "10.6.6.6"}):
        assert sled_remote(gw, "forged").startswith("127.0.0.1:")


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "no PROXY protocol v2 signature"),
        (b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n", "a version 1 text line"),
        (build_proxy_v2(("10.0.0.1", 1))[:13] + b"\x99" + bytes(14), "unknown address family"),
    ],
    ids=["no-header", "version-1", "bad-family"],
)
def test_a_bad_header_from_the_trusted_proxy_closes_that_connection_only(
    gateways: Callable[..., Gateway], logged: list[str], sent: bytes, why: str
) -> None:
    gw = gateways(trusted_proxy=PROXY)
    good = open_from(gw.port, PROXY)
    good.sendall(build_proxy_v2(("10.0.0.1", 1)) + slow_head(gw))
    bad = open_from(gw.port, PROXY)
    bad.sendall(sent)
    assert bad.recv(65536) == b""  # closed, and nothing answered
    bad.close()
    eventually(lambda: any(why in x for x in logged), 5, "the log line")
    (line,) = [x for x in logged if why in x]
    assert line.startswith(f"closed a connection from trusted proxy {PROXY}:"), line
    assert still_served(good) == 400  # the other connection never noticed
    good.close()


def test_the_proxys_own_connections_say_local_and_keep_its_address(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways(trusted_proxy=f"{PROXY}/32,10.0.0.0/8")
    sock = open_from(gw.port, PROXY)
    sock.sendall(build_proxy_v2(None) + b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_without_trusted_proxy_nothing_changes(gateways: Callable[..., Gateway]) -> None:
    gw = gateways()
    assert httpx.get(gw.http_url + "/readyz", timeout=scaled(5)).status_code == 200
    with connect_sled(gw.port, PROXY, "plain"):
        assert sled_remote(gw, "plain").startswith(f"{PROXY}:")


# -- through Debian's HAProxy --------------------------------------------------------------


@pytest.fixture
def behind_haproxy(gateways: Callable[..., Gateway]) -> Iterator[tuple[Gateway, HAProxy]]:
    reason = haproxy_support.skip_reason()
    if reason:
        pytest.skip(reason)
    gw = gateways(trusted_proxy=PROXY)
    balancer = HAProxy([f"127.0.0.1:{gw.port}"], check_every=0.2)
    try:
        balancer.start()

        def ready() -> bool:
            try:
                return httpx.get(balancer.http + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(ready, 10, "the replica up behind HAProxy (its checks speak PROXY v2)")
        yield gw, balancer
    finally:
        balancer.cleanup()


def test_two_clients_through_haproxy_get_a_cap_each(
    behind_haproxy: tuple[Gateway, HAProxy],
) -> None:
    gw, balancer = behind_haproxy
    alice = [open_from(balancer.port, ALICE) for _ in range(CAP + 1)]
    for sock in alice:
        sock.sendall(slow_head(gw))
    bob = [open_from(balancer.port, BOB) for _ in range(CAP)]
    for sock in bob:
        sock.sendall(slow_head(gw))
    # One of Alice's goes (HAProxy answers it 502 or closes it: which one is HAProxy's
    # order of connecting to the replica); Bob's stay.
    (gone,) = closed_among(alice + bob, scaled(10))
    assert gone in alice
    rest = [s for s in alice + bob if s is not gone]
    assert [still_served(s) for s in rest] == [400] * (2 * CAP)
    for sock in alice + bob:
        sock.close()


def test_a_forged_x_forwarded_for_through_haproxy_names_nobody(
    behind_haproxy: tuple[Gateway, HAProxy],
) -> None:
    """Attack: a client through HAProxy claims another address in ``X-Forwarded-For``
    (HAProxy appends the real one). The replica counts and logs the connection's
    client, whom HAProxy's PROXY header names; no request header is read for it."""
    gw, balancer = behind_haproxy
    forged = {"X-Forwarded-For": BOB}
    with connect_sled(balancer.port, ALICE, "through", headers=forged):
        assert sled_remote(gw, "through").startswith(f"{ALICE}:")
    # Nor can she spend Bob's cap, or escape hers, by naming him.
    alice = [open_from(balancer.port, ALICE) for _ in range(CAP + 1)]
    for sock in alice:
        sock.sendall(slow_head(gw, f"X-Forwarded-For: {BOB}\r\n"))
    assert len(closed_among(alice, scaled(10))) == 1
    for sock in alice:
        sock.close()


# -- the option ------------------------------------------------------------------------------


def test_the_option_takes_addresses_and_cidrs_and_refuses_anything_else() -> None:
    config = GatewayConfig(trusted_proxy=["10.0.0.2", " 10.1.0.0/16", "fd00::/8"])
    assert config.trusted_proxy == "10.0.0.2/32,10.1.0.0/16,fd00::/8"
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.2/32", "10.1.0.0/16", "fd00::/8"]
    assert GatewayConfig().trusted_proxies == ()
    for bad in ("haproxy.internal", "10.0.0.5/8", "10.0.0.2,,10.0.0.3", "", "300.0.0.1"):
        with pytest.raises(ConfigError) as refused:
            GatewayConfig(trusted_proxy=bad)
        assert refused.value.option == "--trusted-proxy"


def test_an_ipv4_proxy_is_trusted_on_a_dual_stack_socket_too() -> None:
    trusted = parse_trusted_proxies("10.0.0.2/32,fd00::/8")
    assert _in_networks("10.0.0.2", trusted)
    assert _in_networks("::ffff:10.0.0.2", trusted)
    assert _in_networks("fd00::7", trusted)
    assert not _in_networks("10.0.0.3", trusted)
    assert not _in_networks("::ffff:10.0.0.3", trusted)
    assert not _in_networks("?", trusted)


def test_haproxy_reuses_no_replica_connection_across_clients(
    behind_haproxy: tuple[Gateway, HAProxy], logged: list[str]
) -> None:
    """HAProxy keeps idle connections to a replica for reuse (``http-reuse safe``: a
    session's later requests may take another's idle connection); the PROXY header
    is sent once per connection, so a connection opened for Alice must never carry
    Bob's requests. Each client's second request is the one that could."""
    _, balancer = behind_haproxy
    for who in [ALICE, BOB, ALICE, BOB, ALICE]:
        sock = open_from(balancer.port, who)
        for _ in range(2):  # keep-alive on both sides: the replica's connection stays idle
            sock.sendall(b"GET /?token=wrong HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += sock.recv(65536)
        sock.close()
    wrong = [x for x in logged if "console login with a wrong token from" in x]
    sources = [x.split(" from ", 1)[1].split(":")[0] for x in wrong]
    assert sources == [ALICE] * 2 + [BOB] * 2 + [ALICE] * 2 + [BOB] * 2 + [ALICE] * 2, wrong
