# ruff: noqa: F811  (the ``live`` and ``connect`` fixtures come from test_ingress)
"""Attacks on the uplink, as a hostile page, local user or typo would make them.

Each test is the request an attacker would send to a real uplink (its
ingress on 127.0.0.1:0, connected to the real test gateway) or the command
line a user would mistype, and asserts that it is refused and that nothing
reaches the gateway. The browser-driven attacks (DNS rebinding, a
cross-origin page) are in ``test_security_browser.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from loguru import logger

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging
from protocol import DENY_MESSAGES, Reason
from sled_gateway import Gateway as ReferenceGateway
from tests.conftest import FAST, scaled
from tests.support.gateway import Gateway
from tests.test_ingress import (
    AS_JSON,
    Live,
    connect,  # noqa: F401
    json_error,
    live,  # noqa: F401
    permission_head,
    raw_socket,
    read_response,
    wait_for,
)

pytestmark = pytest.mark.security

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_uplink.py"
SECRET = "tok-S3CRET-9f8e7d"
EVIL = "rebind.evil.example"
# Every ingress endpoint, with a request that would be served if allowed.
ENDPOINTS: list[tuple[str, str]] = [
    ("GET", "/status"),
    ("GET", "/healthz"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("POST", "/permission"),
    ("GET", "/nope"),
]
TOOL = {"tool_name": "Bash", "tool_input": {"command": "rm -rf ~"}}


def request(live: Live, method: str, path: str, **headers: str) -> httpx.Response:
    """One request with exactly these extra headers; a POST carries a JSON body."""
    body = json.dumps(TOOL).encode() if method == "POST" else None
    return live.client.request(method, path, content=body, headers=headers, timeout=scaled(10))


def nothing_reached_the_gateway(live: Live) -> None:
    time.sleep(0.2)  # anything let through has had time to be forwarded
    assert live.session().of_type("perm_request") == []
    assert live.status()["permissions"]["pending"] == 0


# ── 8. Host allowlist: DNS rebinding ─────────────────────────────────────


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_foreign_host_is_refused_before_routing(live: Live, method: str, path: str) -> None:
    for host in (f"{EVIL}:{live.port}", EVIL, f"127.0.0.1.{EVIL}", "attacker:80", "[::2]"):
        headers = {"Host": host, "Content-Type": "application/json"}
        message = json_error(request(live, method, path, **headers), 421)
        assert "Host" in message
    nothing_reached_the_gateway(live)


def test_the_loopback_names_and_the_listen_host_are_served(live: Live) -> None:
    for host in ("127.0.0.1", f"127.0.0.1:{live.port}", "localhost", "LOCALHOST:1", "[::1]"):
        assert request(live, "GET", "/status", Host=host).status_code == 200, host


def test_ingress_allowed_host_adds_a_name(connect: Callable[..., Live]) -> None:
    live = connect(ingress_allowed_hosts=("sled.example", "[fd00::7]"))
    assert request(live, "GET", "/status", Host=f"sled.example:{live.port}").status_code == 200
    assert request(live, "GET", "/status", Host="fd00::7").status_code == 200
    assert request(live, "GET", "/status", Host=f"[fd00::7]:{live.port}").status_code == 200
    json_error(request(live, "GET", "/status", Host="other.example"), 421)


def test_a_request_without_a_host_is_refused(live: Live) -> None:
    with raw_socket(live.port) as sock:  # HTTP/1.0 may omit Host; we do not serve it
        sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 421
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]


# ── 8. CSRF: JSON only, and no foreign Origin ────────────────────────────


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json-patch+json",
        "application/jsonx",
        "application/json; charset=latin-1",
    ],
)
def test_a_post_that_is_not_json_gets_415_and_reaches_nothing(
    live: Live, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = live.client.post("/permission", content=json.dumps(TOOL).encode(), headers=headers)
    assert "application/json" in json_error(response, 415)
    nothing_reached_the_gateway(live)


def test_json_with_its_charset_is_accepted(live: Live) -> None:
    live.gateway.auto = "approve"
    for content_type in ("application/json; charset=utf-8", 'Application/JSON; Charset="UTF-8"'):
        response = live.client.post(
            "/permission",
            content=json.dumps(TOOL).encode(),
            headers={"Content-Type": content_type},
        )
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == "approve"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_foreign_origin_is_refused(live: Live, method: str, path: str) -> None:
    other = live.port + 1 if live.port < 65535 else live.port - 1
    for origin in (
        f"http://127.0.0.1:{other}",  # a page served on another local port
        f"http://localhost:{other}",
        "http://127.0.0.1",  # port 80
        f"http://{EVIL}:{live.port}",
        f"https://127.0.0.1:{live.port}",
        "null",  # a sandboxed frame, a file: page
        "http://127.0.0.1:notaport",
    ):
        response = request(live, method, path, Origin=origin, **AS_JSON)
        assert "cross-origin" in json_error(response, 403), origin
    nothing_reached_the_gateway(live)


def test_the_ingress_own_origin_is_served(live: Live) -> None:
    live.gateway.auto = "approve"
    for origin in (f"http://127.0.0.1:{live.port}", f"http://localhost:{live.port}"):
        assert request(live, "GET", "/status", Origin=origin).status_code == 200
        answer = request(live, "POST", "/permission", Origin=origin, **AS_JSON)
        assert answer.status_code == 200
        assert answer.json()["decision"] == "approve"


# ── 8. the ingress token ─────────────────────────────────────────────────


@pytest.mark.parametrize(("method", "path"), [e for e in ENDPOINTS if e[1] != "/healthz"])
def test_with_an_ingress_token_every_endpoint_needs_it(
    connect: Callable[..., Live], method: str, path: str
) -> None:
    live = connect(ingress_token=SECRET)
    for authorization in (
        None,
        "",
        f"Bearer wrong-{SECRET}",
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET}x",
        f"Basic {SECRET}",
        SECRET,
        "Bearer",
    ):
        headers = dict(AS_JSON)
        if authorization is not None:
            headers["Authorization"] = authorization
        response = request(live, method, path, **headers)
        json_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert SECRET not in response.text
    nothing_reached_the_gateway_with(live, SECRET)


def nothing_reached_the_gateway_with(live: Live, token: str) -> None:
    time.sleep(0.2)
    assert live.session().of_type("perm_request") == []
    status = live.client.get("/status", headers={"Authorization": f"Bearer {token}"})
    assert status.status_code == 200
    assert status.json()["permissions"]["pending"] == 0
    assert token not in status.text, "the ingress token is never in /status"


def test_the_right_ingress_token_is_served_and_never_logged(
    connect: Callable[..., Live],
) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    live = connect(ingress_token=SECRET)
    live.gateway.auto = "approve"
    good = {"Authorization": f"Bearer {SECRET}"}
    for method, path in ENDPOINTS:
        response = request(live, method, path, **good, **AS_JSON)
        assert response.status_code == (404 if path == "/nope" else 200), (path, response.text)
    assert request(live, "GET", "/status", Authorization=f"bearer  {SECRET}").status_code == 200
    # /healthz stays open (liveness probes carry no credential), and says no more.
    assert request(live, "GET", "/healthz").json()["ok"] is True
    assert SECRET not in repr(live.uplink.config)
    assert SECRET not in out.getvalue()


# ── 9. the early 413 ─────────────────────────────────────────────────────


def read_all_while_sending(port: int, data: bytes) -> tuple[bytes, BaseException | None]:
    """Send ``data`` from one thread while this one reads until the server
    closes: what a client that reads while it writes receives."""
    sock = raw_socket(port)
    sock.settimeout(scaled(10))
    sent: list[BaseException | None] = [None]

    def send() -> None:
        try:
            sock.sendall(data)
        except OSError as exc:  # the server may stop reading: that is its right
            sent[0] = exc

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    received = b""
    error: BaseException | None = None
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError as exc:
        error = exc
    writer.join(scaled(10))
    sock.close()
    return received, error


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_raw_client_sending_2mib_with_connection_close_gets_the_413(
    live: Live, framing: str
) -> None:
    body = b'{"tool_name": "Write", "tool_input": {"content": "' + b"a" * (2 * MiB) + b'"}}'
    if framing == "chunked":
        framed = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        head = permission_head("Transfer-Encoding: chunked\r\nConnection: close\r\n")
    else:
        framed = body
        head = permission_head(f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    received, error = read_all_while_sending(live.port, head + framed)
    assert error is None, f"the connection was reset: {error!r}; received {received[:200]!r}"
    head_text, _, payload = received.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b"content-type: application/json" in head_text.lower()
    assert "larger than" in json.loads(payload)["error"]
    nothing_reached_the_gateway(live)


def test_an_early_answer_is_not_lost_for_any_refusal(live: Live) -> None:
    """415 (and every other answer given before the body is read) survives too."""
    body = b"x" * (2 * MiB)
    head = (
        "POST /permission HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    received, error = read_all_while_sending(live.port, head + body)
    assert error is None, repr(error)
    assert received.startswith(b"HTTP/1.1 415 "), received[:200]


def test_the_drain_after_an_early_answer_is_bounded(live: Live) -> None:
    """A client that never finishes its body is not read from forever: the
    answer arrives at once and the connection closes within the drain time."""
    from actors.ingress import DRAIN_SECONDS

    with raw_socket(live.port) as sock:
        sock.sendall(permission_head(f"Content-Length: {50 * MiB}\r\n") + b"{")
        started = time.monotonic()
        status, _, _ = read_response(sock, timeout=5)
        assert status == 413
        sock.settimeout(scaled(DRAIN_SECONDS + 10))
        assert sock.recv(1) == b"", "the ingress closes the connection after its drain time"
        assert time.monotonic() - started < scaled(DRAIN_SECONDS + 5)


# ── 8. the bytes pending requests may hold ───────────────────────────────


def test_pending_requests_cannot_hold_more_than_max_pending_bytes(
    connect: Callable[..., Live],
) -> None:
    live = connect(max_pending_bytes=600_000)
    big = "a" * 250_000
    first = live.post_in_background({"tool_name": "Write", "tool_input": big, "request_id": "b1"})
    second = live.post_in_background({"tool_name": "Write", "tool_input": big, "request_id": "b2"})
    wait_for(lambda: live.status()["permissions"]["pending"] == 2, "two large requests pending")
    assert live.status()["permissions"]["pending_bytes"] > 500_000
    # A third would take the total over 600 000 bytes: denied at once, and said why.
    over = live.client.post("/permission", json={"tool_name": "Write", "tool_input": big})
    answer = over.json()
    assert (answer["decision"], answer["reason"], answer["behavior"]) == (
        "deny",
        "over_bytes",
        "deny",
    )
    assert answer["message"] == DENY_MESSAGES[Reason.OVER_BYTES]
    # A small one still fits, and the library API obeys the same cap.
    live.gateway.auto = "approve"
    assert live.client.post("/permission", json={"tool_name": "Read"}).json()["decision"] == (
        "approve"
    )
    outcome = live.uplink.decide("Write", big, timeout=scaled(5))
    assert (outcome.decision, outcome.reason) == ("deny", Reason.OVER_BYTES)
    # Once the large ones are decided, their bytes are free again.
    session = live.session()
    for request_id in ("b1", "b2"):
        live.gateway.respond(session, request_id, {"approved": True, "always_allow": False})
    assert first.result(timeout=scaled(5)).json()["decision"] == "approve"
    assert second.result(timeout=scaled(5)).json()["decision"] == "approve"
    assert live.status()["permissions"]["pending_bytes"] == 0
    again = live.client.post("/permission", json={"tool_name": "Write", "tool_input": big})
    assert again.json()["decision"] == "approve"


# ── 10. the gateway token out of argv ────────────────────────────────────


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUSKIES_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**clean, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=scaled(20),
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--upstream-gatway", f"ws://h/api?token={SECRET}"],
        [f"--upstream-gatway=ws://h/api?token={SECRET}"],
        ["--upstream-gatway", f"ws://h/api?x=1&token={SECRET}&y=2", "--listen", "off"],
        ["--upstream-gateway", f"ws://h/api?token={SECRET}", "--bogus"],
        ["--upstream-gateway", f"ws://h/api?token={SECRET}", "stray"],
        ["--upstream-gateway", f"ftp://h/api?token={SECRET}"],
        ["--upstream-gateway", f"ws://user:{SECRET}@h/api", "--heartbeat-interval", "0"],
        ["--upstream-gatway", f"ws://user:{SECRET}@h/api"],
        ["--ingres-token", SECRET],
        ["--ingress-token", SECRET, "--log-level", SECRET],
        ["--ingress-tok", SECRET, "--max-pending", SECRET],
        [f"--ingress-token={SECRET}", "--bogus", SECRET],
        ["--ingress-token", SECRET, "--ingress-allowed-host", f"a/{SECRET}"],
    ],
    ids=lambda args: " ".join(args).replace(SECRET, "S"),
)
def test_a_usage_error_never_shows_a_token(args: list[str]) -> None:
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert SECRET.lower() not in result.stderr.lower(), "not even upper-cased"
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("run_uplink.py: error: ")


def test_a_usage_error_still_names_the_mistyped_option() -> None:
    result = run_cli(["--upstream-gatway", f"ws://h/api?token={SECRET}"])
    assert "--upstream-gatway" in result.stderr
    assert "did you mean --upstream-gateway?" in result.stderr


def test_a_usage_error_hides_the_tokens_from_the_environment() -> None:
    result = run_cli(
        ["--log-level", SECRET],
        HUSKIES_UPLINK_INGRESS_TOKEN=SECRET,
        HUSKIES_UPSTREAM_TOKEN=SECRET,
    )
    assert result.returncode == 2
    assert SECRET.lower() not in result.stderr.lower()


def test_a_bad_token_file_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (empty, tmp_path / "missing", tmp_path):
        result = run_cli(["--upstream-gateway", "ws://127.0.0.1:9/x", "--token-file", str(path)])
        assert result.returncode == 2
        assert "--token-file" in result.stderr
        assert len(result.stderr.splitlines()) == 1


class Spawned:
    """run_uplink.py running; stderr collected."""

    def __init__(self, args: list[str], **env: str) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HUSKIES_")}
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--listen", "127.0.0.1:0", *args],
            cwd=ROOT,
            env={**clean, "PYTHONUNBUFFERED": "1", **env},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def port(self) -> int:
        match = wait_for(
            lambda: re.search(r"ingress listening on http://127\.0\.0\.1:(\d+)", self.text),
            "the ingress to listen",
            timeout=15,
        )
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Spawned]]:
    started: list[Spawned] = []

    def start(args: list[str], **env: str) -> Spawned:
        started.append(Spawned(args, **env))
        return started[-1]

    yield start
    for spawned in started:
        spawned.stop()


@pytest.mark.parametrize("source", ["file", "env", "file-replaces-url"])
def test_the_gateway_token_from_a_file_or_the_environment_connects(
    spawn: Callable[..., Spawned], tmp_path: Path, source: str
) -> None:
    with Gateway(token=SECRET) as gateway:
        bare = gateway.url.split("?", 1)[0]
        token_file = tmp_path / "token"
        token_file.write_text(SECRET + "\n")
        if source == "file":
            uplink = spawn(["--upstream-gateway", bare, "--token-file", str(token_file)])
        elif source == "env":
            uplink = spawn(["--upstream-gateway", bare], HUSKIES_UPSTREAM_TOKEN=SECRET)
        else:
            url = bare + "?token=stale&v=1"
            uplink = spawn(["--upstream-gateway", url, "--token-file", str(token_file)])
        port = uplink.port()
        session = gateway.session(1, timeout=scaled(10))
        assert gateway.frame(session, "identity", timeout=scaled(10))["payload"]["project"]
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=scaled(5)).text
        uplink.stop()
    assert SECRET not in uplink.text
    assert SECRET not in status
    assert "token=***" in json.loads(status)["connection"]["url"]
    assert "unencrypted" not in uplink.text, "loopback: no warning"


def test_a_token_with_url_special_characters_round_trips(
    make_uplink: Callable[..., Uplink], make_reference_gateway: Callable[..., ReferenceGateway]
) -> None:
    token = "a&b=c d/é%2F?#+;token=x"
    gw = make_reference_gateway(token=token)
    bare = gw.url_for_sleds().split("?", 1)[0]
    uplink = make_uplink(bare, upstream_token=token, project="special")
    assert uplink.wait_connected(scaled(10)), "the gateway accepted the percent-encoded token"
    assert token not in json.dumps(uplink.status())


def test_a_password_in_the_gateway_url_is_never_shown(
    make_uplink: Callable[..., Uplink],
) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    with socket.socket() as probe:  # a closed port: every connect fails, and is logged
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uplink = make_uplink(
        f"ws://sled:{SECRET}@127.0.0.1:{port}/api/sled-uplink", listen="127.0.0.1:0"
    )
    base = f"http://127.0.0.1:{uplink._ingress.port}"
    wait_for(lambda: "backoff" in httpx.get(f"{base}/status").text, "a failed connect")
    status = httpx.get(f"{base}/status").text
    assert SECRET not in status
    assert json.loads(status)["connection"]["url"].startswith("ws://sled:***@127.0.0.1")
    assert SECRET not in out.getvalue()
    assert SECRET not in repr(uplink.config)


def test_a_token_over_plain_ws_to_a_remote_host_is_warned_about_once(
    make_uplink: Callable[..., Uplink],
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        # .invalid never resolves: nothing leaves the machine.
        make_uplink("ws://gateway.invalid:8080/api/sled-uplink", upstream_token=SECRET)
        make_uplink(f"ws://gateway.invalid:8080/api/sled-uplink?token={SECRET}")
        make_uplink("wss://gateway.invalid:8443/api/sled-uplink", upstream_token=SECRET)
        make_uplink("ws://127.0.0.1:9/api/sled-uplink", upstream_token=SECRET)
        make_uplink("ws://gateway.invalid:8080/api/sled-uplink")  # no token: nothing to leak
        time.sleep(0.2)
    finally:
        logger.remove(sink)
    warned = [line for line in lines if "unencrypted" in line]
    assert len(warned) == 2, lines
    assert all("gateway.invalid" in line and "wss://" in line for line in warned)
    assert not [line for line in lines if SECRET in line]


# ── 11. control characters in a tool name, in the text log ───────────────

HOSTILE_TOOL = (
    "Bash\x1b[2J\x1b]0;pwned\x07\r\n2026-01-01 00:00:00.000 | INFO    | main | FORGED\u202e"
)


def test_control_characters_in_a_tool_name_are_escaped_in_the_text_log(live: Live) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    live.gateway.auto = "deny"
    answer = live.client.post(
        "/permission", json={"tool_name": HOSTILE_TOOL, "request_id": "evil\x1b[31m\r\nid"}
    ).json()
    assert answer["decision"] == "deny"
    wait_for(lambda: "decided" in out.getvalue(), "the decision logged")
    text = out.getvalue()
    assert "\x1b" not in text, "an escape sequence reached the terminal"
    assert "\x07" not in text
    assert "\r" not in text
    assert "\u202e" not in text
    assert not [line for line in text.splitlines() if line.startswith("2026-01-01")], text
    decided = next(line for line in text.splitlines() if "decided" in line)
    assert "FORGED" in decided, "the forged text stays on the real line, escaped"
    assert "\\x1b[2J" in decided
    assert "\\r\\n" in decided


def test_the_json_log_keeps_the_tool_name_exact(live: Live) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", json_lines=True, stream=out)
    live.gateway.auto = "deny"
    live.client.post("/permission", json={"tool_name": HOSTILE_TOOL})
    wait_for(lambda: "decided" in out.getvalue(), "the decision logged")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    decided = next(r for r in records if r["message"].startswith("decided"))
    assert HOSTILE_TOOL in decided["message"]
    assert "\x1b" not in out.getvalue(), "JSON escapes it itself"


# Keep the library's own guarantees in view: a started uplink with the
# defaults has no ingress token and the loopback allowlist.
def test_the_library_defaults_are_the_safe_ones() -> None:
    config = UplinkConfig(upstream_url="", **FAST)
    assert config.ingress_token is None
    assert config.ingress_allowed_hosts == ()
    assert config.max_pending_bytes == 64 * MiB
