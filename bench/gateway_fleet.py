"""The reference gateway under a fleet: RSS, CPU and the permission round trip.

    python -m bench.gateway_fleet                      # 1, 1,000 and 5,000 sleds (about 5 min)
    python -m bench.gateway_fleet --sleds 1,200 --samples 100 --idle 11   # a smoke run
    python -m bench.gateway_fleet --vs ../old-checkout --rounds 2   # this tree against another
    python -m bench.gateway_fleet --sleds 5000 --gc-ab --rounds 2   # collector tuning on vs off
    python -m bench.gateway_fleet --sleds 5000 --py-spy   # where the connect and the probe go

For each fleet size a fresh gateway is started in its own process
(``run_gateway.py`` with a token, no ``--auto``, ``--db`` in a temporary
directory), and the simulated sleds in another (one asyncio process holding N
WebSocket connections; each sends ``identity``, then a ``heartbeat`` every
10 s from a random phase, and keeps the client's default 20 s keepalive
pings, as a real uplink does). Then:

* **idle cost**: the gateway's RSS, and its CPU over ``--idle`` seconds with
  only heartbeats and pings flowing;
* **console poll**: the p50 of ``GET /api/state?limit=200``, what the console
  fetches every second, and the gateway's CPU a poll (its CPU over the polls, all
  threads, less its idle rate over as long);
* **round trip**: a probe sled in this process sends ``perm_request``; a
  driver in this process, which knows the request id, POSTs the decision to
  ``/api/permissions/{project}/{req_id}`` (with ``Authorization: Bearer``,
  ignored by a gateway without operator authentication) and retries at once
  on 404 (the request not yet registered: the POST raced the WebSocket frame);
  the sample ends when the probe receives its ``perm_response``. The decision
  is committed to the SQLite audit before the gateway sends it, so the store
  is inside every sample.

Every size's p50 is also given as a multiple of the one-sled p50 of the same
run; the target is under 2x at 5,000 sleds. Issue 26's target 5 is checked at
the largest size: p99 at most 5x the p50, and the fleet connected in at most
15 s. ``--gc-ab`` shows what the collector's tuning does for both
(``sled_gateway/memory.py``: the start-up freeze and thresholds, the fleet's
freezing and timed young passes): the same tree's gateway with it and with it
made a no-op (``bench/gc_off.py``), alternating at each size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import gc_trace
from bench.profile_paths import PySpySampler
from bench.run import proc_cpu_seconds, threads_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TOKEN = "fleet-bench-token"
OPERATOR_TOKEN = "fleet-bench-operator"
#: What every operator request carries, whichever client sends it.
OPERATOR_HEADERS = {"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": "application/json"}
HEARTBEAT_S = 10.0
#: With --py-spy: its samples a second, and the frames each table of a summary shows.
FLAME_RATE = 500
FLAME_TOP = 25


def raise_nofile() -> int:
    """Lift the soft file-descriptor limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the fleet process --------------------------------------------------------------


async def fleet(url: str, count: int, prefix: str, concurrency: int) -> None:
    """Hold ``count`` sleds; print ``ready N`` once all are identified; run until killed."""
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(concurrency)
    failures = 0
    up = 0
    done = asyncio.Event()
    keep: list[Any] = []

    async def one(i: int) -> None:
        nonlocal failures, up
        try:
            async with gate:
                ws = await connect(url, max_size=None, compression=None, open_timeout=60)
                await ws.send(
                    json.dumps(
                        {
                            "type": "identity",
                            "req_id": "identity",
                            "payload": {"project": f"{prefix}{i}"},
                        }
                    )
                )
        except Exception as exc:
            failures += 1
            print(f"sled {i}: {exc!r}", file=sys.stderr, flush=True)
            if up + failures == count:
                done.set()
            return
        up += 1
        keep.append(ws)
        if up + failures == count:
            done.set()
        await asyncio.sleep(random.uniform(0, HEARTBEAT_S))
        beat = json.dumps({"type": "heartbeat", "req_id": "", "payload": None})
        while True:
            await ws.send(beat)
            await asyncio.sleep(HEARTBEAT_S)

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await done.wait()
    print(f"ready {up} {failures}", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)


