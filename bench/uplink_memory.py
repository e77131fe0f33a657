"""The uplink's idle memory beside a bare WebSocket client's, measured in one run.

    python -m bench.uplink_memory              # 3 alternating rounds, 5 s settle each
    python -m bench.uplink_memory --rounds 5 --settle 10
    python -m bench.uplink_memory --imports    # also: what each import of the start costs
    git archive OLD-COMMIT | tar -x -C /tmp/old
    python -m bench.uplink_memory --other /tmp/old   # and another checkout's uplink, alternating

Starts a real gateway (``run_gateway.py --no-auth --db :memory:``) on a free
port, then, alternating in rounds:

- the uplink as ``run_uplink.py`` starts it, with its ingress on (and so the
  Claude Code endpoint: ``/mcp`` and ``/hooks/claude-code``), connected to that
  gateway; it is measured once its ``/healthz`` says connected and it has
  settled, then again after one MCP ``initialize`` on ``/mcp`` (what Claude
  Code sends first when it starts with this uplink in its ``--mcp-config``);
- the raw baseline: ``python -c`` importing only ``asyncio``, ``json`` and
  ``websockets``, holding one connection to the same gateway with the same
  identity frame, measured after the same settle time.

Each process is read from ``/proc/PID/status`` (VmRSS) and
``/proc/PID/smaps_rollup`` (Pss: shared pages divided among the processes
that map them, so shared libraries are not counted whole twice). Printed:
each round, the medians, and the uplink's ratio to the baseline.

``--imports`` runs, in a fresh interpreter, the imports of the uplink's start
one after another (each with what it pulls in that was not loaded yet) and
prints what each added to VmRSS and how long it took, then the same for the
parts that load only on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

#: The raw baseline: one WebSocket connection, identified, held open. argv: URL, identity frame.
RAW_CLIENT = """
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], compression=None) as ws:
        await ws.send(sys.argv[2])
        print("connected", flush=True)
        async for _ in ws:
            pass
asyncio.run(main())
"""

#: The imports of ``run_uplink.py``'s start with the ingress on, in the order
#: they happen (a later line counts only what the earlier ones did not load).
START_IMPORTS = (
    "asyncio",
    "ssl",
    "websockets.client",
    "loguru",
    "pykka",
    "anyio.from_thread",
    "protocol",
    "actors.cli",
    "actors.config",
    "actors.context",
    "actors.base",
    "actors.permissions",
    "actors.connection",
    "actors.supervisor",
    "actors.mcp_proxy",
    "actors.system",
    "uvloop",  # the loop the uplink's thread starts (actors.loop.new_event_loop)
    "uvicorn",
    "actors.http_guard",
    "actors.ingress",
    "actors.claude_code",
)
#: What loads only on first use: the MCP replay's HTTP client, ``/metrics``,
#: and the MCP SDK behind ``/mcp`` (its types, then its server).
FIRST_USE_IMPORTS = (
    "httpx",
    "aiohttp",
    "httpx_aiohttp",
    "prometheus_client",
    "mcp_types",
    "mcp.server.lowlevel",
    "mcp.server.streamable_http_manager",
)

IMPORT_PROBE = """
import sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
before = rss()
print("interpreter", before, 0.0, len(sys.modules), flush=True)
for name in sys.argv[1:]:
    t = time.perf_counter()
    __import__(name)
    ms = (time.perf_counter() - t) * 1000
    now = rss()
    print(name, now - before, round(ms, 1), len(sys.modules), flush=True)
    before = now
