"""The connection: identity, heartbeats, pings, keepalive, TLS, size limit, redaction.

Every test runs the real uplink against a real WebSocket gateway on loopback.
"""

from __future__ import annotations

import io
import itertools
import json
import queue
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from actors import EnvelopeIn, Uplink, UplinkActor, UplinkConfig, handles
from actors.logsetup import configure_logging
from protocol import Decision, Reason
from tests.conftest import FAST, scaled
from tests.support.gateway import Gateway
from tests.support.relay import FreezableRelay

HEARTBEAT = '{"type":"heartbeat","req_id":"","payload":null}'


def test_identity_is_the_first_frame_of_every_session(gateway: Gateway, make_uplink) -> None:
    make_uplink(gateway.url)
    first = gateway.session(1)
    gateway.frame(first, "identity")
    gateway.close(first, 1000)
    second = gateway.session(2, timeout=scaled(5))
    gateway.frame(second, "identity")
    for session in (first, second):
        assert session.raw[0].startswith(
            '{"type":"identity","req_id":"identity","payload":{"project":"test-proj"'
        )
        assert "token" not in session.raw[0]
    assert second.frames[0]["payload"]["version"]


def test_heartbeats_start_after_one_interval_and_keep_time(gateway: Gateway, make_uplink) -> None:
    interval = 0.3
    make_uplink(gateway.url, heartbeat_interval=interval)
    session = gateway.session(1)
    gateway.frame(session, "heartbeat", index=2, timeout=scaled(5))
    identity_at = session.frame_times[0]
    beats = [t for f, t in zip(session.raw, session.frame_times, strict=True) if f == HEARTBEAT]
    assert session.raw[0].startswith('{"type":"identity"')
    assert beats[0] - identity_at >= interval * 0.9, "first beat only after one interval"
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert all(interval * 0.6 < gap < interval + scaled(0.4) for gap in gaps), gaps


def test_heartbeats_stop_with_the_session_and_do_not_leak(gateway: Gateway, make_uplink) -> None:
    interval = 0.25
    make_uplink(gateway.url, heartbeat_interval=interval, backoff_initial=0.05)
    first = gateway.session(1)
    gateway.frame(first, "heartbeat", timeout=scaled(3))
    gateway.close(first, 1000)
    second = gateway.session(2, timeout=scaled(5))
    gateway.frame(second, "heartbeat", index=1, timeout=scaled(5))
    # Session 2's first beat comes a full interval after its own identity,
    # never on the old session's schedule.
    beats = [t for f, t in zip(second.raw, second.frame_times, strict=True) if f == HEARTBEAT]
    assert beats[0] - second.frame_times[0] >= interval * 0.9
    # Nothing was sent on the first session after it closed.
    closed_count = len(first.raw)
    time.sleep(interval * 2)
    assert len(first.raw) == closed_count


def test_gateway_pings_are_answered(make_uplink) -> None:
    # The gateway pings every 0.1 s and drops the sled if a pong is 0.5 s late.
    with Gateway(ping_interval=0.1, ping_timeout=0.5) as gw:
        make_uplink(gw.url)
        session = gw.session(1)
        gw.frame(session, "identity")
        time.sleep(1.2)
        assert not session.closed
        assert len(gw.sessions) == 1


def test_keepalive_detects_a_half_open_gateway(gateway: Gateway, make_uplink) -> None:
    ping_interval, ping_timeout = 0.3, 0.3
    with FreezableRelay(gateway.port) as relay:
        uplink = make_uplink(
            relay.url(f"/api/sled-uplink?token={gateway.token}"),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_initial=0.1,
            open_timeout=0.5,
        )
        session = gateway.session(1)
        gateway.frame(session, "identity")
        assert uplink.wait_connected(scaled(3))
        relay.freeze()
        frozen_at = time.monotonic()
        pending = uplink.request_permission("Bash", {"command": "ls"})
        outcome = pending.result(timeout=scaled(10))
        detected = time.monotonic() - frozen_at
        assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SESSION_ENDED)
        # interval + timeout, plus the ~1 s bound on the closing handshake.
        assert detected < ping_interval + ping_timeout + 1.0 + scaled(1.0), detected
        relay.heal()
        second = gateway.session(2, timeout=scaled(10))
        gateway.frame(second, "identity")
        gateway.auto = "approve"
        assert uplink.decide("Bash", {}, timeout=scaled(5)).decision is Decision.APPROVE


def test_binary_and_oversized_frames(gateway: Gateway, make_uplink) -> None:
    uplink = make_uplink(gateway.url, max_frame_bytes=64 * 1024)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    gateway.send_raw(session, b"\x00\x01binary")
    gateway.send_raw(session, "[1, 2]")
    gateway.wait_until(
        lambda: uplink.status()["counters"].get("frames_dropped", {}).get("not_object") == 1
    )
    assert uplink.status()["counters"]["frames_dropped"]["binary"] == 1
    assert not session.closed
    # A frame over the maximum closes the session with 1009; the uplink reconnects.
    gateway.send_raw(session, "x" * (64 * 1024 + 1))
    gateway.wait_closed(session)
    assert session.close_code == 1009
    gateway.frame(gateway.session(2, timeout=scaled(5)), "identity")


