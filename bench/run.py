"""The uplink's cost as a ratio of the raw limit, measured in one run on loopback.

    python -m bench.run            # full run (about 2 minutes; idle CPU over 60 s)
    python -m bench.run --quick    # shorter samples, for a smoke check

Every figure is measured beside a raw baseline in the same run: a raw
websockets client doing the same perm_request/perm_response exchange with the
same gateway process (on the same wire: no compression, as the uplink and the
Rust original), a raw HTTP round trip to a trivial server, and a direct POST
to the same trivial JSON-RPC server. Peers run in their own processes.

The library API has two faces and both are measured: ``adecide`` with the
uplink in the caller's asyncio loop, and the blocking ``decide`` from another
thread, which also gets its floor (raw websockets plus one thread round trip
into an event loop, measured here too).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from bench.peers import new_event_loop, run_loop

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ── helpers ─────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class Placement:
    """CPU sets (see :func:`pin`); None means wherever the scheduler likes."""

    measured: set[int] | None = None  # this process: raw clients and the in-process uplink
    peers: set[int] | None = None  # gateway, HTTP and JSON-RPC peers
    uplinks: set[int] | None = None  # uplink processes (ingress, MCP replay, idle)


PLACEMENT = Placement()


def pin() -> bool:
    """Put this process on one CPU and the peers on another.

    On a small, shared VM the scheduler's placement of two processes that
    ping-pong over loopback swings a median by a quarter from one run to the
    next; pinned, the raw clients and the in-process uplink (which share this
    process) are measured under the same placement. A separate uplink process
    is left free to use any CPU: pinned beside its own HTTP client it would
    be measured against a CPU the raw HTTP baseline does not share.
    """
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return False
    PLACEMENT.uplinks = set(available)
    PLACEMENT.measured, PLACEMENT.peers = {available[0]}, {available[1]}
    os.sched_setaffinity(0, PLACEMENT.measured)
    return True


def _place(proc: subprocess.Popen[str], cpus: set[int] | None) -> None:
    """Move a just-started child onto ``cpus`` (set from here, not in a
    ``preexec_fn``, which is unsafe while this process runs threads); it has
    started no threads of its own yet, so they all inherit the placement."""
    if cpus is not None:
        os.sched_setaffinity(proc.pid, cpus)


@contextlib.contextmanager
def peer(*args: str) -> Iterator[int]:
    """Start ``python -m bench.peers ARGS``; yield the port it prints."""
    proc = subprocess.Popen(
        [PY, "-m", "bench.peers", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    _place(proc, PLACEMENT.peers)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uplink_process(gateway_url: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            PY,
            str(REPO / "run_uplink.py"),
            "--upstream-gateway",
            gateway_url,
            "--log-level",
            "WARNING",
            "--project",
            "bench",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _place(proc, PLACEMENT.uplinks)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def wait_ready(port: int, timeout: float = 30) -> None:
    """Until the uplink is connected and its ingress is not loading the MCP SDK
    (a one-time cost that must not land in a sample: this checkout loads it on
    the first /mcp request, older ones at start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            base = f"http://127.0.0.1:{port}"
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                ingress = httpx.get(f"{base}/status", timeout=1).json().get("ingress", {})
                if ingress.get("mcp", "ready") != "loading":
                    return
        time.sleep(0.05)
    raise RuntimeError("the uplink did not become ready")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads so far, to the nanosecond (the scheduler's
    own count, ``/proc/PID/task/*/schedstat``): ``proc_cpu_seconds`` counts in clock
    ticks, 100 µs a round trip over 100 of them."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        # A thread that ended meanwhile is not counted (the gateway's are long-lived).
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/api/sled-uplink?token=bench"


def perm_request(i: int) -> str:
    return json.dumps(
        {
            "type": "perm_request",
            "req_id": f"r{i}",
            "payload": {"tool_name": "Bash", "tool_input": {"command": "ls"}},
        }
    )


# ── 1. permission round trip ────────────────────────────────────────────────


async def raw_ws_sequential(
    url: str, n: int, pause: tuple[float, float] | None = None
) -> list[float]:
    """``n`` permission round trips over one raw connection, each ``pause`` (a random
    number of seconds between its bounds) after the last, or right after it."""
    samples = []
    async with connect(url, ping_interval=None, compression=None) as ws:
        await ws.send(
            json.dumps({"type": "identity", "req_id": "identity", "payload": {"project": "raw"}})
        )
        for i in range(n):
            started = time.perf_counter()
            await ws.send(perm_request(i))
            while json.loads(await ws.recv())["type"] != "perm_response":
                pass
            samples.append(time.perf_counter() - started)
            if pause is not None:
                await asyncio.sleep(random.uniform(*pause))
    return samples


async def raw_ws_pipeline(url: str, total: int, in_flight: int) -> float:
    async with connect(url, ping_interval=None, compression=None) as ws:
        await ws.send(
            json.dumps({"type": "identity", "req_id": "identity", "payload": {"project": "raw"}})
        )
        slots = asyncio.Semaphore(in_flight)

        async def reader() -> None:
            for _ in range(total):
                await ws.recv()
                slots.release()

        started = time.perf_counter()
        read = asyncio.create_task(reader())
        for i in range(total):
            await slots.acquire()
            await ws.send(perm_request(i))
        await read
        return total / (time.perf_counter() - started)


def library_sequential(uplink: Any, n: int) -> list[float]:
    """The blocking face: ``decide`` from this (non-loop) thread."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        outcome = uplink.decide("Bash", {"command": "ls"}, timeout=10)
        samples.append(time.perf_counter() - started)
        assert outcome.decision.allows, outcome
    return samples


def library_pipeline(uplink: Any, total: int, in_flight: int) -> float:
    """Keep ``in_flight`` requests outstanding through the blocking face."""
    completed: queue.SimpleQueue[None] = queue.SimpleQueue()

    def finished(_: concurrent.futures.Future[Any]) -> None:
        completed.put(None)

    started = time.perf_counter()
    for i in range(total):
        if i >= in_flight:
            completed.get(timeout=30)  # one finished: start the next
        uplink.request_permission("Bash", {"command": "ls"}).add_done_callback(finished)
    for _ in range(min(total, in_flight)):
        completed.get(timeout=30)
    return total / (time.perf_counter() - started)


async def async_library(url: str, n: int, pipeline_total: int, in_flight: int) -> Any:
    """The asyncio face: the uplink runs in this loop (``async with Uplink``),
    as an asyncio application embeds it. Returns (sequential samples, rate)."""
    from actors import Uplink, UplinkConfig

    async with Uplink(UplinkConfig(upstream_url=url, project="bench")) as uplink:
        if not await uplink.await_connected(10):
            raise RuntimeError("the asyncio uplink did not connect")
        for _ in range(100):  # warm-up
            await uplink.adecide("Bash", {"command": "ls"}, timeout=10)
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            outcome = await uplink.adecide("Bash", {"command": "ls"}, timeout=10)
            samples.append(time.perf_counter() - started)
            assert outcome.decision.allows, outcome
        rate = 0.0
        if pipeline_total:
            # The same shape as raw_ws_pipeline: one sender gated by a semaphore.
            slots = asyncio.Semaphore(in_flight)

            def finished(_: asyncio.Future[Any]) -> None:
                slots.release()

            started = time.perf_counter()
            for _ in range(pipeline_total):
                await slots.acquire()
                uplink.arequest_permission("Bash", {"command": "ls"}).add_done_callback(finished)
            for _ in range(in_flight):
                await slots.acquire()
            rate = pipeline_total / (time.perf_counter() - started)
        return samples, rate


def thread_round_trip(n: int) -> list[float]:
    """The floor under any blocking call into an event loop in another thread:
    hand a callback to the loop and wait for it (two thread wake-ups)."""
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    samples = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            loop.call_soon_threadsafe(done.set_result, None)
            done.result(5)
            samples.append(time.perf_counter() - started)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    return samples


def http_sequential(url: str, body: dict[str, Any], n: int) -> list[float]:
    samples = []
    with httpx.Client(timeout=10) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = client.post(url, json=body)
            samples.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return samples


# ── 3. MCP replay: this process plays the gateway ───────────────────────────


class BenchGateway:
    """A gateway in this process that sends mcp_requests and times the answers."""

    def __init__(self) -> None:
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.identified = threading.Event()
        self.identity_at: float | None = None
        self.ws: Any = None
        self.waiters: dict[str, asyncio.Future[Any]] = {}
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, ready), daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        assert self._thread is not None
        self._thread.join(5)

    def _run(self, port: int, ready: threading.Event) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(
                self._handler, "127.0.0.1", port, ping_interval=None, max_size=None
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self._stop.wait()
                if self.ws is not None:
                    self.ws.transport.abort()

        run_loop(main())

    async def _handler(self, ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):  # we abort it on stop
            await self._serve(ws)

    async def _serve(self, ws: Any) -> None:
        async for message in ws:
            frame = json.loads(message)
            if frame["type"] == "identity":
                self.ws = ws
                self.identity_at = time.perf_counter()
                self.identified.set()
            elif frame["type"] == "mcp_response":
                waiter = self.waiters.pop(frame["req_id"], None)
                if waiter is not None:
                    waiter.set_result(frame["payload"])

    async def replay(self, i: int) -> Any:
        assert self.loop is not None
        waiter = self.loop.create_future()
        self.waiters[f"m{i}"] = waiter
        body = json.dumps(
            {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "echo"}}
        )
        await self.ws.send(
            json.dumps({"type": "mcp_request", "req_id": f"m{i}", "payload": {"body": body}})
        )
        return await waiter

    def run(self, coro: Any, timeout: float = 300) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def sequential(self, n: int, start: int = 0) -> list[float]:
        samples = []
        for i in range(start, start + n):
            started = time.perf_counter()
            answer = await self.replay(i)
            samples.append(time.perf_counter() - started)
            assert answer["id"] == i, answer
        return samples

    async def pipeline(self, total: int, in_flight: int) -> float:
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                await self.replay(i)

        started = time.perf_counter()
        await asyncio.gather(*(one(100_000 + i) for i in range(total)))
        return total / (time.perf_counter() - started)


# ── the run ─────────────────────────────────────────────────────────────────


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def add(
        self, figure: str, uplink: str, baseline: str, ratio: str, target: str, ok: bool | None
    ) -> None:
        verdict = "" if ok is None else ("ok" if ok else "MISS")
        self.rows.append((figure, uplink, baseline, ratio, target, verdict))
        print(
            f"  {figure}: {uplink} (baseline {baseline}) {ratio} target {target} {verdict}",
            flush=True,
        )

    def render(self) -> str:
        head = ("figure", "uplink", "baseline", "ratio", "target", "")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(6)]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        lines += [
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in self.rows
        ]
        return "\n".join(lines)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short samples (smoke check)")
    parser.add_argument("--n", type=int, default=None, help="sequential samples per figure")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place processes (default: measured side on CPU 0, peers on 1)",
    )
    args = parser.parse_args(argv)
    pinned = not args.no_pin and pin()
    n = args.n or (300 if args.quick else 2000)
    pipeline_total = 2000 if args.quick else 10_000
    idle_seconds = 10 if args.quick else 60
    waiting = 10_000

    from actors import Uplink, UplinkConfig
    from actors.logsetup import configure_logging

    configure_logging("WARNING")
    table = Table()
    misses = 0
    placement = (
        f"this process on CPU {min(PLACEMENT.measured or {0})}, "
        f"peers on CPU {min(PLACEMENT.peers or {0})}, uplink processes on any"
        if pinned
        else "unpinned"
    )
    print(
        f"sled-uplink bench: {n} sequential samples, {pipeline_total} pipelined, on loopback, "
        + placement,
        flush=True,
    )

    rounds = 5  # raw and uplink alternate, so drift on the machine hits both alike
    chunk = max(1, n // rounds)
    with peer("gateway", "--auto", "approve") as gw_port, peer("http") as http_port:
        url = ws_url(gw_port)
        http_url = f"http://127.0.0.1:{http_port}/"
        body = {"tool_name": "Bash", "tool_input": {"command": "ls"}}
        ingress_port = free_port()
        raw_seq: list[float] = []
        async_seq: list[float] = []
        lib_seq: list[float] = []
        hop: list[float] = []
        raw_http: list[float] = []
        ingress: list[float] = []
        raw_pipes: list[float] = []
        async_pipes: list[float] = []
        lib_pipes: list[float] = []
        with (
            Uplink(UplinkConfig(upstream_url=url, project="bench")) as uplink,
            uplink_process(url, "--listen", f"127.0.0.1:{ingress_port}"),
        ):
            uplink.wait_connected(10)
            wait_ready(ingress_port)
            ingress_url = f"http://127.0.0.1:{ingress_port}/permission"
            library_sequential(uplink, 200)  # warm-up
            http_sequential(ingress_url, body, 200)
            for _ in range(rounds):
                raw_seq += run_loop(raw_ws_sequential(url, chunk))
                async_seq += run_loop(async_library(url, chunk, 0, 0))[0]
                lib_seq += library_sequential(uplink, chunk)
                hop += thread_round_trip(chunk)
                raw_http += http_sequential(http_url, body, chunk)
                ingress += http_sequential(ingress_url, body, chunk)
            for _ in range(3):
                raw_pipes.append(run_loop(raw_ws_pipeline(url, pipeline_total, 64)))
                async_pipes.append(run_loop(async_library(url, 0, pipeline_total, 64))[1])
                lib_pipes.append(library_pipeline(uplink, pipeline_total, 64))
        raw_pipe = statistics.median(raw_pipes)
        async_pipe, lib_pipe = statistics.median(async_pipes), statistics.median(lib_pipes)
        raw_p50 = statistics.median(raw_seq)

        # 1a. library API, in this process: the asyncio face, then the blocking one
        floor = raw_p50 + statistics.median(hop)
        for face, samples in (("asyncio: adecide", async_seq), ("blocking: decide", lib_seq)):
            ratio = statistics.median(samples) / raw_p50
            ok = ratio <= 1.5
            misses += not ok
            blocking = face.startswith("blocking")
            table.add(
                f"permission p50, library API ({face})",
                us(statistics.median(samples)),
                us(raw_p50),
                f"{ratio:.2f}×" + (f" (floor {floor / raw_p50:.2f}×)" if blocking else ""),
                "≤ 1.5× raw websockets",
                ok,
            )
            if blocking:
                table.add(
                    "  floor for a blocking call: raw ws + one thread round trip",
                    us(floor),
                    f"{us(raw_p50)} + {us(statistics.median(hop))}",
                    f"{floor / raw_p50:.2f}×",
                    "(reported)",
                    None,
                )
            table.add(
                f"permission p99, library API ({face.split(':')[0]})",
                us(pct(samples, 0.99)),
                us(pct(raw_seq, 0.99)),
                f"{pct(samples, 0.99) / pct(raw_seq, 0.99):.2f}×",
                "(reported)",
                None,
            )
        for face, rate in (("asyncio", async_pipe), ("blocking", lib_pipe)):
            ratio = rate / raw_pipe
            ok = ratio >= 0.5
            misses += not ok
            table.add(
                f"decisions/s, 64 in flight ({face})",
                f"{rate:.0f}/s",
                f"{raw_pipe:.0f}/s",
                f"{ratio:.2f}×",
                "≥ 0.5× raw pipeline",
                ok,
            )

        # 1b. HTTP ingress, against a run_uplink.py process
        base = statistics.median(raw_http) + raw_p50
        ratio = statistics.median(ingress) / base
        ok = ratio <= 1.3
        misses += not ok
        table.add(
            "permission p50, HTTP ingress",
            us(statistics.median(ingress)),
            f"{us(statistics.median(raw_http))} HTTP + {us(statistics.median(raw_seq))} ws",
            f"{ratio:.2f}×",
            "≤ 1.3× (raw HTTP + raw ws)",
            ok,
        )
        table.add(
            "permission p99, HTTP ingress",
            us(pct(ingress, 0.99)),
            us(pct(raw_http, 0.99) + pct(raw_seq, 0.99)),
            "",
            "(reported)",
            None,
        )

    # 2. MCP replay
    with peer("jsonrpc") as rpc_port:
        rpc_url = f"http://127.0.0.1:{rpc_port}/mcp"
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
        direct: list[float] = []
        replay: list[float] = []
        gateway = BenchGateway()
        gateway.start()
        with uplink_process(ws_url(gateway.port), "--local-mcp-url", rpc_url, "--listen", "off"):
            if not gateway.identified.wait(15):
                raise RuntimeError("uplink did not connect to the bench gateway")
            gateway.run(gateway.sequential(200))
            for r in range(rounds):
                direct += http_sequential(rpc_url, body, chunk)
                replay += gateway.run(gateway.sequential(chunk, start=r * chunk))
            replay_tput = gateway.run(gateway.pipeline(pipeline_total // 2, 16))
        gateway.stop()
        bound = statistics.median(direct) + statistics.median(raw_seq) + 0.0005
        ok = statistics.median(replay) <= bound
        misses += not ok
        table.add(
            "MCP replay p50",
            us(statistics.median(replay)),
            f"{us(statistics.median(direct))} POST + {us(statistics.median(raw_seq))} ws + 500 µs",
            f"{statistics.median(replay) / bound:.2f}× bound",
            "≤ POST + ws + 0.5 ms",
            ok,
        )
        table.add(
            "MCP replay p99", us(pct(replay, 0.99)), us(pct(direct, 0.99)), "", "(reported)", None
        )
        table.add("MCP replays/s, 16 in flight", f"{replay_tput:.0f}/s", "", "", "(reported)", None)

    # 3. idle cost, 4. reconnect
    gateway = BenchGateway()
    gateway.start()
    with uplink_process(
        ws_url(gateway.port), "--listen", "off", "--backoff-initial", "0.1"
    ) as proc:
        if not gateway.identified.wait(15):
            raise RuntimeError("uplink did not connect")
        time.sleep(2)
        cpu_before = proc_cpu_seconds(proc.pid)
        time.sleep(idle_seconds)
        cpu = (proc_cpu_seconds(proc.pid) - cpu_before) / idle_seconds * 100
        rss_mib = proc_status(proc.pid, "VmRSS:") / 1024
        threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        ok = cpu < 0.2
        misses += not ok
        table.add(
            f"idle CPU over {idle_seconds} s", f"{cpu:.3f} % of a core", "", "", "< 0.2 %", ok
        )
        ok = rss_mib < 80
        misses += not ok
        table.add("idle RSS", f"{rss_mib:.1f} MiB ({threads} threads)", "", "", "< 80 MB", ok)

        reconnects = []
        port = gateway.port
        for _ in range(3 if args.quick else 5):
            gateway.stop()  # the uplink's session ends; it waits its first back-off (0.1 s)
            gateway = BenchGateway()
            gateway.start(port)
            listening_at = time.perf_counter()
            if not gateway.identified.wait(10) or gateway.identity_at is None:
                raise RuntimeError("uplink did not reconnect")
            reconnects.append(gateway.identity_at - listening_at)
        gateway.stop()
        table.add(
            "reconnect: listening → identity",
            f"{statistics.median(reconnects) * 1000:.0f} ms median",
            "",
            "",
            "(reported; back-off 0.1 s)",
            None,
        )

    # 5. many waiting
    with peer("gateway", "--auto", "silent") as silent_port:
        result = subprocess.run(
            [PY, "-m", "bench.waiting", ws_url(silent_port), str(waiting)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rss_mib = figures["rss_kib"] / 1024
        ok = rss_mib < 200
        misses += not ok
        table.add(
            f"RSS with {waiting:,} waiting",
            f"{rss_mib:.1f} MiB ({figures['threads']} threads)",
            f"{figures['idle_rss_kib'] / 1024:.1f} MiB idle",
            "",
            "< 200 MB",
            ok,
        )

    print("\n" + table.render())
    hit = sum(1 for r in table.rows if r[5] == "ok")
    print(
        f"\nsummary: {hit} of {hit + misses} targets met"
        + ("" if not misses else f"; {misses} missed"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
