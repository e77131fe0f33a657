"""What a ``POST /permission`` costs the uplink, checkouts side by side, rounds alternating.

    python -m bench.ingress_cost --vs /tmp/before               # CPU a request and decisions/s
    python -m bench.ingress_cost --vs /tmp/before --syscalls    # and strace -c counts a request

A loaded machine moves latencies and one long throughput sample by more than
a change of a few per cent; these figures move less:

- the uplink's CPU time per request (user + system, all threads), sequential
  and at 64 in flight;
- decisions/s at 64 in flight in many short rounds, each checkout's against a
  raw HTTP server (the trivial uvicorn peer of ``bench.paths``) measured in
  the same round, the checkouts' order switching every round; the figure is
  the median of the rounds;
- with ``--syscalls``, the system calls a request makes in the uplink
  (``strace -f -c`` attached over sequential requests; exact counts).

All with aiohttp, against the same approving gateway peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from bench.paths import BODY, aiohttp_rate
from bench.peers import run_loop
from bench.run import PY, REPO, free_port, peer, proc_cpu_seconds, wait_ready, ws_url

HEADERS = {"Content-Type": "application/json"}
IN_FLIGHT = 64


@contextlib.contextmanager
def uplinks(checkouts: dict[str, Path], gateway: str) -> Iterator[dict[str, tuple[int, int]]]:
    """Start one uplink a checkout; yield name → (pid, ingress port)."""
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name, checkout in checkouts.items():
            port = free_port()
            command = [PY, "run_uplink.py", "--upstream-gateway", gateway, "--log-level", "WARNING"]
            command += ["--project", "bench", "--listen", f"127.0.0.1:{port}"]
            procs[name] = (
                subprocess.Popen(
                    command, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                ),
                port,
            )
        for _, port in procs.values():
            wait_ready(port)
        yield {name: (proc.pid, port) for name, (proc, port) in procs.items()}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)


async def sequential(session: aiohttp.ClientSession, url: str, n: int) -> None:
    data = json.dumps(BODY).encode()
    for _ in range(n):
        async with session.post(url, data=data, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, response.status


def measure(checkouts: dict[str, Path], rounds: int, n: int, total: int) -> None:
    seq_cpu: dict[str, list[float]] = {name: [] for name in checkouts}
    par_cpu: dict[str, list[float]] = {name: [] for name in checkouts}
    ratio: dict[str, list[float]] = {name: [] for name in checkouts}
    rate: dict[str, list[float]] = {name: [] for name in [*checkouts, "raw"]}
    with peer("gateway", "--auto", "approve") as gw_port, peer("http") as http_port:
        raw_url = f"http://127.0.0.1:{http_port}/"
        with uplinks(checkouts, ws_url(gw_port)) as sides:

            async def main() -> None:
                connector = aiohttp.TCPConnector(limit=2 * IN_FLIGHT)
                async with aiohttp.ClientSession(connector=connector) as session:
                    urls = {
                        s: f"http://127.0.0.1:{port}/permission" for s, (_, port) in sides.items()
                    }
                    for url in urls.values():  # warm-up
                        await sequential(session, url, 300)
                        await aiohttp_rate(session, url, 500, IN_FLIGHT)
                    await aiohttp_rate(session, raw_url, 500, IN_FLIGHT)
                    names = list(checkouts)
                    for r in range(rounds):
                        raw = await aiohttp_rate(session, raw_url, total, IN_FLIGHT)
                        rate["raw"].append(raw)
                        for name in names if r % 2 == 0 else reversed(names):
                            pid = sides[name][0]
                            before = proc_cpu_seconds(pid)
                            await sequential(session, urls[name], n)
                            seq_cpu[name].append((proc_cpu_seconds(pid) - before) / n)
                            before = proc_cpu_seconds(pid)
                            value = await aiohttp_rate(session, urls[name], total, IN_FLIGHT)
                            par_cpu[name].append((proc_cpu_seconds(pid) - before) / total)
                            rate[name].append(value)
                            ratio[name].append(value / raw)

            run_loop(main())
    print(f"{rounds} rounds: {n} sequential, then {total} at {IN_FLIGHT} in flight (aiohttp)")
    print(f"   raw HTTP at {IN_FLIGHT} in flight {statistics.median(rate['raw']):.0f}/s")
    for name in checkouts:
        print(
            f"   {name:>5}: uplink CPU a request {statistics.median(seq_cpu[name]) * 1e6:.0f} µs "
            f"sequential, {statistics.median(par_cpu[name]) * 1e6:.0f} µs at {IN_FLIGHT} in "
            f"flight; decisions/s {statistics.median(rate[name]):.0f} "
            f"({statistics.median(ratio[name]):.2f}× raw HTTP, median of rounds)"
        )


def syscalls(name: str, checkout: Path, n: int) -> None:
    """strace -f -c of one uplink over ``n`` sequential requests: calls a request."""
    with (
        peer("gateway", "--auto", "approve") as gw_port,
        uplinks({name: checkout}, ws_url(gw_port)) as sides,
        tempfile.TemporaryDirectory(prefix="ingress-cost-") as tmp,
    ):
        pid, port = sides[name]
        url = f"http://127.0.0.1:{port}/permission"

        async def run(count: int) -> None:
            async with aiohttp.ClientSession() as session:
                await sequential(session, url, count)

        run_loop(run(300))
        out = Path(tmp) / "strace.txt"
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL
        )
        time.sleep(1.0)  # attached to every thread
        run_loop(run(n))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        counts = []
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                counts.append((int(parts[3]) / n, parts[-1]))
    counts.sort(reverse=True)
    listed = ", ".join(f"{call} {per:.2f}" for per, call in counts if per >= 0.05)
    print(f"   {name:>5}: system calls a request {sum(c for c, _ in counts):.2f} ({listed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=Path, metavar="CHECKOUT", help="also measure another checkout")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n", type=int, default=400, help="sequential requests a round")
    parser.add_argument("--total", type=int, default=1000, help="requests a 64-in-flight sample")
    parser.add_argument("--syscalls", action="store_true", help="also strace -c each checkout")
    args = parser.parse_args(argv)
    checkouts = {"this": REPO}
    if args.vs is not None:
        checkouts["other"] = args.vs.resolve()
    print(f"bench.ingress_cost: load average {os.getloadavg()[0]:.2f}", flush=True)
    measure(checkouts, args.rounds, args.n, args.total)
    if args.syscalls:
        for name, checkout in checkouts.items():
            syscalls(name, checkout, 500)
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