# -- driving one size -----------------------------------------------------------------


@dataclass
class Result:
    sleds: int
    connect_s: float
    rss_mib: float
    cpu_idle: float  # percent of one CPU
    cpu_probe: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    retries: float  # 404s per request (POST raced the frame)
    state_ms: float  # p50 of the console's poll, GET /api/state?limit=200
    state_cpu_ms: float  # the gateway's CPU a poll, its idle rate taken off
    window: tuple[float, float] = (0.0, 0.0)  # the round trips' start and end (epoch)
    gc: str = ""  # with --gc-log: the collector's summary per generation (bench/gc_trace.py)
    flame: str = ""  # with --py-spy: py-spy's summaries of the connect and of the round trips


@contextlib.contextmanager
def gateway_process(
    workdir: Path,
    sleds: int,
    checkout: Path = REPO,
    gc_log: Path | None = None,
    gc_off: bool = False,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = (workdir / "gateway.log").open("wb")
    env = {**os.environ, "SLED_GATEWAY_OPERATOR_TOKEN": OPERATOR_TOKEN}
    # This tree's tracer runs any checkout's run_gateway.py, so both sides of --vs are traced alike.
    trace = [] if gc_log is None else [str(REPO / "bench" / "gc_trace.py"), str(gc_log)]
    if gc_off:
        trace.append(str(REPO / "bench" / "gc_off.py"))
    proc = subprocess.Popen(
        [
            PY,
            *trace,
            str(checkout / "run_gateway.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            TOKEN,
            "--db",
            str(workdir / "gateway.db"),
            # The fleet is one connection per sled, beside the bench's own HTTP
            # clients: the default cap would evict sleds the bench counts on.
            "--max-connections",
            str(sleds + 64),
            # All the fleet's sleds share one address, and it opens 64 at a time: the
            # per-address cap on connections in their handshake (32) would close some.
            "--max-connections-per-client",
            "128",
            "--log-level",
            "WARNING",
        ],
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
    )
    try:
        yield proc, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@contextlib.contextmanager
def fleet_process(url: str, count: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [PY, "-m", "bench.gateway_fleet", "fleet", "--url", url, "--count", str(count)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


async def wait_http(base: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with operator_client(base, timeout=2) as http:
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not come up")
            await asyncio.sleep(0.1)


async def connected_count(http: Any) -> int:
    state = (await http.get("/api/state", params={"limit": "0"})).json()
    counts = state.get("counts")
    if counts is None:  # a gateway without counts
        return sum(1 for s in state["sleds"] if s["state"] == "connected")
    return int(counts["connected"])


def operator_client(base: str, timeout: float = 30) -> Any:
    """An HTTP client of the gateway as its operator: every ``/api`` route needs the token."""
    import httpx

    return httpx.AsyncClient(base_url=base, timeout=timeout, headers=OPERATOR_HEADERS)


#: The probe's pause between samples at a fleet: each sample starts at a random phase of
#: the fleet's heartbeats and the collector's passes, not right behind the last answer.
FLEET_PAUSE = (0.01, 0.03)


class _LightOperator:
    """The operator's client on aiohttp (a light client, as the issue measured with),
    with the two calls the probe makes of it: far less of a round trip is the client's
    own than with httpx, so the gateway's share of it shows."""

    def __init__(self, base: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(base_url=base, headers=OPERATOR_HEADERS)

    async def __aenter__(self) -> _LightOperator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def state(self) -> Any:
        async with self.session.get("/api/state", params={"limit": "100000"}) as response:
            return await response.json()

    async def post(self, path: str, body: bytes) -> tuple[int, str]:
        async with self.session.post(path, data=body) as response:
            return response.status, await response.text()


class _HttpxOperator:
    """The same two calls on httpx (the console's and the operator API's usual client)."""

    def __init__(self, base: str) -> None:
        self.client = operator_client(base)

    async def __aenter__(self) -> _HttpxOperator:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def state(self) -> Any:
        return (await self.client.get("/api/state", params={"limit": "100000"})).json()

    async def post(self, path: str, body: bytes) -> tuple[int, str]:
        response = await self.client.post(path, content=body)
        return response.status_code, response.text


#: The probe's decision POST, by client name: httpx, or aiohttp (the light client).
OPERATOR_CLIENTS = {"httpx": _HttpxOperator, "aiohttp": _LightOperator}


async def round_trips(
    base: str,
    ws_url: str,
    samples: int,
    pause: tuple[float, float] | None = FLEET_PAUSE,
    client: str = "httpx",
) -> tuple[list[float], int]:
    """The probe's round trips, and how many early POSTs it retried. ``pause=None`` sends
    each request right after the last answer, as the raw baselines of ``bench.paths`` do:
    a pause lets this VM's CPUs idle, and every hop of the next sample then pays their
    wake-up, so a paced path against back-to-back baselines measures the pause.
    ``client`` names the HTTP client that POSTs the decisions (``OPERATOR_CLIENTS``)."""
    from websockets.asyncio.client import connect

    times: list[float] = []
    retries = 0
    async with (
        connect(ws_url, max_size=None, compression=None) as ws,
        OPERATOR_CLIENTS[client](base) as http,
    ):
        await ws.send(
            json.dumps({"type": "identity", "req_id": "identity", "payload": {"project": "probe"}})
        )
        while True:  # wait until the gateway knows the probe
            state = await http.state()
            if any(s["project"] == "probe" for s in state["sleds"]):
                break
            await asyncio.sleep(0.05)
        body = json.dumps({"decision": "approve"}).encode()
        for i in range(samples + 5):  # the first 5 warm up
            req_id = f"rt-{i}-{uuid.uuid4().hex[:8]}"
            frame = {
                "type": "perm_request",
                "req_id": req_id,
                "payload": {"tool_name": "Bash", "tool_input": {"command": f"echo {i}"}},
            }
            start = time.perf_counter()
            await ws.send(json.dumps(frame))
            while True:
                status, text = await http.post(f"/api/permissions/probe/{req_id}", body)
                if status != 404:
                    break
                if i >= 5:
                    retries += 1
            if status != 200:
                raise RuntimeError(f"decision refused: {status} {text}")
            answer = json.loads(await asyncio.wait_for(ws.recv(), 30))
            elapsed = time.perf_counter() - start
            if answer["req_id"] != req_id or answer["payload"] != {
                "approved": True,
                "always_allow": False,
            }:
                raise RuntimeError(f"unexpected answer {answer}")
            if i >= 5:
                times.append(elapsed)
            if pause is not None:
                await asyncio.sleep(random.uniform(*pause))
    return times, retries


async def state_polls(base: str, n: int) -> list[float]:
    """The console's polls (``GET /api/state?limit=200``), 50 ms apart as a console's
    timer spaces them: each one's time, in s."""

    took = []
    async with operator_client(base) as http:
        for _ in range(n):
            start = time.perf_counter()
            response = await http.get("/api/state", params={"limit": "200"})
            response.raise_for_status()
            took.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
    return took


#: The console's polls each size ends with: enough that the idle CPU taken off their own
#: (the fleet's heartbeats, as much as the polls' at 5,000 sleds) leaves a steady figure.
STATE_POLLS = 100


def measure(
    sleds: int,
    samples: int,
    idle_s: float,
    checkout: Path = REPO,
    gc_log: bool = False,
    gc_off: bool = False,
    flame: bool = False,
) -> Result:
    with tempfile.TemporaryDirectory(prefix="gw-fleet-") as tmp:
        trace = Path(tmp) / "gc.log" if gc_log else None
        result = _measure(Path(tmp), sleds, samples, idle_s, checkout, trace, gc_off, flame)
        if trace is not None and trace.is_file():  # written when the gateway exits
            passes = gc_trace.read(trace)
            probing = [p for p in passes if result.window[0] <= p[0] <= result.window[1]]
            result.gc = "\n".join(
                [trace.read_text().splitlines()[0], "whole run:"]
                + [f"  {line}" for line in gc_trace.summary(passes)]
                + ["while probing:"]
                + [f"  {line}" for line in gc_trace.summary(probing)]
            )
    return result


@contextlib.contextmanager
def _sampled(
    flames: Path | None, name: str, pid: int, per: int, title: str, summaries: list[str]
) -> Iterator[None]:
    """With ``--py-spy`` (``flames``, its directory): py-spy samples ``pid`` through the
    block, and the block's summary, ``per`` what it did, is added to ``summaries``."""
    if flames is None:
        yield
        return
    sampler = PySpySampler(flames / f"{name}.txt", FLAME_RATE)
    sampler.attach(pid)
    try:
        yield
    finally:
        sampler.detach()
    summaries.append(f"{title}:\n" + sampler.report(FLAME_TOP, per))


def _measure(
    tmp: Path,
    sleds: int,
    samples: int,
    idle_s: float,
    checkout: Path,
    gc_log: Path | None,
    gc_off: bool = False,
    flame: bool = False,
) -> Result:
    flames = Path(tempfile.mkdtemp(prefix="gw-flame-")) if flame else None
    summaries: list[str] = []
    with gateway_process(tmp, sleds, checkout, gc_log, gc_off) as (gw, port):
        base = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
        asyncio.run(wait_http(base))
        fleet_size = sleds - 1  # the probe is the last sled
        with contextlib.ExitStack() as stack:
            with _sampled(
                flames if fleet_size > 0 else None,
                f"connect-{sleds}",
                gw.pid,
                fleet_size,
                f"the connect of {fleet_size} sleds, µs a sled",
                summaries,
            ):
                t0 = time.monotonic()
                if fleet_size > 0:
                    proc = stack.enter_context(fleet_process(ws_url, fleet_size))
                    assert proc.stdout is not None
                    line = proc.stdout.readline().split()
                    if not line or line[0] != "ready" or line[2] != "0":
                        raise RuntimeError(f"the fleet did not connect: {line}")

                    async def settle() -> None:
                        async with operator_client(base) as http:
                            while await connected_count(http) < fleet_size:
                                await asyncio.sleep(0.2)

                    asyncio.run(settle())
                connect_s = time.monotonic() - t0
            time.sleep(5)  # let the connect burst settle
            c0, w0 = proc_cpu_seconds(gw.pid), time.monotonic()
            time.sleep(idle_s)
            cpu_idle = 100 * (proc_cpu_seconds(gw.pid) - c0) / (time.monotonic() - w0)
            rss = rss_mib(gw.pid)
            with _sampled(
                flames,
                f"probe-{sleds}",
                gw.pid,
                samples,
                f"the {samples} round trips, the fleet's heartbeats included, µs a round trip",
                summaries,
            ):
                c1, w1 = proc_cpu_seconds(gw.pid), time.monotonic()
                window = time.time()
                times, retries = asyncio.run(round_trips(base, ws_url, samples))
                window_end = time.time()
                cpu_probe = 100 * (proc_cpu_seconds(gw.pid) - c1) / (time.monotonic() - w1)

            async def check() -> int:
                async with operator_client(base) as http:
                    return await connected_count(http)

            still = asyncio.run(check())
            # The poll's own CPU: the gateway's over the polls, less what it spends idle
            # (the fleet's heartbeats) in as long, to the nanosecond.
            c2, w2 = threads_cpu_seconds(gw.pid), time.monotonic()
            polls = asyncio.run(state_polls(base, STATE_POLLS))
            polled_cpu = threads_cpu_seconds(gw.pid) - c2
            state_cpu = polled_cpu - cpu_idle / 100 * (time.monotonic() - w2)
            if still < sleds - 1:
                raise RuntimeError(f"only {still} of {sleds} sleds stayed connected")
            rss = max(rss, rss_mib(gw.pid))
    return Result(
        sleds,
        connect_s,
        rss,
        cpu_idle,
        cpu_probe,
        1000 * statistics.median(times),
        1000 * pct(times, 0.99),
        1000 * max(times),
        retries / len(times),
        1000 * statistics.median(polls),
        1000 * state_cpu / STATE_POLLS,
        (window, window_end),
        flame="\n".join(summaries),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    f = sub.add_parser("fleet", help="(internal) hold a fleet of simulated sleds")
    f.add_argument("--url", required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--prefix", default="fleet-")
    f.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sleds", default="1,1000,5000", help="fleet sizes (default %(default)s)")
    parser.add_argument("--samples", type=int, default=300, help="round trips per size")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU sampling")
    parser.add_argument(
        "--vs",
        type=Path,
        metavar="CHECKOUT",
        help="also run another checkout's gateway, alternating with this one at every size, "
        "and print the ratios (this / other)",
    )
    parser.add_argument(
        "--gc-ab",
        action="store_true",
        help="this tree's gateway with its collector tuning (sled_gateway/memory.py) and "
        "without it (bench/gc_off.py), alternating at every size, and the ratios (on / off)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --vs or --gc-ab: alternations per size (median kept)",
    )
    parser.add_argument(
        "--gc-log",
        action="store_true",
        help="trace the gateway's cyclic collector (bench/gc_trace.py) and print each size's "
        "passes per generation, over the whole run and while probing",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the gateway with py-spy (bench.profile_paths) while the fleet connects "
        "and while probing, and print each phase's flame summary; the figures are then the "
        "sampled gateway's",
    )
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    if args.cmd == "fleet":
        asyncio.run(fleet(args.url, args.count, args.prefix, args.concurrency))
        return 0
    sizes = [int(x) for x in args.sleds.split(",")]
    if sizes[0] != 1:
        sizes.insert(0, 1)  # the baseline every ratio is against
    if max(sizes) + 64 > nofile:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {max(sizes)} sleds")
    print(
        f"gateway fleet benchmark: {os.cpu_count()} CPU(s), load average "
        f"{os.getloadavg()[0]:.2f}, {args.samples} round trips per size, "
        f"idle CPU over {args.idle:g} s, heartbeats every {HEARTBEAT_S:g} s",
        flush=True,
    )
    if args.vs is not None and args.gc_ab:
        parser.error("--vs and --gc-ab are two different comparisons: give one")
    if args.py_spy and (args.vs is not None or args.gc_ab):
        parser.error("--py-spy samples one gateway: not with --vs or --gc-ab")
    if args.vs is not None:
        if not (args.vs / "run_gateway.py").is_file():
            parser.error(f"--vs: no run_gateway.py in {args.vs}")
        sides = [("this", REPO, False), ("other", args.vs.resolve(), False)]
        return compare(sizes, args.samples, args.idle, sides, args.rounds, args.gc_log)
    if args.gc_ab:
        sides = [("gc on", REPO, False), ("gc off", REPO, True)]
        return compare(sizes, args.samples, args.idle, sides, args.rounds, args.gc_log)
    results: list[Result] = []
    for n in sizes:
        print(f"... {n} sled(s)", file=sys.stderr, flush=True)
        results.append(measure(n, args.samples, args.idle, gc_log=args.gc_log, flame=args.py_spy))
        if results[-1].gc:
            print(f"{n} sled(s), the gateway's collector:\n{results[-1].gc}", flush=True)
        if results[-1].flame:
            print(f"{n} sled(s), py-spy:\n{results[-1].flame}", flush=True)
    base = results[0].p50_ms
    header = (
        f"{'sleds':>6} {'connect s':>9} {'RSS MiB':>8} {'CPU idle':>9} {'CPU probing':>11} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'x 1-sled p50':>12} {'404/req':>7} "
        f"{'state ms':>8} {'state CPU ms':>12}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.sleds:>6} {r.connect_s:>9.1f} {r.rss_mib:>8.1f} {r.cpu_idle:>8.1f}% "
            f"{r.cpu_probe:>10.1f}% {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} "
            f"{r.p50_ms / base:>11.2f}x {r.retries:>7.2f} {r.state_ms:>8.2f} "
            f"{r.state_cpu_ms:>12.2f}"
        )
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")
    worst = results[-1]
    verdict = "met" if worst.p50_ms < 2 * base else "NOT met"
    print(f"target (p50 at {worst.sleds} sleds < 2x the one-sled p50): {verdict}")
    print(target_5(worst.sleds, worst.p99_ms / worst.p50_ms, worst.connect_s))
    return 0


def target_5(sleds: int, tail: float, connect_s: float) -> str:
    """Issue 26's target 5 at the largest size measured (it names 5,000 sleds)."""
    return (
        f"target 5 at {sleds} sleds: p99 {tail:.2f}x the p50 (<= 5x: "
        f"{'met' if tail <= 5 else 'MISS'}), connected in {connect_s:.1f} s (<= 15 s: "
        f"{'met' if connect_s <= 15 else 'MISS'})"
    )


def compare(
    sizes: list[int],
    samples: int,
    idle_s: float,
    sides: list[tuple[str, Path, bool]],
    rounds: int,
    gc_log: bool = False,
) -> int:
    """Two gateways, ``(name, checkout, collector tuning off)`` each, alternating A B B A
    at each size so that a drift of the machine's speed falls on both; medians over the
    rounds, and the first side's figures as a multiple of the second's."""
    (mine_name, _, _), (theirs_name, _, _) = sides
    figures = (
        "connect_s",
        "rss_mib",
        "cpu_idle",
        "cpu_probe",
        "p50_ms",
        "p99_ms",
        "p99/p50",
        "state_ms",
        "state_cpu_ms",
    )
    ratio_name = f"{mine_name}/{theirs_name}"
    header = f"{'sleds':>6} {'figure':>12} {mine_name:>9} {theirs_name:>9} {ratio_name}"
    rows = []
    verdicts = []
    for n in sizes:
        runs: dict[str, list[Result]] = {name: [] for name, _, _ in sides}
        for i in range(rounds):
            for side, checkout, gc_off in sides if i % 2 == 0 else reversed(sides):
                print(f"... {n} sled(s), {side}, round {i + 1}", file=sys.stderr, flush=True)
                runs[side].append(measure(n, samples, idle_s, checkout, gc_log, gc_off))
                last = runs[side][-1]
                print(
                    f"    p50 {last.p50_ms:.2f} ms, p99 {last.p99_ms:.2f} ms, "
                    f"connect {last.connect_s:.1f} s, RSS {last.rss_mib:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
                if last.gc:
                    print(last.gc, file=sys.stderr, flush=True)
        for figure in figures:
            mine = statistics.median(_figure(r, figure) for r in runs[mine_name])
            theirs = statistics.median(_figure(r, figure) for r in runs[theirs_name])
            ratio = mine / theirs if theirs else float("nan")
            width = len(ratio_name) - 1
            rows.append(f"{n:>6} {figure:>12} {mine:>9.2f} {theirs:>9.2f} {ratio:>{width}.2f}x")
        if n == sizes[-1]:
            for side, results in runs.items():
                tail = statistics.median(_figure(r, "p99/p50") for r in results)
                connect = statistics.median(r.connect_s for r in results)
                verdicts.append(f"{side}: {target_5(n, tail, connect)}")
    for name, checkout, gc_off in sides:
        print(f"\n{name}: {checkout}{' (collector tuning off)' if gc_off else ''}", end="")
    print(f"\n{header}\n{'-' * len(header)}")
    print("\n".join(rows))
    print("\n".join(["", *verdicts]))
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")
    return 0


def _figure(result: Result, name: str) -> float:
    if name == "p99/p50":  # the tail against the median of the same run
        return result.p99_ms / result.p50_ms
    return float(getattr(result, name))


if __name__ == "__main__":
    sys.exit(main())
