"""Actor-state logging, the inspection surface.

Every state change is one loguru line bound to ``actor=<name>``; pykka's
stdlib logger reaches loguru; ``--log-json`` gives one JSON object per line;
a token never leaves the process in either format.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from loguru import logger

from actors.base import InjectedFault
from actors.context import Role
from actors.logsetup import configure_logging
from actors.messages import InjectFault
from sled_gateway.logs import configure_cli_logging
from tests.conftest import scaled
from tests.support.gateway import Gateway

STATE_LINE = re.compile(r"^state (\S+) -> (\S+)")


@dataclass(frozen=True)
class Line:
    actor: str
    level: str
    message: str
    exception: BaseException | None


class Capture:
    """A loguru sink that keeps (actor, level, message, exception) of every record."""

    def __init__(self) -> None:
        self.lines: list[Line] = []
        self._cond = threading.Condition()

    def sink(self, message: Any) -> None:
        record = message.record
        exc = record["exception"]
        line = Line(
            record["extra"].get("actor", "<unbound>"),
            record["level"].name,
            record["message"],
            exc.value if exc is not None else None,
        )
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Line], bool], timeout: float = 5.0) -> Line:
        deadline = time.monotonic() + scaled(timeout)
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(f"{x.actor}: {x.message}" for x in self.lines[-40:])
                    raise AssertionError(f"no such log line in time; last lines:\n{tail}")
                self._cond.wait(remaining)

    def state_line(self, actor: str, to: str, timeout: float = 5.0) -> Line:
        return self.wait(
            lambda x: (
                x.actor == actor and bool(m := STATE_LINE.match(x.message)) and m.group(2) == to
            ),
            timeout,
        )

    def snapshot(self) -> list[Line]:
        with self._cond:
            return list(self.lines)


def transitions(lines: list[Line], actor: str) -> list[tuple[str, str]]:
    """(from, to) of each state line ``actor`` logged, in order."""
    return [
        (m.group(1), m.group(2))
        for x in lines
        if x.actor == actor and (m := STATE_LINE.match(x.message))
    ]


@pytest.fixture
def capture() -> Iterator[Capture]:
    configure_logging("DEBUG")  # pykka's DEBUG lines included, whatever the env says
    cap = Capture()
    sink_id = logger.add(cap.sink, level="DEBUG", format="{message}")
    yield cap
    logger.remove(sink_id)


def test_every_actor_logs_its_state_changes_bound_to_its_name(
    gateway: Gateway, make_uplink, capture: Capture
) -> None:
    uplink = make_uplink(gateway.url, backoff_initial=0.05)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    assert uplink.wait_connected(scaled(5))
    expected_up = {
        "supervisor": "connected",
        "connection#1": "connected",
        "permissions": "forwarding",
        "heartbeat": "beating",
        "mcp": "serving",
        "router": "routing",
    }
    for actor, state in expected_up.items():
        capture.state_line(actor, state)
    # The session ends: each session user logs its own change, then session 2.
    gateway.close(session, 1000)
    for actor, state in {
        "supervisor": "backoff",
        "permissions": "holding",
        "heartbeat": "idle",
        "mcp": "idle",
    }.items():
        capture.state_line(actor, state)
    gateway.frame(gateway.session(2, timeout=scaled(5)), "identity")
    capture.state_line("connection#2", "connected")
    capture.state_line("heartbeat", "beating")  # (first seen above, but also again)
    assert uplink.wait_connected(scaled(5))

    lines = capture.snapshot()
    # Every state line is bound to a real actor name, never the default.
    bound_to = {x.actor for x in lines if STATE_LINE.match(x.message)}
    assert bound_to <= {*expected_up, "connection#2"}, bound_to
    # Each change is logged as from -> to: an actor's lines chain up.
    for actor in ("supervisor", "permissions", "heartbeat", "mcp"):
        chain = transitions(lines, actor)
        for (_, to), (frm, _) in itertools.pairwise(chain):
            assert frm == to, (actor, chain)
    # The snapshot (what /status shows) agrees with the last logged state.
    roles = ("permissions", "heartbeat", "mcp", "router")
    deadline = time.monotonic() + scaled(5)
    while True:
        status = uplink.status()
        lines = capture.snapshot()
        last = {actor: transitions(lines, actor)[-1][1] for actor in (*roles, "supervisor")}
        shown = {actor: status[actor]["state"] for actor in roles}
        shown["supervisor"] = status["connection"]["state"]
        if shown == last or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert shown == last


def test_pykka_unhandled_exception_reaches_loguru(
    gateway: Gateway, make_uplink, capture: Capture
) -> None:
    uplink = make_uplink(gateway.url)
    gateway.frame(gateway.session(1), "identity")
    router = uplink.context.directory.get(Role.ROUTER)
    assert router is not None
    router.tell(InjectFault("boom from the test"))
    line = capture.wait(lambda x: x.actor == "pykka" and "Unhandled exception" in x.message)
    assert line.level == "ERROR"
    assert "RouterActor" in line.message
    assert isinstance(line.exception, InjectedFault)
    assert str(line.exception) == "boom from the test"
    # Our own line about it is bound to the actor that crashed.
    capture.wait(lambda x: x.actor == "router" and x.level == "ERROR" and "crashed" in x.message)


def test_pykka_debug_lines_reach_loguru(gateway: Gateway, make_uplink, capture: Capture) -> None:
    make_uplink(gateway.url)
    line = capture.wait(
        lambda x: x.actor == "pykka" and x.message.startswith("Starting SupervisorActor")
    )
    assert line.level == "DEBUG"


def test_stdlib_lines_are_not_format_expanded(capture: Capture) -> None:
    logging.getLogger("pykka").warning("Unexpected message received by X: {'a': %s} {0} {}", 1)
    line = capture.wait(lambda x: x.actor == "pykka" and x.message.startswith("Unexpected"))
    assert line.message == "Unexpected message received by X: {'a': 1} {0} {}"
    assert line.level == "WARNING"


def test_json_sink_gives_one_parseable_object_per_line(gateway: Gateway, make_uplink) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", json_lines=True, stream=out)
    uplink = make_uplink(gateway.url)
    session = gateway.session(1)
    gateway.frame(session, "identity")
    assert uplink.wait_connected(scaled(5))
    router = uplink.context.directory.get(Role.ROUTER)
    assert router is not None
    router.tell(InjectFault("json boom"))
    logger.bind(actor="test", extra_field={"n": 1}).info('two\nlines with "quotes" and {braces}')
    deadline = time.monotonic() + scaled(5)
    while "Unhandled exception" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    uplink.stop()

    records = []
    for text in out.getvalue().splitlines():
        record = json.loads(text)
        assert isinstance(record, dict), text
        assert {"time", "level", "actor", "message"} <= record.keys(), text
        assert isinstance(record["actor"], str)
        assert record["actor"]
        datetime.fromisoformat(record["time"])
        records.append(record)
    actors = {r["actor"] for r in records}
    assert {
        "supervisor",
        "connection#1",
        "permissions",
        "heartbeat",
        "mcp",
        "router",
        "pykka",
        "websockets",
    } <= actors
    state = [r for r in records if r["actor"] == "supervisor" and r["message"].startswith("state ")]
    assert any(r["message"].startswith("state connecting -> connected") for r in state)
    mine = [r for r in records if r["actor"] == "test"]
    assert len(mine) == 1
    assert mine[0]["message"] == 'two\nlines with "quotes" and {braces}'
    assert mine[0]["extra"] == {"extra_field": {"n": 1}}
    crash = next(
        r for r in records if r["actor"] == "pykka" and "Unhandled exception" in r["message"]
    )
    assert crash["level"] == "ERROR"
    assert "InjectedFault: json boom" in crash["exception"]


def _fail(message: str) -> None:
    raise RuntimeError(message)


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_a_token_is_redacted_in_every_sink(json_lines: bool) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", json_lines=json_lines, stream=out)
    log = logger.bind(actor="test")
    log.info("connecting to ws://gw:8080/api/sled-uplink?token=abc")
    log.info('quoted: "ws://gw/api?token=abc" and ws://gw/api?x=1&token=abc#frag')
    log.bind(url="ws://gw/api?token=abc").info("with a bound url")
    logging.getLogger("websockets.client").debug("> GET /api/sled-uplink?token=abc HTTP/1.1")
    try:
        _fail("cannot reach ws://gw/api?token=abc")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    assert "token=abc" not in text
    assert "abc" not in text
    assert text.count("token=***") >= (7 if json_lines else 6), text
    if json_lines:
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) == 5
        assert records[0]["message"] == "connecting to ws://gw:8080/api/sled-uplink?token=***"
        assert (
            records[1]["message"]
            == 'quoted: "ws://gw/api?token=***" and ws://gw/api?x=1&token=***#frag'
        )
        assert records[2]["extra"] == {"url": "ws://gw/api?token=***"}
        assert records[3]["actor"] == "websockets"
        assert records[3]["message"] == "> GET /api/sled-uplink?token=*** HTTP/1.1"
        assert "RuntimeError: cannot reach ws://gw/api?token=***" in records[4]["exception"]
    else:
        assert "| websockets    | > GET /api/sled-uplink?token=*** HTTP/1.1" in text
        assert 'quoted: "ws://gw/api?token=***" and ws://gw/api?x=1&token=***#frag' in text


def test_the_gateway_command_logs_through_the_same_setup() -> None:
    """One setup for both commands: the gateway's lines are redacted and escaped
    where they leave the process, in the uplink's format."""
    out = io.StringIO()
    try:
        configure_cli_logging("INFO", stream=out)
        logger.bind(actor="gateway").info("sled ws://gw/api?token=abc says\r\nforged | line")
        logging.getLogger("uvicorn.error").warning("WebSocket /api/sled-uplink?token=abc 403")
        logging.getLogger("uvicorn.error").info("chatter below WARNING is not shown")
    finally:
        configure_logging(os.environ.get("SLED_TEST_LOG_LEVEL", "DEBUG"))
    text = out.getvalue()
    assert "abc" not in text
    assert text.count("token=***") == 2, text
    lines = text.splitlines()
    assert len(lines) == 2, "the CR LF is spelled out: no forged line"
    assert "| gateway       | sled ws://gw/api?token=*** says\\r\\nforged | line" in lines[0]
    assert "| uvicorn       | WebSocket /api/sled-uplink?token=*** 403" in lines[1]
