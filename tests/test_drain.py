"""``/readyz`` and the drain on SIGTERM (docs/protocol.md, docs/gateway.md "Readiness and drain").

The gateway is real (in-process for ``/readyz``, ``run_gateway.py`` as a
process for the drain); the sleds are raw websocket clients that speak the
protocol's frames, so each close code and time is seen as a sled sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from actors import Uplink
from protocol import Decision, Envelope, Kind, Reason, identity, serialize
from sled_gateway import Gateway
from sled_gateway.store import make_store
from tests.conftest import closed_port, eventually, scaled
from tests.support.proc import WatchedProcess

ROOT = Path(__file__).resolve().parent.parent
OPERATOR = "op-" + "x" * 40


def _readyz(base: str) -> httpx.Response:
    return httpx.get(base + "/readyz", timeout=10)  # no credential: a load balancer's poll


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        gw = Gateway(**kwargs)
        made.append(gw.start())
        return gw

    yield make
    for gw in made:
        gw.stop()


def _ready_status(base: str) -> tuple[int, dict[str, Any]]:
    r = _readyz(base)
    return r.status_code, r.json()


def test_readyz_is_200_without_a_credential(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(token="s")
    code, body = _ready_status(gw.http_url)
    assert code == 200
    assert body["ready"] is True
    # /healthz and /readyz are the only HTTP routes open without the operator token.
    assert httpx.get(gw.http_url + "/api/state").status_code == 401


def test_readyz_503_within_5s_when_the_database_folder_is_removed(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    gw = make_gateway(token="s", db=str(folder / "gw.db"))
    assert _ready_status(gw.http_url)[0] == 200
    shutil.rmtree(folder)  # the open file still takes commits, into nothing
    gone = time.monotonic()
    status = eventually(
        lambda: (s := _ready_status(gw.http_url))[0] == 503 and s, 5.0, "readyz 503"
    )
    assert time.monotonic() - gone < 5.0
    assert status[1]["reason"] == "database"
    assert status[1]["ready"] is False and "removed" in status[1]["error"]
    assert isinstance(status[1]["error"], str)


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """The folder refuses new files: by its mode, or for root (whom modes do not stop) immutable."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
        pytest.skip("root, and this file system cannot make a folder immutable (chattr +i)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_readyz_503_when_the_folder_is_read_only_then_200_again(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    gw = make_gateway(token="s", db=str(folder / "gw.db"))
    assert _ready_status(gw.http_url)[0] == 200
    with _read_only(folder):
        status = eventually(lambda: (s := _ready_status(gw.http_url))[0] == 503 and s, 5.0)
        assert status[1]["reason"] == "database"
    eventually(lambda: _ready_status(gw.http_url)[0] == 200, 5.0, "readyz 200 again")


def test_readyz_503_while_the_writer_cannot_commit_then_200_again(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Another process holds SQLite's write lock: every commit would wait, then fail."""
    db = tmp_path / "gw.db"
    gw = make_gateway(token="s", db=str(db))
    assert _ready_status(gw.http_url)[0] == 200
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        stuck = time.monotonic()
        status = eventually(lambda: (s := _ready_status(gw.http_url))[0] == 503 and s, 5.0)
        assert time.monotonic() - stuck < 5.0
        assert status[1]["reason"] == "database"
        # Polling hard while it is stuck queues no pile of probes behind the lock.
        for _ in range(20):
            assert _readyz(gw.http_url).status_code == 503
        queued = gw.store._queue.qsize()  # type: ignore[attr-defined]
        assert queued <= 3, queued
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    eventually(lambda: _ready_status(gw.http_url)[0] == 200, 8.0, "readyz 200 again")


# -- the drain, with run_gateway.py as a process -------------------------------------------


class _Sled:
    """One raw websocket sled: identity, maybe a pending request, then waits for the close."""

    def __init__(self, url: str, project: str, request: bool) -> None:
        self.url, self.project, self.request = url, project, request
        self.closed_at: float | None = None
        self.code: int | None = None
        self.reason: str | None = None

    async def run(self, ready: asyncio.Event, counter: list[int], n: int) -> None:
        async with connect(self.url) as ws:
            await ws.send(serialize(identity(self.project)))
            if self.request:
                await ws.send(
                    serialize(
                        Envelope(
                            Kind.PERM_REQUEST,
                            f"req-{self.project}",
                            {"tool_name": "Bash", "tool_input": {"command": "ls"}},
                        )
                    )
                )
            counter[0] += 1
            if counter[0] == n:
                ready.set()
            try:
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass
            self.closed_at = time.monotonic()
            assert ws.close_code is not None
            self.code, self.reason = ws.close_code, ws.close_reason


def _run_sleds(sleds: list[_Sled], connected: threading.Event) -> threading.Thread:
    async def main() -> None:
        ready = asyncio.Event()
        counter = [0]
        tasks = [asyncio.ensure_future(s.run(ready, counter, len(sleds))) for s in sleds]
        await ready.wait()
        connected.set()
        await asyncio.gather(*tasks)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return thread


async def _one_refused(url: str) -> tuple[int | None, str | None]:
    async with connect(url) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., tuple[WatchedProcess, int]]]:
    procs: list[WatchedProcess] = []

    def start(*extra: str) -> tuple[WatchedProcess, int]:
        port = closed_port()
        argv = [
            sys.executable,
            "run_gateway.py",
            "--no-auth",
            "--listen",
            f"127.0.0.1:{port}",
            "--operator-token",
            OPERATOR,
            "--db",
            str(tmp_path / "gw.db"),
            *extra,
        ]
        proc = WatchedProcess(argv, cwd=ROOT, env=None, timeout=scaled(10))
        procs.append(proc)
        proc.wait_for("gateway listening")
        return proc, port

    yield start
    for proc in procs:
        proc.kill()