def test_token_never_reaches_a_log_line_even_at_debug(make_uplink) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    token = "TOPSECRET-7f3a"
    with Gateway(token=token) as gw:
        uplink = make_uplink(gw.url)
        gw.frame(gw.session(1), "identity")
        assert token not in json.dumps(uplink.status())
    with Gateway(token="other") as refusing:  # a 401 path logs the URL too
        uplink = make_uplink(refusing.url.replace("other", token))
        refusing.wait_until(lambda: refusing.handshakes >= 1)
        time.sleep(0.2)
        uplink.stop()
    text = out.getvalue()
    assert "token=***" in text
    assert "GET /api/sled-uplink" in text, "the DEBUG handshake line must have been logged"
    assert token not in text


# ── TLS ─────────────────────────────────────────────────────────────────────


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA and a server certificate for DNS:localhost only."""
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=d,
    )
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def _server_context(files: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["cert"], files["key"])
    return context


def test_wss_with_ca_file_connects(tls_files, make_uplink) -> None:
    with Gateway(ssl=_server_context(tls_files), host="localhost") as gw:
        gw.auto = "approve"
        uplink = make_uplink(gw.url, ca_file=str(tls_files["ca"]))
        gw.frame(gw.session(1), "identity")
        assert uplink.decide("Bash", {}, timeout=scaled(5)).decision is Decision.APPROVE


def test_wss_without_the_ca_is_refused_and_retried(tls_files, make_uplink) -> None:
    with Gateway(ssl=_server_context(tls_files), host="localhost") as gw:
        uplink = make_uplink(gw.url, backoff_initial=0.05, backoff_max=0.2)
        gw.wait_until(
            lambda: gw.handshakes == 0 and uplink.status()["connection"]["sessions_started"] >= 3,
            timeout=scaled(5),
        )
        assert not gw.sessions
        assert "CERTIFICATE_VERIFY_FAILED" in uplink.status()["connection"]["last_end"]


def test_wss_with_a_wrong_hostname_is_refused(tls_files, make_uplink) -> None:
    with Gateway(ssl=_server_context(tls_files), host="127.0.0.1") as gw:
        uplink = make_uplink(gw.url, ca_file=str(tls_files["ca"]))
        gw.wait_until(
            lambda: uplink.status()["connection"]["sessions_started"] >= 2, timeout=scaled(5)
        )
        assert not gw.sessions
        last_end = uplink.status()["connection"]["last_end"]
        assert "match" in last_end or "hostname" in last_end.lower(), last_end


class _OrderRecorder(UplinkActor):
    """Records the req_id of every ``test_order`` frame, in arrival order."""

    role = "test_order"
    seen: ClassVar[queue.Queue[str]] = queue.Queue()

    @handles(EnvelopeIn)
    def _on_frame(self, message: EnvelopeIn) -> None:
        self.seen.put(message.envelope.req_id)


def test_inbound_order_holds_across_fragmented_binary_and_plain_text_frames(
    gateway: Gateway,
) -> None:
    """Complete text frames are dispatched as they are parsed; a fragmented or
    binary message before them goes through websockets' queue, and the text
    frames behind it must wait their turn."""
    uplink = Uplink(
        UplinkConfig(upstream_url=gateway.url, project="order", **FAST),
        handlers={"test_order": _OrderRecorder},
    ).start()
    try:
        session = gateway.session(1)
        gateway.frame(session, "identity")

        def frame(req_id: str) -> str:
            return json.dumps({"type": "test_order", "req_id": req_id, "payload": None})

        async def burst() -> None:  # one turn of the gateway's loop: one TCP segment
            whole = frame("o1")
            await session.ws.send([whole[:10], whole[10:]])  # fragmented text
            await session.ws.send(b"\x00binary")  # dropped by the router, in its turn
            for i in range(2, 6):
                await session.ws.send(frame(f"o{i}"))
            await session.ws.send(frame("o6"))

        gateway._call(burst)
        got = [_OrderRecorder.seen.get(timeout=scaled(5)) for _ in range(6)]
        assert got == ["o1", "o2", "o3", "o4", "o5", "o6"]
        # And once the queue is drained, plain frames take the direct path again.
        gateway.send(session, "test_order", "o7")
        assert _OrderRecorder.seen.get(timeout=scaled(5)) == "o7"
        assert uplink.status()["counters"]["frames_dropped"] == {"binary": 1}
    finally:
        uplink.stop()


def test_a_text_frame_that_is_not_utf8_fails_the_session_with_1007(
    gateway: Gateway, make_uplink
) -> None:
    """As websockets does (RFC 6455 §8.1); the uplink then reconnects."""
    make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    text_frame = b"\x81\x02\xff\xfe"  # FIN + text, unmasked, 2 bytes of bad UTF-8
    gateway._call(lambda: _write_raw(session.ws, text_frame))
    gateway.wait_closed(session)
    assert session.close_code == 1007
    gateway.frame(gateway.session(2), "identity")


async def _write_raw(ws: Any, data: bytes) -> None:
    ws.transport.write(data)
