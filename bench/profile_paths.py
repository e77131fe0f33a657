"""Where the uplink and the gateway spend their time on each hot path (cProfile, all threads).

    python -m bench.profile_paths ingress [--n 3000] [--top 25] [--in-flight 64]
    python -m bench.profile_paths mcp
    python -m bench.profile_paths gateway

The process under test (``run_uplink.py`` or ``run_gateway.py``) is started
through ``serve``, which wraps every thread's ``run`` in a ``cProfile.Profile``
(on Python 3.11 a profile sees one thread only, and the uplink's event loop
runs in a helper thread), drives ``--n`` sequential requests through the path,
stops it with SIGTERM and prints the top frames by self time over all threads.
Profiling slows everything down about twice; read the shares, not the times.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.peers import run_loop
from bench.run import PY, REPO, BenchGateway, free_port, peer, wait_ready, ws_url

BODY = {"tool_name": "Bash", "tool_input": {"command": "ls"}}


def serve(out: str, script: str, args: list[str]) -> None:
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]

    def clear(_signum: int, _frame: Any) -> None:  # warm-up done: start counting
        for profile in profiles:
            profile.clear()

    signal.signal(signal.SIGUSR2, clear)
    main = cProfile.Profile()
    profiles.append(main)
    sys.argv = [script, *args]
    main.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for profile in profiles[1:]:
            # A thread still running, with nothing recorded yet, has nothing to add.
            with contextlib.suppress(TypeError, ValueError):
                stats.add(profile)
        stats.dump_stats(out)


def start(out: Path, script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "bench.profile_paths", "serve", str(out), script, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def counting(proc: subprocess.Popen[bytes]) -> None:
    """After the warm-up: forget start-up and warm-up, count from here."""
    proc.send_signal(signal.SIGUSR2)
    time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


async def post_many(url: str, n: int, in_flight: int = 1) -> None:
    import aiohttp

    from bench.paths import aiohttp_rate

    data = json.dumps(BODY).encode()
    connector = aiohttp.TCPConnector(limit=2 * in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        if in_flight > 1:  # the throughput figure's shape: bench.paths' own rate loop
            await aiohttp_rate(session, url, n, in_flight)
            return
        for _ in range(n):
            async with session.post(
                url, data=data, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()


def ingress(out: Path, n: int, in_flight: int = 1) -> None:
    with peer("gateway", "--auto", "approve") as gw_port:
        port = free_port()
        proc = start(
            out,
            "run_uplink.py",
            "--upstream-gateway",
            ws_url(gw_port),
            "--log-level",
            "WARNING",
            "--listen",
            f"127.0.0.1:{port}",
        )
        try:
            wait_ready(port)
            run_loop(post_many(f"http://127.0.0.1:{port}/permission", 300, in_flight))
            counting(proc)
            run_loop(post_many(f"http://127.0.0.1:{port}/permission", n, in_flight))
        finally:
            stop(proc)


def mcp(out: Path, n: int) -> None:
    with peer("jsonrpc") as rpc_port:
        gateway = BenchGateway()
        gateway.start()
        proc = start(
            out,
            "run_uplink.py",
            "--upstream-gateway",
            ws_url(gateway.port),
            "--log-level",
            "WARNING",
            "--local-mcp-url",
            f"http://127.0.0.1:{rpc_port}/mcp",
            "--listen",
            "off",
        )
        try:
            if not gateway.identified.wait(30):
                raise RuntimeError("the uplink did not connect")
            gateway.run(gateway.sequential(300))
            counting(proc)
            gateway.run(gateway.sequential(n, 1000))
        finally:
            stop(proc)
            gateway.stop()


def gateway(out: Path, n: int) -> None:
    from bench.gateway_fleet import OPERATOR_TOKEN, TOKEN, round_trips, wait_http

    with tempfile.TemporaryDirectory(prefix="i26-prof-") as tmp:
        port = free_port()
        import os

        os.environ["SLED_GATEWAY_OPERATOR_TOKEN"] = OPERATOR_TOKEN
        proc = start(
            out,
            "run_gateway.py",
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            TOKEN,
            "--db",
            f"{tmp}/gateway.db",
            "--log-level",
            "WARNING",
        )
        try:
            base = f"http://127.0.0.1:{port}"
            run_loop(wait_http(base))
            url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
            # Back to back, as bench.paths measures the round trip: pauses would add the
            # gateway's idle timers to the profile.
            run_loop(round_trips(base, url, 100, pause=None))
            counting(proc)
            run_loop(round_trips(base, url, n, pause=None))
        finally:
            stop(proc)


IDLE = ("acquire' of '_thread.lock", "poll' of 'select.epoll", "time.sleep", "select.select")


def summary(out: Path, top: int, n: int) -> str:
    """Top frames by self time, waits left out, as a share of the busy time and µs per request."""
    raw: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, calls, tottime, _ct, _callers) in raw.items():
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        if any(idle in where for idle in IDLE):
            continue
        rows.append((tottime, calls, where))
    busy = sum(r[0] for r in rows)
    rows.sort(reverse=True)
    text = io.StringIO()
    text.write(f"busy {busy:.2f} s ({busy / n * 1e6:.0f} µs a request, profiled)\n")
    text.write(f"{'self %':>7} {'µs/req':>7} {'calls/req':>9}  frame\n")
    for tottime, calls, where in rows[:top]:
        text.write(
            f"{100 * tottime / busy:>6.1f}% {tottime / n * 1e6:>7.1f} {calls / n:>9.1f}  {where}\n"
        )
    return text.getvalue()


def by_package(out: Path, n: int) -> str:
    """Self time summed by where it is spent: kernel socket calls, each library, our code."""
    raw: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    shares: dict[str, float] = {}
    for (filename, _line, name), (_cc, _calls, tottime, _ct, _callers) in raw.items():
        if any(idle in name for idle in IDLE):
            continue
        if filename == "~":
            if "socket" in name and ("send" in name or "recv" in name):
                key = "kernel: socket send/recv"
            elif "sqlite3" in name:
                key = "sqlite3 (C)"
            elif "_thread.lock" in name:
                key = "thread wake-ups (lock release)"
            else:
                key = "C builtins"
        elif "site-packages/" in filename:
            key = filename.split("site-packages/", 1)[1].split("/", 1)[0]
        elif "/lib/python3" in filename:
            key = "stdlib " + filename.split("/lib/python3", 1)[1].split("/")[1].removesuffix(".py")
        else:
            key = "ours: " + _short(filename).split("/", 1)[0]
        shares[key] = shares.get(key, 0.0) + tottime
    busy = sum(shares.values())
    lines = [f"{'self %':>7} {'µs/req':>7}  where"]
    for key, tottime in sorted(shares.items(), key=lambda kv: -kv[1])[:14]:
        lines.append(f"{100 * tottime / busy:>6.1f}% {tottime / n * 1e6:>7.0f}  {key}")
    return "\n".join(lines) + "\n"


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=["ingress", "mcp", "gateway"])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="keep the profile here")
    parser.add_argument(
        "--in-flight", type=int, default=1, help="ingress only: requests in flight at once"
    )
    args = parser.parse_args(argv)
    if args.in_flight < 1 or (args.in_flight > 1 and args.path != "ingress"):
        parser.error("--in-flight is at least 1, and only for ingress")
    out = args.out or Path(tempfile.mkdtemp(prefix="i26-prof-")) / f"{args.path}.prof"
    started = time.perf_counter()
    if args.path == "ingress":
        ingress(out, args.n, args.in_flight)
    else:
        {"mcp": mcp, "gateway": gateway}[args.path](out, args.n)
    print(f"{args.path}: {args.n} requests in {time.perf_counter() - started:.1f} s; {out}")
    print(summary(out, args.top, args.n))
    print(by_package(out, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
