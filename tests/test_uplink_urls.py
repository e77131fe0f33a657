"""Several gateway URLs and the gateway's ``retry_after`` (docs/protocol.md).

The gateways are real websocket servers (tests/support/gateway.py); the
uplinks are the real actors. A refused handshake moves the uplink to the
next URL; a close ``1012``/``1013`` with ``retry_after=<s>`` makes it wait a
uniformly random time in ``[0, s]`` and then dial the next URL; a request
pending when the close came is denied exactly once and never re-sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from loguru import logger

from actors import Uplink
from actors.config import UplinkConfig
from protocol import ConfigError, Decision, Reason
from tests.conftest import scaled
from tests.support.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent
APPROVE = {"approved": True, "always_allow": False}


def _project_sessions(gw: Gateway, project: str) -> list:
    return [
        s
        for s in list(gw.sessions)
        if s.of_type("identity") and s.of_type("identity")[0]["payload"]["project"] == project
    ]


def test_a_refusing_url_is_passed_over_for_the_next(make_uplink: Callable[..., Uplink]) -> None:
    with Gateway(reject_status=503) as refusing, Gateway(auto="approve") as live:
        orders = set()
        made = 0
        # Until both orders were seen (the shuffle), at most 30 uplinks.
        while len(orders) < 2 and made < 30:
            before = refusing.handshakes
            uplink = make_uplink(f"{refusing.url},{live.url}", project=f"s{made}")
            made += 1
            assert uplink.wait_connected(scaled(5))
            decision = uplink.decide("Bash", {"command": "ls"}, timeout=scaled(5)).decision
            assert decision is Decision.APPROVE
            orders.add("refusing first" if refusing.handshakes > before else "live first")
            uplink.stop()
        assert orders == {"refusing first", "live first"}, (orders, made)
        assert len(live.sessions) == made


def test_retry_after_waits_a_uniform_part_of_the_window_then_dials_the_next_url(
    make_uplink: Callable[..., Uplink],
) -> None:
    window = 2.0
    runs = 8
    with Gateway() as a, Gateway() as b:
        uplinks = [
            # A back-off far above the window: only retry_after can bring them back in time.
            make_uplink(f"{a.url},{b.url}", project=f"r{i}", backoff_initial=30.0, backoff_max=60.0)
            for i in range(runs)
        ]
        for uplink in uplinks:
            assert uplink.wait_connected(scaled(5))
        closed_at: dict[str, float] = {}
        first_gw: dict[str, Gateway] = {}
        for i in range(runs):
            project = f"r{i}"
            gw = a if _project_sessions(a, project) else b
            session = _project_sessions(gw, project)[0]
            first_gw[project] = gw
            closed_at[project] = time.monotonic()
            gw.close(session, 1012, f"retry_after={window:g}")
        delays = []
        for i in range(runs):
            project = f"r{i}"
            other = b if first_gw[project] is a else a
            # The next session is on the other URL.
            second = other.wait_until(
                lambda p=project, o=other: (_project_sessions(o, p) or [None])[0],
                scaled(window + 3),
            )
            delays.append(second.opened_at - closed_at[project])
            assert len(_project_sessions(first_gw[project], project)) == 1
    assert all(-0.05 <= d <= window + 0.5 for d in delays), delays
    assert max(delays) - min(delays) > 0.2, delays  # random, not one fixed wait


def test_a_bad_retry_after_is_ignored_with_a_log_line_and_the_back_off_applies(
    make_uplink: Callable[..., Uplink],
) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    with Gateway() as gw:
        uplink = make_uplink(gw.url, backoff_initial=1.5, backoff_max=1.5)
        assert uplink.wait_connected(scaled(5))
        for n, reason in enumerate(["retry_after=abc", "retry_after=-1", "retry_after=99999"]):
            session = gw.session(n + 1, timeout=scaled(10))
            gw.frame(session, "identity")
            closed = time.monotonic()
            gw.close(session, 1013, reason)
            nxt = gw.session(n + 2, timeout=scaled(10))
            # The back-off (1.5 s, +-20 %), not a retry_after window.
            assert nxt.opened_at - closed >= 1.1, reason
    logger.remove(sink)
    ignored = [line for line in lines if "ignored, the back-off applies" in line]
    assert len(ignored) == 3, lines


def test_a_request_pending_at_a_1012_is_denied_once_and_not_sent_again(
    make_uplink: Callable[..., Uplink],
) -> None:
    with Gateway() as a, Gateway() as b:
        uplink = make_uplink(f"{a.url},{b.url}", project="fc")
        assert uplink.wait_connected(scaled(5))
        first = a if _project_sessions(a, "fc") else b
        other = b if first is a else a
        session = _project_sessions(first, "fc")[0]
        pending = uplink.request_permission("Bash", {"command": "rm -rf build"})
        request = first.frame(session, "perm_request")
        first.close(session, 1012, "retry_after=1")
        outcome = pending.result(timeout=scaled(5))
        assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SESSION_ENDED)
        second = other.wait_until(lambda: (_project_sessions(other, "fc") or [None])[0], scaled(5))
        assert uplink.wait_connected(scaled(5))
        # A late answer for it on the new replica changes nothing: it is no longer pending.
        lines: list[str] = []
        sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
        try:
            other.respond(second, request["req_id"], APPROVE)
            deadline = time.monotonic() + scaled(5)
            while not any("unknown or already decided" in line for line in lines):
                assert time.monotonic() < deadline, "the late answer was not seen"
                time.sleep(0.02)
        finally:
            logger.remove(sink)
        assert pending.result(0).decision is Decision.DENY
        assert second.of_type("perm_request") == []
        assert uplink.status()["permissions"]["pending"] == 0
        # The uplink still works on the new replica.
        other.auto = "approve"
        assert uplink.decide("Bash", {"command": "ls"}, timeout=scaled(5)).decision is (
            Decision.APPROVE
        )


@pytest.mark.parametrize(
    "value", ["ws://a/x,", ",ws://a/x", "ws://a/x,,ws://b/y", "ws://a/x,http://b/y"]
)
def test_a_bad_url_list_is_refused_by_the_library(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        UplinkConfig(upstream_url=value).validate()
    assert raised.value.option == "--upstream-gateway"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUSKIES_")}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "run_uplink.py", *args, "--listen", "off"],
        cwd=ROOT,
        check=False,
        env=clean,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--upstream-gateway", "ws://127.0.0.1:9/a", "--upstream-gateway", ""], {}),
        (["--upstream-gateway", "ws://127.0.0.1:9/a", "--upstream-gateway", "ftp://h/a"], {}),
        ([], {"HUSKIES_UPSTREAM_GATEWAY": "ws://127.0.0.1:9/a,,ws://127.0.0.1:9/b"}),
        ([], {"HUSKIES_UPSTREAM_GATEWAY": "ws://127.0.0.1:9/a,https://127.0.0.1:9/b"}),
    ],
)
def test_a_bad_url_in_the_list_is_one_line_and_exit_2(args: list[str], env: dict[str, str]) -> None:
    result = _run(args, **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--upstream-gateway" in lines[0]


def test_repeated_options_replace_the_variable(make_uplink: Callable[..., Uplink]) -> None:
    import run_uplink

    os.environ["HUSKIES_UPSTREAM_GATEWAY"] = "ws://from-env/x"
    try:
        parser = run_uplink.build_parser()
        args = parser.parse_args(
            ["--upstream-gateway", "ws://one/x", "--upstream-gateway", "ws://two/y,ws://three/z"]
        )
        config = run_uplink.config_from_args(args)
        assert config.gateway_urls == ("ws://one/x", "ws://two/y", "ws://three/z")
        config = run_uplink.config_from_args(run_uplink.build_parser().parse_args([]))
        assert config.gateway_urls == ("ws://from-env/x",)
    finally:
        del os.environ["HUSKIES_UPSTREAM_GATEWAY"]


def test_a_token_sent_in_clear_to_any_of_the_urls_is_warned_about(
    make_uplink: Callable[..., Uplink],
) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        make_uplink("wss://127.0.0.1:9/a?token=t,ws://gw.example.test:9/a?token=t")
    finally:
        logger.remove(sink)
    warned = [line for line in lines if "travels unencrypted" in line]
    assert len(warned) == 1 and "gw.example.test" in warned[0], lines
    assert not any("token=t" in line for line in lines)