"""


# ── reading a process ──────────────────────────────────────────────────────


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):  # kernels before 4.14 have no smaps_rollup
        return None


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


# ── processes ──────────────────────────────────────────────────────────────


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gateway() -> Iterator[int]:
    """A real gateway (auto-approve, no sled auth, nothing on disk); yields its port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_GATEWAY_")}
    proc = subprocess.Popen(
        [
            PY,
            str(REPO / "run_gateway.py"),
            "--listen",
            "127.0.0.1:0",
            "--no-auth",
            "--db",
            ":memory:",
            "--auto",
            "approve",
            "--log-level",
            "INFO",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            found = re.search(r"gateway listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        else:
            raise RuntimeError(f"the gateway did not start (exit {proc.wait()})")
        # Its later log lines must not fill the pipe and stall it.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def uplink(
    sled_url: str, *extra: str, checkout: Path = REPO
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``run_uplink.py`` of ``checkout`` with its ingress on a free port; yields the
    process and the port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            PY,
            "run_uplink.py",
            "--upstream-gateway",
            sled_url,
            "--project",
            "bench-memory",
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "WARNING",
            *extra,
        ],
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _connected(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the uplink did not connect to the gateway")
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(10)


def _connected(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return bool(json.load(answer).get("connected"))
    except (OSError, ValueError):
        return False


def mcp_initialize(port: int) -> None:
    """One MCP ``initialize`` on ``/mcp``, as Claude Code sends it first; waits for the answer."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        text = answer.read().decode()
    if '"serverInfo"' not in text:
        raise RuntimeError(f"/mcp did not answer initialize: {text[:200]!r}")


@contextlib.contextmanager
def raw_client(sled_url: str) -> Iterator[subprocess.Popen[str]]:
    """The baseline: a bare websockets client holding one identified connection."""
    from protocol import identity, serialize

    frame = serialize(identity("bench-memory-raw"))
    proc = subprocess.Popen(
        [PY, "-c", RAW_CLIENT, sled_url, frame],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "connected":
            raise RuntimeError("the raw client did not connect")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


# ── the run ────────────────────────────────────────────────────────────────


def measure_round(sled_url: str, settle: float, other: Path | None) -> dict[str, Any]:
    figures: dict[str, Any] = {"other_rss": None, "other_pss": None}
    if other is not None:
        with uplink(sled_url, checkout=other) as (proc, _port):
            time.sleep(settle)
            figures["other_rss"], figures["other_pss"] = rss_kib(proc.pid), pss_kib(proc.pid)
    with raw_client(sled_url) as raw:
        time.sleep(settle)
        figures["raw_rss"], figures["raw_pss"] = rss_kib(raw.pid), pss_kib(raw.pid)
    with uplink(sled_url) as (proc, port):
        time.sleep(settle)
        figures["rss"], figures["pss"] = rss_kib(proc.pid), pss_kib(proc.pid)
        figures["threads"] = threads(proc.pid)
        started = time.perf_counter()
        mcp_initialize(port)
        figures["first_mcp_ms"] = (time.perf_counter() - started) * 1000
        time.sleep(settle / 2)
        figures["mcp_rss"], figures["mcp_pss"] = rss_kib(proc.pid), pss_kib(proc.pid)
    return figures


def import_costs(names: tuple[str, ...], preloaded: tuple[str, ...] = ()) -> list[list[str]]:
    """Each import's VmRSS growth and time, in a fresh interpreter, after ``preloaded``."""
    done = subprocess.run(
        [PY, "-c", IMPORT_PROBE, *preloaded, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines()]
    return [rows[0], *rows[-len(names) :]]


def print_imports() -> None:
    print("\nimports of the start (fresh interpreter, in order; each adds what was not loaded):")
    print(f"  {'module':40} {'+VmRSS':>10} {'ms':>7} {'modules':>8}")
    for name, kib, ms, count in import_costs(START_IMPORTS):
        print(f"  {name:40} {int(kib) / 1024:7.1f} MiB {float(ms):7.1f} {count:>8}")
    print("loaded on first use (after the start's imports):")
    for name, kib, ms, count in import_costs(FIRST_USE_IMPORTS, START_IMPORTS)[1:]:
        print(f"  {name:40} {int(kib) / 1024:7.1f} MiB {float(ms):7.1f} {count:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after connecting")
    parser.add_argument("--imports", action="store_true", help="also print each import's cost")
    parser.add_argument("--other", type=Path, help="another checkout's uplink, measured too")
    args = parser.parse_args()

    rounds: list[dict[str, Any]] = []
    with gateway() as port:
        sled_url = f"ws://127.0.0.1:{port}/api/sled-uplink"
        for number in range(1, args.rounds + 1):
            figures = measure_round(sled_url, args.settle, args.other)
            rounds.append(figures)
            print(
                f"round {number}: uplink {mib(figures['rss'])} RSS / {mib(figures['pss'])} PSS"
                f" ({figures['threads']} threads); after the first /mcp call "
                f"{mib(figures['mcp_rss'])} RSS ({figures['first_mcp_ms']:.0f} ms); "
                f"raw client {mib(figures['raw_rss'])} RSS / {mib(figures['raw_pss'])} PSS"
                + (
                    f"; other checkout {mib(figures['other_rss'])} RSS"
                    if args.other is not None
                    else ""
                ),
                flush=True,
            )

    def med(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(values) if values else None

    rss, raw_rss = med("rss"), med("raw_rss")
    pss, raw_pss = med("pss"), med("raw_pss")
    assert rss is not None and raw_rss is not None
    print(f"\nmedian of {len(rounds)} rounds, {args.settle:g} s after connecting:")
    print(f"  uplink, ingress and Claude Code endpoint on: {mib(rss)} RSS, {mib(pss)} PSS")
    print(f"  raw websockets client, one connection:       {mib(raw_rss)} RSS, {mib(raw_pss)} PSS")
    print(f"  ratio: {rss / raw_rss:.2f}× RSS", end="")
    print(f", {pss / raw_pss:.2f}× PSS" if pss and raw_pss else "")
    print(f"  uplink above the raw client: {mib(rss - raw_rss)} RSS")
    print(
        f"  after the first /mcp call (the MCP SDK loaded): {mib(med('mcp_rss'))} RSS, "
        f"{mib(med('mcp_pss'))} PSS; that call took {med('first_mcp_ms'):.0f} ms"
    )
    other_rss = med("other_rss")
    if other_rss is not None:
        print(
            f"  the other checkout ({args.other}): {mib(other_rss)} RSS, "
            f"{mib(med('other_pss'))} PSS, {other_rss / raw_rss:.2f}× the raw client's RSS"
        )
    target = 40 * 1024
    print(f"  target idle RSS ≤ 40 MiB: {'met' if rss <= target else 'MISSED'}")
    if args.imports:
        print_imports()
    return 0


if __name__ == "__main__":
    sys.exit(main())
