"""Where the gateway's decision round trip spends its time, by sampling (not cProfile).

    python -m bench.sample_gateway [--n 400] [--checkout DIR] [--interval 0.0005]

cProfile (``bench.profile_paths``) charges a fixed cost to every Python call,
so it inflates code made of many small calls (routers, middlewares, header
loops) against code that spends its time in a few (``socket.send``, a
commit). This samples instead: ``run_gateway.py`` runs with a thread that,
every ``--interval`` seconds, reads every other thread's Python stack
(``sys._current_frames``); stacks waiting (``epoll``, a condition's wait) are
left out, the rest are busy. The interpreter's switch interval is set to
0.1 ms, so the sampler gets the GIL within that of asking, at the next
bytecode boundary of the busy thread: samples fall on running Python code in
proportion to its time, and a C call that releases the GIL (a socket send, a
commit) is charged to the Python function that called it.

The driver is ``bench.gateway_fleet``'s probe (a sled's frame in, the decision
POSTed with httpx, the commit, the answer out), ``--n`` round trips after 100
of warm-up. It prints each package's share of the busy samples by self (the
innermost frame) and by presence (anywhere in the stack), the top frames, and
the busy samples a round trip. The sampler costs some time of its own (it
holds the GIL while it walks the stacks): read shares, not times.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import linecache
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: The innermost frames of a thread that waits (the loop's poll, a worker's queue).
IDLE = {
    ("selectors.py", "select"),
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
}
#: Frames that wait in a C call on one line only: (file, function) → that line's text
#: (the store's writer blocks in its ``SimpleQueue.get``, called from ``_work`` itself).
IDLE_LINES = {("sql.py", "_work"): "self._queue.get("}


def _where(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    for ours in ("/sled_gateway/", "/actors/", "/protocol/", "/bench/"):
        if ours in filename:  # this tree's or another checkout's
            return ours[1:] + filename.rsplit(ours, 1)[1]
    return filename


def serve(out: str, interval: float, script: str, args: list[str]) -> None:
    """Run ``script`` with a sampler thread; write the busy stacks to ``out`` at exit."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    running = True

    def sample() -> None:
        me = threading.get_ident()
        while running:
            time.sleep(interval)
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                code = frame.f_code
                where = (code.co_filename.rsplit("/", 1)[-1], code.co_name)
                if where in IDLE:
                    continue
                waits_on = IDLE_LINES.get(where)
                if waits_on and waits_on in linecache.getline(code.co_filename, frame.f_lineno):
                    continue
                stack = []
                f: Any = frame
                while f is not None:
                    stack.append(f"{_where(f.f_code.co_filename)}:{f.f_code.co_name}")
                    f = f.f_back
                stacks[tuple(stack)] += 1

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    signals = 0

    def mark(_signum: int, _frame: Any) -> None:
        # The first: the warm-up is over, count from here. The second: the round trips
        # are over; stop before the shutdown's own work is counted.
        nonlocal signals, running
        signals += 1
        if signals == 1:
            stacks.clear()
        else:
            running = False
            sampler.join(5)  # its last pass may still be adding to the counter
            Path(out).write_text(json.dumps([[list(s), n] for s, n in stacks.items()]))

    signal.signal(signal.SIGUSR2, mark)
    # The script's own tree first (this file runs as a script, from another checkout too).
    sys.path[0] = str(Path(script).resolve().parent)
    sys.setswitchinterval(0.0001)
    sampler.start()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    finally:
        running = False


def package(frame: str) -> str:
    path = frame.rsplit(":", 1)[0]
    if path.startswith(("sled_gateway/", "actors/", "protocol/")):
        return "ours: " + path.split("/", 1)[0]
    if "/" in path and not path.startswith("asyncio/"):
        return path.split("/", 1)[0]
    return "stdlib " + path.split("/", 1)[0].removesuffix(".py")


def report(out: Path, n: int, top: int) -> str:
    stacks = [(tuple(s), c) for s, c in json.loads(out.read_text())]
    busy = sum(c for _, c in stacks)
    self_by: collections.Counter[str] = collections.Counter()
    inside: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    for stack, count in stacks:
        self_by[package(stack[0])] += count
        frames[stack[0]] += count
        for where in {package(f) for f in stack}:
            inside[where] += count
    lines = [f"{busy} busy samples, {busy / n:.1f} a round trip"]
    lines.append(f"{'self':>7} {'inside':>7}  package")
    for name, count in self_by.most_common(16):
        lines.append(f"{100 * count / busy:6.1f}% {100 * inside[name] / busy:6.1f}%  {name}")
    lines.append(f"\n{'self':>7}  innermost frame")
    for name, count in frames.most_common(top):
        lines.append(f"{100 * count / busy:6.1f}%  {name}")
    return "\n".join(lines)


def callers(out: Path, innermost: str, limit: int = 4) -> str:
    """The most sampled stacks whose innermost frame contains ``innermost``, outer frames cut."""
    stacks = [(s, c) for s, c in json.loads(out.read_text()) if innermost in s[0]]
    stacks.sort(key=lambda sc: -sc[1])
    return "\n".join(f"{c} samples: " + " < ".join(s[:8]) for s, c in stacks[:limit])


def inclusive(out: Path, frames: list[str], n: int) -> str:
    """For each of ``frames`` (substrings of ``path:function``): the share of busy samples
    with it anywhere in the stack (its own time and its callees')."""
    stacks = json.loads(out.read_text())
    busy = sum(c for _, c in stacks)
    lines = [f"{'inside':>7} {'a trip':>7}  frame"]
    for frame in frames:
        count = sum(c for s, c in stacks if any(frame in f for f in s))
        lines.append(f"{100 * count / busy:6.1f}% {count / n:7.2f}  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1], float(argv[2]), argv[3], argv[4:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.0005)
    parser.add_argument("--checkout", type=Path, default=REPO, help="the tree whose gateway runs")
    parser.add_argument("--stacks", help="also print the stacks whose innermost frame has this")
    parser.add_argument(
        "--inside", help="comma-separated frames: the share of busy samples inside each"
    )
    args = parser.parse_args(argv)
    from bench.gateway_fleet import OPERATOR_TOKEN, TOKEN, round_trips, wait_http
    from bench.run import PY, free_port

    with tempfile.TemporaryDirectory(prefix="sample-gw-") as tmp:
        out = Path(tmp) / "stacks.json"
        port = free_port()
        proc = subprocess.Popen(
            [
                PY,
                str(Path(__file__).resolve()),
                "serve",
                str(out),
                str(args.interval),
                str(args.checkout / "run_gateway.py"),
                "--listen",
                f"127.0.0.1:{port}",
                "--token",
                TOKEN,
                "--db",
                f"{tmp}/gateway.db",
                "--log-level",
                "WARNING",
            ],
            cwd=args.checkout,
            env={**os.environ, "SLED_GATEWAY_OPERATOR_TOKEN": OPERATOR_TOKEN},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_http(base))
            url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
            asyncio.run(round_trips(base, url, 100))
            proc.send_signal(signal.SIGUSR2)
            time.sleep(0.5)
            times, _ = asyncio.run(round_trips(base, url, args.n))
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        times.sort()
        print(f"{args.checkout}: p50 {1e6 * times[len(times) // 2]:.0f} µs (sampled)")
        print(report(out, args.n, args.top))
        if args.stacks:
            print(callers(out, args.stacks))
        if args.inside:
            print(inclusive(out, args.inside.split(","), args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
