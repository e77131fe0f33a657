"""Slow clients against both HTTP servers, and the small input checks of issue 21.

The attack: connections that send a request head announcing a huge body
(``Content-Length: 100000000``) and then one body byte now and then. Each one
is "busy" (its head is in), so a connection cap fills up with them and every
fresh request (the console, the API, a sled reconnecting) is refused. Each
test runs the attack with raw sockets against the real gateway or the real
uplink's ingress on loopback, with small caps and deadlines so it is quick,
and checks that a fresh client is still served; it prints how long that took.

All test clients are 127.0.0.1, except the "other" client of the per-client
cap tests, bound to 127.0.0.2 (Linux routes all of 127/8 to ``lo``).

Run just these with ``pytest -m security``.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from actors import Uplink
from sled_gateway import Gateway
from tests.conftest import scaled
from tests.support.gateway import Gateway as FakeGateway

pytestmark = [pytest.mark.security, pytest.mark.timeout(120)]

SLED, SLED_TOKEN = "guard-sled", "guard-t0ken-xyz"
HUGE = 100_000_000
OTHER = "127.0.0.2"


# -- the parts -----------------------------------------------------------------------


@pytest.fixture
def gateways() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        kwargs.setdefault("sled_tokens", {SLED: SLED_TOKEN})
        gw = Gateway(**kwargs).start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def open_from(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(scaled(5))
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class SlowBodies:
    """Connections that each send a head announcing a huge body, then one byte
    every ``every`` seconds; records what each one got back and when it closed."""

    def __init__(self, port: int, head: bytes, count: int, every: float = 0.3) -> None:
        self.started = time.monotonic()
        self.socks: list[socket.socket] = []
        self.answers: dict[socket.socket, bytes] = {}
        self.closed_at: dict[socket.socket, float] = {}
        for _ in range(count):
            sock = open_from(port)
            try:
                sock.sendall(head + b"{")
            except OSError:
                self.closed_at[sock] = time.monotonic()
            self.socks.append(sock)
            self.answers[sock] = b""
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._dribble, daemon=True)
        self._thread.start()

    def _dribble(self) -> None:
        next_byte = time.monotonic()
        while not self._stop.is_set():
            live = [s for s in self.socks if s not in self.closed_at]
            if not live:
                return
            if time.monotonic() >= next_byte:
                next_byte += self._every
                for sock in live:
                    try:
                        sock.send(b" ")
                    except OSError:
                        self._read(sock)
            readable, _, _ = select.select(live, [], [], 0.05)
            for sock in readable:
                self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        if sock in self.closed_at:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            self.answers[sock] += data
        else:
            self.closed_at[sock] = time.monotonic()

    def still_open(self) -> int:
        return sum(1 for s in self.socks if s not in self.closed_at)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(scaled(5))
        for sock in self.socks:
            sock.close()


@pytest.fixture
def attacks() -> Iterator[Callable[..., SlowBodies]]:
    made: list[SlowBodies] = []

    def start(*args: Any, **kwargs: Any) -> SlowBodies:
        attack = SlowBodies(*args, **kwargs)
        made.append(attack)
        return attack

    yield start
    for attack in made:
        attack.stop()


def gateway_post_head(gw: Gateway, path: str = "/api/rules", *, auth: bool = True) -> bytes:
    bearer = f"Authorization: Bearer {gw.operator_token}\r\n" if auth else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {HUGE}\r\n{bearer}\r\n"
    ).encode()


def until_served(attempt: Callable[[], bool], within: float) -> float:
    """Seconds until ``attempt()`` succeeds (retried), or fail after ``within``."""
    started = time.monotonic()
    while True:
        try:
            if attempt():
                return time.monotonic() - started
        except (httpx.HTTPError, OSError, EOFError) as exc:
            error: BaseException | None = exc
        else:
            error = None
        if time.monotonic() - started > within:
            raise AssertionError(f"no fresh client served within {within} s (last: {error!r})")
        time.sleep(0.05)


def http_client(base: str, source: str = "127.0.0.1", **kwargs: Any) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=source, retries=0)
    return httpx.Client(base_url=base, transport=transport, timeout=scaled(5), **kwargs)


def console_get(gw: Gateway, source: str = "127.0.0.1") -> bool:
    with http_client(gw.http_url, source, follow_redirects=True) as client:
        page = client.get("/", params={"token": gw.operator_token})
        return page.status_code == 200 and "<html" in page.text.lower()


def api_get(gw: Gateway, source: str = "127.0.0.1") -> bool:
    with http_client(gw.http_url, source) as client:
        return client.get("/api/state", headers=gw.api_headers()).status_code == 200


def sled_connects(gw: Gateway, source: str = "127.0.0.1") -> bool:
    sock = open_from(gw.port, source)
    with ws_connect(gw.url_for_sleds(SLED_TOKEN), sock=sock, open_timeout=scaled(5)) as ws:
        identity = {"type": "identity", "req_id": "identity", "payload": {"project": SLED}}
        ws.send(json.dumps(identity))
        gw.wait_for(lambda s: any(x["project"] == SLED for x in s["sleds"]), scaled(5))
        return True


def status_of(answer: bytes) -> int | None:
    """The status code of the answer that starts ``answer`` (None if there is none)."""
    parts = answer.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


# -- 4. slow bodies at the gateway ---------------------------------------------------


def test_gateway_slow_bodies_are_cut_at_the_request_deadline_and_the_cap_frees(
    gateways: Callable[..., Gateway], attacks: Callable[..., SlowBodies]
) -> None:
    deadline = 1.5
    gw = gateways(
        max_connections=10,
        max_connections_per_client=1000,  # this test is about the deadline
        header_timeout=60.0,
        request_timeout=deadline,
    )
    attack = attacks(gw.port, gateway_post_head(gw), 12)
    time.sleep(0.3)  # every head is in: the cap is full of busy connections
    api = until_served(lambda: api_get(gw), scaled(deadline + 10))
    console = until_served(lambda: console_get(gw), scaled(5))
    sled = until_served(lambda: sled_connects(gw), scaled(5))
    print(
        f"\ngateway, 12 slow bodies, cap 10, request deadline {deadline} s: a fresh API "
        f"request served after {api:.2f} s, then the console in {console:.2f} s and a sled "
        f"in {sled:.2f} s"
    )
    assert attack.still_open() == 0
    timed_out = [s for s in attack.socks if status_of(attack.answers[s]) == 408]
    print(f"  {len(timed_out)} of 12 answered 408; the rest were refused by the cap at once")
    assert len(timed_out) >= 8
    for sock in timed_out:
        body = attack.answers[sock].partition(b"\r\n\r\n")[2]
        assert json.loads(body)["error"]
        assert b"connection: close" in attack.answers[sock].lower()
        took = attack.closed_at[sock] - attack.started
        assert deadline * 0.8 <= took < scaled(deadline + 3), took


def test_gateway_per_client_cap_keeps_one_client_from_holding_the_cap(
    gateways: Callable[..., Gateway], attacks: Callable[..., SlowBodies]
) -> None:
    gw = gateways(
        max_connections=10,
        max_connections_per_client=4,
        header_timeout=60.0,
        request_timeout=120.0,  # this test is about the cap: the deadline never comes
    )
    attack = attacks(gw.port, gateway_post_head(gw), 14)
    until_served(lambda: attack.still_open() <= 4, scaled(5))
    until_served(lambda: api_get(gw, OTHER), scaled(5))
    since = time.monotonic() - attack.started
    console = until_served(lambda: console_get(gw, OTHER), scaled(5))
    sled = until_served(lambda: sled_connects(gw, OTHER), scaled(5))
    print(
        f"\ngateway, 14 slow bodies from 127.0.0.1, cap 10, per client 4: {attack.still_open()} "
        f"still open; {OTHER}'s API request served {since:.2f} s after the attack began, "
        f"then the console in {console:.2f} s, a sled in {sled:.2f} s"
    )
    assert attack.still_open() == 4


def test_gateway_early_answer_closes_the_connection(
    gateways: Callable[..., Gateway], attacks: Callable[..., SlowBodies]
) -> None:
    deadline = 1.5
    gw = gateways(header_timeout=60.0, request_timeout=deadline)
    attack = attacks(gw.port, gateway_post_head(gw, auth=False), 1)
    (sock,) = attack.socks
    until_served(lambda: sock in attack.closed_at, scaled(deadline + 8))
    answer = attack.answers[sock]
    took = attack.closed_at[sock] - attack.started
    print(f"\ngateway, 401 before the body: connection closed after {took:.2f} s")
    assert status_of(answer) == 401, answer
    assert b"connection: close" in answer.lower()
    assert took < scaled(deadline + 3)


# -- 4. slow bodies at the uplink's ingress -------------------------------------------


@pytest.fixture
def ingress(gateway: FakeGateway, make_uplink: Callable[..., Uplink]) -> Callable[..., int]:
    def start(**overrides: Any) -> int:
        uplink = make_uplink(gateway.url, listen="127.0.0.1:0", **overrides)
        assert uplink.wait_connected(scaled(5))
        port = uplink._ingress.port
        assert port is not None
        return port

    return start


def ingress_head(length: int = 1000) -> bytes:
    return (
        "POST /permission HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def status_ok(port: int, source: str = "127.0.0.1") -> bool:
    with http_client(f"http://127.0.0.1:{port}", source) as client:
        return client.get("/status").status_code == 200


def test_ingress_slow_bodies_are_cut_at_the_request_deadline_and_the_cap_frees(
    ingress: Callable[..., int], attacks: Callable[..., SlowBodies]
) -> None:
    deadline = 1.5
    port = ingress(
        ingress_max_connections=10,
        ingress_max_connections_per_client=1000,
        ingress_header_timeout=60.0,
        ingress_request_timeout=deadline,
    )
    attack = attacks(port, ingress_head(), 12)
    time.sleep(0.3)
    served = until_served(lambda: status_ok(port), scaled(deadline + 10))
    print(
        f"\ningress, 12 slow bodies, cap 10, request deadline {deadline} s: "
        f"a fresh request served after {served:.2f} s"
    )
    until_served(lambda: attack.still_open() == 0, scaled(5))
    timed_out = [s for s in attack.socks if status_of(attack.answers[s]) == 408]
    print(f"  {len(timed_out)} of 12 answered 408; the rest were refused by the cap at once")
    assert len(timed_out) >= 8
    for sock in timed_out:
        assert json.loads(attack.answers[sock].partition(b"\r\n\r\n")[2])["error"]
        took = attack.closed_at[sock] - attack.started
        assert deadline * 0.8 <= took < scaled(deadline + 3), took


def test_ingress_per_client_cap_keeps_one_client_from_holding_the_cap(
    ingress: Callable[..., int], attacks: Callable[..., SlowBodies]
) -> None:
    port = ingress(
        ingress_max_connections=10,
        ingress_max_connections_per_client=4,
        ingress_header_timeout=60.0,
        ingress_request_timeout=120.0,
    )
    attack = attacks(port, ingress_head(), 14)
    until_served(lambda: attack.still_open() <= 4, scaled(5))
    until_served(lambda: status_ok(port, OTHER), scaled(5))
    since = time.monotonic() - attack.started
    print(
        f"\ningress, 14 slow bodies from 127.0.0.1, cap 10, per client 4: "
        f"{attack.still_open()} still open; {OTHER} served {since:.2f} s after the attack began"
    )
    assert attack.still_open() == 4


def test_ingress_head_deadline_closes_a_half_sent_head(ingress: Callable[..., int]) -> None:
    port = ingress(ingress_header_timeout=0.5)
    with open_from(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.settimeout(scaled(10))
        assert sock.recv(65536) == b""
        took = time.monotonic() - started
    print(f"\ningress, half a head: closed after {took:.2f} s")
    assert 0.4 <= took < scaled(5)


# -- 7. numbers are ASCII digits; one Origin ------------------------------------------


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int | None, bytes]:
    """One request, written as given (headers and all); the status and the body back."""
    with open_from(port) as sock:
        sock.sendall(head.encode("utf-8") + body)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
            head_part, sep, rest = answer.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":", 1)[1])
                for line in head_part.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if sep and length and len(rest) >= length[0]:
                break
    return status_of(answer), answer.partition(b"\r\n\r\n")[2]


def test_a_rule_id_in_other_digits_is_a_4xx_and_revokes_nothing(
    gateways: Callable[..., Gateway],
) -> None:
    gw = gateways()
    with http_client(gw.http_url) as client:
        headers = {**gw.api_headers(), "Content-Type": "application/json"}
        made = client.post(
            "/api/rules", json={"action": "allow", "tool_name": "Read"}, headers=headers
        )
        assert made.status_code == 201, made.text
        rule_id = made.json()["rule"]["id"]
        assert rule_id == 1
        auth = f"Authorization: Bearer {gw.operator_token}\r\n"
        answers = []
        for digits in ("\u00b2", "\u0661", "\uff11", "1\u0660"):  # ², ١, １, 1٠
            path = "/api/rules/" + "".join(f"%{b:02X}" for b in digits.encode("utf-8"))
            status, body = raw_request(
                gw.port,
                f"DELETE {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                "Content-Type: application/json\r\nConnection: close\r\n\r\n",
            )
            print(f"\nDELETE /api/rules/{digits!r} -> {status} {body[:80]!r}")
            answers.append((digits, status, body))
        rules = client.get("/api/rules", headers=headers).json()["rules"]
        assert [r["id"] for r in rules] == [rule_id], "a rule was revoked"
        for digits, status, body in answers:
            assert status is not None and 400 <= status < 500, (digits, status, body)
            assert json.loads(body)["error"]
        for name in ("limit", "before"):
            answer = client.get("/api/audit", params={name: "\u0661"}, headers=headers)
            assert answer.status_code == 400, (name, answer.status_code)
            assert answer.json()["error"]


@pytest.mark.parametrize(
    ("header", "values"),
    [
        ("Origin", ("http://127.0.0.1:{port}", "http://evil.example")),
        ("Origin", ("http://127.0.0.1:{port}", "http://127.0.0.1:{port}")),
        ("Host", ("127.0.0.1", "evil.example")),
        ("Authorization", ("Bearer {token}", "Bearer nope")),
    ],
)
def test_a_repeated_origin_host_or_authorization_is_400_at_the_gateway(
    gateways: Callable[..., Gateway], header: str, values: tuple[str, str]
) -> None:
    gw = gateways()
    sent = {"Host": f"127.0.0.1:{gw.port}", "Authorization": f"Bearer {gw.operator_token}"}
    lines = [f"{n}: {v}" for n, v in sent.items() if n != header]
    lines += [f"{header}: {v.format(port=gw.port, token=gw.operator_token)}" for v in values]
    body = b'{"action": "allow", "tool_name": "Read"}'
    head = (
        "POST /api/rules HTTP/1.1\r\n"
        + "".join(f"{line}\r\n" for line in lines)
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + "Connection: close\r\n\r\n"
    )
    status, answer = raw_request(gw.port, head, body)
    assert status == 400, (status, answer)
    if header == "Host":  # h11 refuses it before any app runs, in plain text
        assert answer == b"Invalid HTTP request received."
    else:
        assert header in json.loads(answer)["error"]
    with http_client(gw.http_url) as client:
        assert client.get("/api/rules", headers=gw.api_headers()).json()["rules"] == []


def test_a_repeated_origin_is_400_at_the_ingress(ingress: Callable[..., int]) -> None:
    port = ingress()
    origin = f"Origin: http://127.0.0.1:{port}\r\n"
    status, answer = raw_request(
        port,
        f"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n{origin}{origin}Connection: close\r\n\r\n",
    )
    assert status == 400, (status, answer)
    assert "Origin" in json.loads(answer)["error"]