def test_sigterm_drains_sleds_spread_over_the_window_with_1012_and_retry_after(
    gateway_process: Callable[..., tuple[WatchedProcess, int]], tmp_path: Path
) -> None:
    window = 4.0
    proc, port = gateway_process("--drain-seconds", str(window))
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/api/sled-uplink"
    sleds = [_Sled(url, f"p{i}", request=i % 2 == 0) for i in range(8)]
    connected = threading.Event()
    thread = _run_sleds(sleds, connected)
    assert connected.wait(scaled(10))
    auth = {"Authorization": f"Bearer {OPERATOR}"}

    def all_in() -> bool:
        state = httpx.get(base + "/api/state", headers=auth, timeout=5).json()
        return len(state["pending"]) == 4 and len(state["sleds"]) == 8

    eventually(all_in, 10, "8 sleds and 4 pending requests")
    assert _readyz(base).status_code == 200

    proc.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # /readyz turns 503 at once, before the first close.
    status = eventually(lambda: (r := _readyz(base)).status_code == 503 and r, 1.0)
    assert status.json()["reason"] == "draining"
    assert time.monotonic() - sent < 1.0
    # A new sled is told to come back later.
    code, reason = asyncio.run(_one_refused(url))
    assert code == 1013
    assert reason == "retry_after=5"

    thread.join(scaled(window + 10))
    assert not thread.is_alive()
    assert proc.proc.wait(scaled(15)) == 0
    assert [(s.code, s.reason) for s in sleds] == [(1012, "retry_after=5")] * len(sleds)
    offsets = sorted(s.closed_at - sent for s in sleds if s.closed_at is not None)
    assert len(offsets) == len(sleds)
    # Spread over the window, not bunched at its start: i * window / n, within slack.
    assert sum(o < 0.1 * window for o in offsets) <= 2, offsets
    assert offsets[-1] > 0.6 * window, offsets
    assert offsets[-1] < window + 2, offsets
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert min(gaps) > 0.2 * window / len(sleds), offsets

    # Every request pending on a drained session is withdrawn in the audit.
    store = make_store(str(tmp_path / "gw.db")).open()
    try:

        async def rows() -> list[Any]:
            return await store.audit(limit=100)

        audit = asyncio.run(rows())
    finally:
        store.close()
    withdrawn = {(r.project, r.req_id) for r in audit if r.decision == "withdrawn"}
    assert withdrawn == {(f"p{i}", f"req-p{i}") for i in range(0, 8, 2)}
    assert not [r for r in audit if r.decision in ("approve", "always_allow")]


def test_drain_seconds_0_closes_every_sled_at_once(
    gateway_process: Callable[..., tuple[WatchedProcess, int]],
) -> None:
    proc, port = gateway_process("--drain-seconds", "0")
    url = f"ws://127.0.0.1:{port}/api/sled-uplink"
    sleds = [_Sled(url, f"q{i}", request=False) for i in range(4)]
    connected = threading.Event()
    thread = _run_sleds(sleds, connected)
    assert connected.wait(scaled(10))
    time.sleep(0.3)  # the identities are in
    proc.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    thread.join(scaled(10))
    assert proc.proc.wait(scaled(10)) == 0
    assert {(s.code, s.reason) for s in sleds} == {(1012, "retry_after=5")}
    assert max(s.closed_at - sent for s in sleds if s.closed_at) < 1.5


@pytest.mark.parametrize("value", ["-1", "abc", "nan"])
def test_a_bad_drain_seconds_is_one_line_and_exit_2(value: str) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "run_gateway.py", "--no-auth", "--drain-seconds", value],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--drain-seconds" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_an_uplink_moves_to_the_other_replica_when_its_gateway_drains(
    make_reference_gateway: Callable[..., Gateway], make_uplink: Callable[..., Uplink]
) -> None:
    """Both halves together: the real gateway drains, the real uplink follows the hint."""
    one, two = make_reference_gateway(), make_reference_gateway()
    uplink = make_uplink(f"{one.url_for_sleds()},{two.url_for_sleds()}", project="mover")
    assert uplink.wait_connected(scaled(5))

    def on(gw: Gateway) -> bool:
        return any(
            s["project"] == "mover" and s["state"] == "connected" for s in gw.state()["sleds"]
        )

    first = eventually(lambda: one if on(one) else two if on(two) else None, 5, "connected")
    other = two if first is one else one
    pending = uplink.request_permission("Bash", {"command": "make deploy"})
    first.wait_for(lambda s: len(s["pending"]) == 1, scaled(5))
    drained_at = time.monotonic()
    first.drain(0).result(scaled(10))
    outcome = pending.result(timeout=scaled(5))
    assert (outcome.decision, outcome.reason) == (Decision.DENY, Reason.SESSION_ENDED)
    assert [r["decision"] for r in first.audit()] == ["withdrawn"]
    eventually(lambda: on(other), 10, "the sled on the other replica")
    assert time.monotonic() - drained_at <= 5 + 1.0  # retry_after=5, fully jittered
    assert other.state()["pending"] == []  # the denied request was not sent again
    assert _readyz(first.http_url).json()["reason"] == "draining"
    assert _readyz(other.http_url).status_code == 200
    decided = uplink.request_permission("Bash", {"command": "ls"})
    other.wait_for(lambda s: len(s["pending"]) == 1, scaled(5))
    req_id = other.state()["pending"][0]["req_id"]
    other.decide("mover", req_id, "approve", by="test")
    assert decided.result(timeout=scaled(5)).decision is Decision.APPROVE
