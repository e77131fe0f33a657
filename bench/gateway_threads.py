"""The gateway's CPU a decision round trip, thread by thread: its event loop and its store's writer.

    python -m bench.gateway_threads [--vs CHECKOUT] [--rounds 6] [--n 300]

``bench.paths`` gives the gateway's whole CPU a round trip; this splits it by
thread, from the scheduler's own count (``/proc/PID/task/TID/schedstat``, in
nanoseconds), with the context switches a round trip: the loop (HTTP,
WebSocket, the decision) and the writer (the transaction, its wake-ups). The
probe is ``bench.gateway_fleet``'s (a sled's frame in, the decision POSTed with
httpx, the commit, the answer out), one sled, ``--n`` round trips a round; with
``--vs`` the two checkouts alternate, the first of each round switching. A
figure is the median of the rounds. Threads are told apart by what they wait
in when idle (the loop in ``epoll_wait``, the writer on a futex); the main
thread only waits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway_fleet import REPO, TOKEN, gateway_process, round_trips, wait_http


def _task(pid: int, tid: int) -> tuple[int, int, int]:
    """(ns on a CPU, voluntary, involuntary context switches) of one thread."""
    ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
    switches = {k: int(v) for k, v in (line.split(":") for line in status if "ctxt" in line)}
    return ns, switches["voluntary_ctxt_switches"], switches["nonvoluntary_ctxt_switches"]


def _roles(pid: int) -> dict[str, int]:
    """The loop's and the writer's thread ids, by their wait while idle."""
    roles = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        if tid == pid:
            continue
        stack = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
        # x86-64 system call numbers: 232 epoll_wait, 281 epoll_pwait, 202 futex.
        if stack and stack[0] in ("232", "281"):
            roles["loop"] = tid
        elif stack and stack[0] == "202":
            roles.setdefault("writer", tid)
    return roles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=Path, metavar="CHECKOUT", help="also measure another checkout")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args(argv)
    checkouts = {"this": REPO}
    if args.vs is not None:
        checkouts["other"] = args.vs.resolve()
    print(f"bench.gateway_threads: load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, dict[str, list[float]]] = {side: {} for side in checkouts}
    with tempfile.TemporaryDirectory(prefix="gw-threads-") as tmp, contextlib.ExitStack() as stack:
        procs, urls = {}, {}
        for side, checkout in checkouts.items():
            workdir = Path(tmp) / side
            workdir.mkdir()
            procs[side], port = stack.enter_context(gateway_process(workdir, 1, checkout))
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_http(base))
            urls[side] = (base, f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}")
            asyncio.run(round_trips(*urls[side], 100))  # warm-up
        time.sleep(0.3)
        roles = {side: _roles(procs[side].pid) for side in checkouts}
        for side, found in roles.items():
            if set(found) != {"loop", "writer"}:
                raise SystemExit(f"{side}: could not tell the loop from the writer ({found})")
        sides = list(checkouts)
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                pid = procs[side].pid
                before = {role: _task(pid, tid) for role, tid in roles[side].items()}
                times, _ = asyncio.run(round_trips(*urls[side], args.n))
                after = {role: _task(pid, tid) for role, tid in roles[side].items()}
                got = figures[side]
                got.setdefault("p50", []).append(1e6 * statistics.median(times))
                for role in ("loop", "writer"):
                    (ns0, vol0, inv0), (ns1, vol1, inv1) = before[role], after[role]
                    got.setdefault(f"{role} µs", []).append((ns1 - ns0) / 1000 / args.n)
                    got.setdefault(f"{role} vol", []).append((vol1 - vol0) / args.n)
                    got.setdefault(f"{role} invol", []).append((inv1 - inv0) / args.n)
    print(f"{args.rounds} rounds × {args.n} round trips; medians of the rounds")
    for side, got in figures.items():
        m = {k: statistics.median(v) for k, v in got.items()}
        print(
            f"  {side:>5}: p50 {m['p50']:.0f} µs; CPU a round trip: loop {m['loop µs']:.0f} µs "
            f"+ writer {m['writer µs']:.0f} µs = {m['loop µs'] + m['writer µs']:.0f} µs; "
            f"context switches (voluntary/involuntary) loop {m['loop vol']:.1f}/"
            f"{m['loop invol']:.1f}, writer {m['writer vol']:.1f}/{m['writer invol']:.1f}"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
