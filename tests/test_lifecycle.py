"""Start in order, stop in reverse: ``sled_gateway.lifecycle`` and the gateway's parts.

The parts here are real: a listening TCP socket, a SQLite file held open, a
thread, the reference gateway itself with a transport. Each records when it
starts and stops in one shared journal, and each test reads the order off it.
"""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from loguru import logger

from sled_gateway import Gateway
from sled_gateway.lifecycle import Lifecycle
from sled_gateway.transports.terminal import TerminalPrompter

T = 10.0


class Journal:
    """What started and stopped, in order, from any thread."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def note(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)


class ListeningSocket:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.journal.note("start socket")

    def stop(self) -> None:
        assert self.sock is not None
        self.sock.close()
        self.journal.note("stop socket")


class Database:
    def __init__(self, journal: Journal, path: Path) -> None:
        self.journal, self.path = journal, path
        self.conn: sqlite3.Connection | None = None

    def start(self) -> None:
        self.conn = sqlite3.connect(self.path, check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        self.journal.note("start database")

    def stop(self) -> None:
        assert self.conn is not None
        self.conn.close()
        self.journal.note("stop database")


class Worker:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.done.wait, daemon=True)
        self.thread.start()
        self.journal.note("start worker")

    def stop(self) -> None:
        assert self.thread is not None
        self.done.set()
        self.thread.join(T)
        self.journal.note("stop worker")


def _connect_to(part: ListeningSocket) -> Callable[[], None]:
    """A start that fails after using the first part: it connects to its socket
    (so that socket really listens), then raises."""

    def start() -> None:
        assert part.sock is not None
        socket.create_connection(part.sock.getsockname(), timeout=T).close()
        raise ConnectionRefusedError("the third part cannot start")

    return start


def test_parts_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    journal = Journal()
    sock, worker = ListeningSocket(journal), Worker(journal)
    db = Database(journal, tmp_path / "x.db")
    lifecycle = Lifecycle()
    lifecycle.add("socket", sock.start, sock.stop)
    lifecycle.add("database", db.start, db.stop)
    lifecycle.add("worker", worker.start, worker.stop)
    lifecycle.start()
    assert lifecycle.started == ["socket", "database", "worker"]
    assert journal.lines == ["start socket", "start database", "start worker"]
    lifecycle.stop()
    assert journal.lines[3:] == ["stop worker", "stop database", "stop socket"]
    assert lifecycle.started == []
    lifecycle.stop()  # idempotent: nothing is stopped twice
    assert len(journal.lines) == 6


def test_a_failed_third_start_stops_the_first_two_in_reverse(tmp_path: Path) -> None:
    journal = Journal()
    sock, db = ListeningSocket(journal), Database(journal, tmp_path / "x.db")
    never_stopped = Worker(journal)
    lifecycle = Lifecycle()
    lifecycle.add("socket", sock.start, sock.stop)
    lifecycle.add("database", db.start, db.stop)
    lifecycle.add("third", _connect_to(sock), never_stopped.stop)
    lifecycle.add("fourth", never_stopped.start, never_stopped.stop)
    with pytest.raises(ConnectionRefusedError, match="third part"):
        lifecycle.start()
    assert journal.lines == ["start socket", "start database", "stop database", "stop socket"]
    assert lifecycle.started == []
    assert db.conn is not None
    with pytest.raises(sqlite3.ProgrammingError):  # really closed
        db.conn.execute("SELECT 1")


def test_a_failing_stop_is_logged_and_the_others_still_stop(tmp_path: Path) -> None:
    journal = Journal()
    sock, worker = ListeningSocket(journal), Worker(journal)
    db = Database(journal, tmp_path / "x.db")
    lifecycle = Lifecycle()
    lifecycle.add("socket", sock.start, sock.stop)
    lifecycle.add("database", db.start, db.stop)
    lifecycle.add("broken", lambda: None, lambda: sqlite3.connect(tmp_path / "no" / "such.db"))
    lifecycle.add("worker", worker.start, worker.stop)
    lifecycle.start()
    logged: list[str] = []
    sink = logger.add(lambda message: logged.append(str(message)), level="ERROR")
    try:
        lifecycle.stop()
    finally:
        logger.remove(sink)
    assert journal.lines[3:] == ["stop worker", "stop database", "stop socket"]
    assert any("stopping broken failed" in line for line in logged), logged


def test_a_part_added_while_running_starts_at_once_and_stops_first(tmp_path: Path) -> None:
    journal = Journal()
    sock, worker = ListeningSocket(journal), Worker(journal)
    lifecycle = Lifecycle()
    lifecycle.add("socket", sock.start, sock.stop)
    lifecycle.start()
    lifecycle.add("worker", worker.start, worker.stop)
    assert journal.lines == ["start socket", "start worker"]
    lifecycle.stop()
    assert journal.lines[2:] == ["stop worker", "stop socket"]


class RecordingTransport:
    """A transport that checks, as it starts and stops, that the gateway serves."""

    def __init__(self, gateway: Gateway, journal: Journal) -> None:
        self.gateway, self.journal = gateway, journal

    def _serving(self) -> bool:
        reply = httpx.get(self.gateway.http_url + "/healthz", timeout=T)
        return reply.status_code == 200

    def start(self) -> RecordingTransport:
        self.journal.note(f"start transport (serving: {self._serving()})")
        return self

    def stop(self) -> None:
        self.journal.note(f"stop transport (serving: {self._serving()})")


def test_the_gateway_starts_its_transports_last_and_stops_them_first(tmp_path: Path) -> None:
    journal = Journal()
    gateway = Gateway(db=tmp_path / "gateway.db")
    gateway.add_transport(RecordingTransport(gateway, journal), "recording")
    gateway.start()
    try:
        assert journal.lines == ["start transport (serving: True)"]
        assert gateway.running
        assert gateway.parts == ["socket", "store", "loop", "bus", "hub", "http", "recording"]
    finally:
        gateway.stop()
    assert journal.lines[1:] == ["stop transport (serving: True)"]
    assert not gateway.running
    assert gateway.parts == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway.http_url + "/healthz", timeout=T)
    # The store was closed: another gateway can open the same file.
    with Gateway(db=tmp_path / "gateway.db") as again:
        assert again.running


def test_a_gateway_whose_port_is_taken_starts_nothing_and_can_start_later(
    tmp_path: Path,
) -> None:
    journal = Journal()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        gateway = Gateway(port=port, db=tmp_path / "gateway.db")
        gateway.add_transport(RecordingTransport(gateway, journal), "recording")
        with pytest.raises(OSError, match="in use"):
            gateway.start()
    assert journal.lines == []
    assert not gateway.running
    gateway.start()  # the port is free now
    try:
        assert journal.lines == ["start transport (serving: True)"]
    finally:
        gateway.stop()


def test_the_terminal_prompt_stops_with_the_gateway(tmp_path: Path) -> None:
    """What run_gateway.py --interactive does: the prompt is the gateway's to stop."""
    read_end, write_end = os.pipe()
    with open(read_end, encoding="utf-8") as stdin, open(write_end, "w") as keep_open:
        gateway = Gateway(db=tmp_path / "gateway.db")
        gateway.add_transport(TerminalPrompter(gateway, stdin=stdin, stdout=io.StringIO()))
        with gateway:
            assert "gateway-prompt" in {t.name for t in threading.enumerate()}
        deadline = time.monotonic() + T
        while "gateway-prompt" in {t.name for t in threading.enumerate()}:
            assert time.monotonic() < deadline, "the prompt outlived the gateway"
            time.sleep(0.05)
        keep_open.write("\n")  # lets the daemon stdin reader end too
