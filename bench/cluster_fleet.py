"""A fleet of sleds across three gateway replicas on PostgreSQL and NATS (issue 24).

    python -m bench.cluster_fleet                    # 10,000 sleds (a quiet machine: ~5 min)
    python -m bench.cluster_fleet --sleds 300 --samples 100   # a smoke run (~1-2 min)
    python -m bench.cluster_fleet --replica-ports 8101,8102,8103 --via ws://127.0.0.1:8080
                                                     # the sleds through a load balancer

A real PostgreSQL 15 (``tests/pg.py``) and nats-server (``tests/support/nats.py``)
run unprivileged in temporary directories; three ``run_gateway.py`` replicas
share them (``--db postgresql://... --bus nats://...``), all on loopback free
ports. The simulated sleds run in child processes (``--sleds-per-process``
each): every sled sends ``identity`` then a heartbeat every 10 s, as in
``bench.gateway_fleet``, and starts on replica ``i % 3`` (or on ``--via``).
When its socket ends it reconnects as the uplink does: the uplink's own
back-off rule (``actors.backoff.Backoff`` with the uplink's defaults, or full
jitter on a ``retry_after`` close) and the next URL of its list. Reported:

* **connect**: seconds from starting the fleet until every replica counts the
  sleds it holds as connected (target <= 120 s at 10,000);
* **RSS per sled**, each replica: (RSS with its sleds - RSS before any) / its
  sleds (target <= 30 KiB);
* **round trip**: a probe sled on replica 1 sends ``perm_request``; the
  decision is POSTed alternately to replica 1 (*same*) and replica 2 (*cross*),
  retrying on 404 for up to 5 s (the request may reach the store or the other
  replica after the frame; the retries are counted); the sample ends when the
  probe gets its ``perm_response``. Targets: cross p50 <= same p50 + 2 ms, p99
  <= 600 ms. A gateway without cross-replica decisions is reported as such;
* **reconnect storm**: ``kill -9`` of replica 3; how long each of its sleds
  took to be connected again (p50/p95/max from the kill), and how many sleds
  of the surviving replicas were disconnected (the target is none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.gateway_fleet import (
    HEARTBEAT_S,
    OPERATOR_TOKEN,
    PY,
    REPO,
    TOKEN,
    free_port,
    operator_client,
    pct,
    raise_nofile,
    rss_mib,
    wait_http,
)

REPLICAS = 3
#: How long a decision POST is retried on 404 before the gateway is taken not to know the request.
RETRY_404_S = 5.0
#: A perm_response later than this is reported as not delivered.
RESPONSE_TIMEOUT_S = 15.0
STATEMENT = (
    "One 2-core machine runs PostgreSQL, NATS, three replicas and the whole fleet: these figures "
    "show correctness and per-sled overhead, not throughput scaling."
)


# -- the fleet process ----------------------------------------------------------------


async def fleet(urls: list[str], first: int, count: int, concurrency: int) -> None:
    """Hold sleds ``first .. first+count-1`` for ever, reconnecting like the uplink.

    Prints one line per event on stdout, for the parent: ``up I R T`` (sled I
    connected to URL number R and sent its identity, at monotonic time T),
    ``down I R T`` (its socket ended), ``fail I R T`` (a connect failed).
    CLOCK_MONOTONIC is one clock for every process of the machine.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from actors.backoff import Backoff
    from actors.config import UplinkConfig
    from actors.connection import retry_after_of

    defaults = UplinkConfig()  # the uplink's own back-off settings
    # All the sleds share one client address: the gate keeps their handshakes under the
    # gateway's per-address cap, which a real fleet (one address each) never meets.
    gate = asyncio.Semaphore(concurrency)
    beat = json.dumps({"type": "heartbeat", "req_id": "", "payload": None})
    failures = [0]

    def emit(kind: str, i: int, r: int) -> None:
        sys.stdout.write(f"{kind} {i} {r} {time.monotonic():.6f}\n")

    async def one(i: int) -> None:
        backoff = Backoff(
            initial=defaults.backoff_initial,
            maximum=defaults.backoff_max,
            multiplier=defaults.backoff_multiplier,
            reset_after=defaults.backoff_reset_after,
        )
        # Like the uplink: its URLs in a shuffled order, the next after each ended or failed
        # connection; the sled's own replica first, so the fleet starts round robin.
        others = [r for r in range(len(urls)) if r != i % len(urls)]
        random.shuffle(others)
        order = [i % len(urls), *others]
        turn = 0
        identity = json.dumps(
            {"type": "identity", "req_id": "identity", "payload": {"project": f"fleet-{i}"}}
        )
        while True:
            r = order[turn % len(order)]
            turn += 1
            up_at: float | None = None
            retry_after: float | None = None
            try:
                async with gate:
                    ws = await connect(urls[r], max_size=None, compression=None, open_timeout=60)
                    await ws.send(identity)
                up_at = time.monotonic()
                emit("up", i, r)
                try:
                    # Reading all the time, as the uplink does, so a dead replica is noticed
                    # when its socket ends, not at the next heartbeat.
                    next_beat = up_at + random.uniform(0, HEARTBEAT_S)
                    while True:
                        try:
                            await asyncio.wait_for(ws.recv(), next_beat - time.monotonic())
                        except TimeoutError:
                            await ws.send(beat)
                            next_beat += HEARTBEAT_S
                except ConnectionClosed as closed:
                    retry_after, _ = retry_after_of(closed)
                finally:
                    emit("down", i, r)
                    await ws.close()
            except Exception as exc:  # any failed connect is retried, as the uplink does
                if up_at is None:
                    emit("fail", i, r)
                    failures[0] += 1
                    if failures[0] <= 5:  # the first few say why; the parent counts them all
                        print(f"sled {i} on {r}: {exc!r}"[:300], file=sys.stderr, flush=True)
            up_for = None if up_at is None else time.monotonic() - up_at
            wait = (
                backoff.full_jitter(retry_after)
                if retry_after is not None
                else backoff.next_delay(up_for)
            )
            await asyncio.sleep(wait)

    parent = os.getppid()

    async def flush() -> None:
        while os.getppid() == parent:  # a bench killed outright leaves no fleet behind
            await asyncio.sleep(0.1)
            sys.stdout.flush()
        os._exit(1)

    tasks = [asyncio.create_task(one(i)) for i in range(first, first + count)]
    tasks.append(asyncio.create_task(flush()))
    await asyncio.gather(*tasks)


# -- the parent: engines, replicas, the fleet's events ----------------------------------


@dataclass
class FleetView:
    """What the fleet's processes reported: where each sled is, and every drop."""

    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    where: dict[int, int] = field(default_factory=dict)  # sled -> URL number, while up
    ups: list[tuple[int, int, float]] = field(default_factory=list)
    downs: list[tuple[int, int, float]] = field(default_factory=list)
    fails: int = 0

    def feed(self, line: str) -> None:
        parts = line.split()
        if len(parts) != 4:
            return
        kind, i, r, t = parts[0], int(parts[1]), int(parts[2]), float(parts[3])
        with self.lock:
            if kind == "up":
                self.where[i] = r
                self.ups.append((i, r, t))
            elif kind == "down":
                self.where.pop(i, None)
                self.downs.append((i, r, t))
            elif kind == "fail":
                self.fails += 1

    def shares(self, urls: int) -> list[int]:
        with self.lock:
            counts = [0] * urls
            for r in self.where.values():
                counts[r] += 1
            return counts


class Replica:
    def __init__(
        self, index: int, workdir: Path, db: str, bus: str, sleds: int, port: int = 0
    ) -> None:
        self.index = index
        self.port = port or free_port()
        self.log = workdir / f"replica-{index}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    str(REPO / "run_gateway.py"),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--token",
                    TOKEN,
                    "--db",
                    db,
                    "--bus",
                    bus,
                    # Every sled may land here after a kill, beside the bench's HTTP clients.
                    "--max-connections",
                    str(sleds + 64),
                    # The fleet's sleds share one address (see the fleet's gate).
                    "--max-connections-per-client",
                    "256",
                    "--log-level",
                    "WARNING",
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "SLED_GATEWAY_OPERATOR_TOKEN": OPERATOR_TOKEN},
            )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/sled-uplink?token={TOKEN}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def connected_here(base: str) -> int:
    """The sleds a replica counts as connected (identified), or -1 when it does not answer."""
    import httpx

    try:
        async with operator_client(base, timeout=10) as http:
            state = (await http.get("/api/state", params={"limit": "0"})).json()
    except (httpx.HTTPError, ValueError):
        return -1
    return int(state["counts"]["connected"])


async def held_here(base: str) -> int:
    """The connected sleds this replica itself holds, or -1 when it does not answer.

    A gateway whose replicas share their sleds lists every sled on every replica and names
    the holder in ``replica`` (``null`` for the one answering); without that field every
    listed sled is the answering replica's own."""
    import httpx

    try:
        async with operator_client(base, timeout=30) as http:
            state = (await http.get("/api/state", params={"limit": "100000"})).json()
    except (httpx.HTTPError, ValueError):
        return -1
    return sum(1 for s in state["sleds"] if s["state"] == "connected" and not s.get("replica"))


async def all_identified(replicas: list[Replica], want: list[int], timeout: float) -> bool:
    """Wait until each replica holds the sleds the fleet says it holds, connected and identified.

    The cheap count first (it may be fleet-wide), then the listing, once it can be true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.gather(*(connected_here(r.base) for r in replicas))
        if all(g >= w for g, w in zip(got, want, strict=True)):
            held = await asyncio.gather(*(held_here(r.base) for r in replicas))
            if all(h >= w for h, w in zip(held, want, strict=True)):
                return True
        await asyncio.sleep(0.5)
    return False


@contextlib.contextmanager
def engines(workdir: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and nats-server on loopback, stopped and removed at the end."""
    from tests import pg
    from tests.support.nats import NatsServer, skip_reason

    if pg.MISSING:
        raise SystemExit(f"cluster_fleet: {pg.MISSING}")
    if (why := skip_reason()) is not None:
        raise SystemExit(f"cluster_fleet: {why}")
    postgres = pg.PostgresServer()
    nats = NatsServer()
    try:
        postgres.start()
        nats.start()
        yield postgres.url(postgres.create_database()), nats.url
    finally:
        nats.cleanup()
        postgres.remove()


def spawn_fleet(urls: list[str], size: int, per_process: int, view: FleetView) -> list[Any]:
    procs = []
    for first in range(0, size, per_process):
        count = min(per_process, size - first)
        argv = [PY, "-m", "bench.cluster_fleet", "fleet", "--urls", ",".join(urls)]
        argv += ["--first", str(first), "--count", str(count)]
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        stream = proc.stdout

        def read(stream: Any = stream) -> None:
            for line in stream:
                view.feed(line)

        threading.Thread(target=read, daemon=True).start()
        procs.append(proc)
    return procs


# -- the round trip: same replica and across ---------------------------------------------


@dataclass
class RoundTrips:
    same: list[float] = field(default_factory=list)
    cross: list[float] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=lambda: {"same": 0, "cross": 0})
    cross_problem: str | None = None


async def post_decision(http: Any, path: str, body: bytes) -> tuple[Any, int]:
    """POST a decision, retrying on 404 for up to RETRY_404_S; the answer and the 404s seen."""
    retries = 0
    deadline = time.monotonic() + RETRY_404_S
    while True:
        response = await http.post(path, content=body)
        if response.status_code != 404 or time.monotonic() > deadline:
            return response, retries
        retries += 1
        await asyncio.sleep(0.002)


async def round_trips(home: Replica, other: Replica, samples: int) -> RoundTrips:
    from websockets.asyncio.client import connect

    out = RoundTrips()
    body = json.dumps({"decision": "approve"}).encode()
    async with (
        connect(home.ws_url, max_size=None, compression=None) as ws,
        operator_client(home.base) as same_http,
        operator_client(other.base) as cross_http,
    ):
        await ws.send(
            json.dumps({"type": "identity", "req_id": "identity", "payload": {"project": "probe"}})
        )
        while True:  # wait until replica 1 knows the probe
            state = (await same_http.get("/api/state", params={"limit": "100000"})).json()
            if any(s["project"] == "probe" for s in state["sleds"]):
                break
            await asyncio.sleep(0.05)

        async def heartbeats() -> None:
            beat = json.dumps({"type": "heartbeat", "req_id": "", "payload": None})
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await ws.send(beat)

        beating = asyncio.create_task(heartbeats())
        try:
            for i in range(samples + 10):  # the first 10 (5 of each) warm up
                mode = "cross" if i % 2 and out.cross_problem is None else "same"
                req_id = f"rt-{i}-{uuid.uuid4().hex[:8]}"
                frame = {
                    "type": "perm_request",
                    "req_id": req_id,
                    "payload": {"tool_name": "Bash", "tool_input": {"command": f"echo {i}"}},
                }
                path = f"/api/permissions/probe/{req_id}"
                start = time.perf_counter()
                await ws.send(json.dumps(frame))
                http = cross_http if mode == "cross" else same_http
                response, retries = await post_decision(http, path, body)
                if mode == "cross" and response.status_code != 200:
                    out.cross_problem = (
                        "not supported by this gateway (404)"
                        if response.status_code == 404
                        else f"refused: {response.status_code} {response.text[:120]}"
                    )
                    # Decide it where it is pending, so the probe is clear for the next sample.
                    response, _ = await post_decision(same_http, path, body)
                    mode = "uncounted"
                if response.status_code != 200:
                    raise RuntimeError(f"decision refused: {response.status_code} {response.text}")
                try:
                    answer = json.loads(await asyncio.wait_for(ws.recv(), RESPONSE_TIMEOUT_S))
                except TimeoutError:
                    if mode != "cross":
                        raise RuntimeError(f"no perm_response for {req_id}") from None
                    out.cross_problem = (
                        f"decided on replica 2 (200) but no perm_response in "
                        f"{RESPONSE_TIMEOUT_S:g} s"
                    )
                    continue
                elapsed = time.perf_counter() - start
                if answer.get("req_id") != req_id or answer.get("payload") != {
                    "approved": True,
                    "always_allow": False,
                }:
                    raise RuntimeError(f"unexpected answer {answer}")
                if i >= 10 and mode in ("same", "cross"):
                    getattr(out, mode).append(elapsed)
                    out.retries[mode] += retries
                await asyncio.sleep(random.uniform(0.01, 0.03))
        finally:
            beating.cancel()
    return out


# -- the run -----------------------------------------------------------------------------


def describe(times: list[float]) -> str:
    if not times:
        return "no samples"
    return (
        f"p50 {1000 * statistics.median(times):7.2f} ms  p99 {1000 * pct(times, 0.99):7.2f} ms  "
        f"max {1000 * max(times):7.1f} ms  ({len(times)} samples)"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run(args: argparse.Namespace) -> int:
    size = args.sleds
    with (
        tempfile.TemporaryDirectory(prefix="cluster-fleet-") as tmp,
        engines(Path(tmp)) as (
            db,
            bus,
        ),
    ):
        replicas: list[Replica] = []
        procs: list[Any] = []
        try:
            # One after another: the first creates the schema the others find.
            for index in range(REPLICAS):
                port = args.replica_ports[index] if args.replica_ports else 0
                replicas.append(Replica(index + 1, Path(tmp), db, bus, size, port))
                asyncio.run(wait_http(replicas[-1].base, timeout=60))
            time.sleep(args.settle)
            rss_before = [rss_mib(r.proc.pid) for r in replicas]
            return measure(args, replicas, procs, rss_before)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
            for replica in replicas:
                replica.stop()
            for replica in replicas:
                if replica.proc.returncode not in (0, -signal.SIGKILL):
                    print(f"replica {replica.index}: exit {replica.proc.returncode}; its log:")
                    print(replica.log.read_text(errors="replace")[-1500:])


def measure(
    args: argparse.Namespace, replicas: list[Replica], procs: list[Any], rss_before: list[float]
) -> int:
    size = args.sleds
    urls = [args.via] if args.via else [r.ws_url for r in replicas]
    view = FleetView(size)
    t0 = time.monotonic()
    procs.extend(spawn_fleet(urls, size, args.sleds_per_process, view))

    def everyone_up(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(view.where) < size:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shares() -> list[int]:
        if args.via:  # which replica holds a sled is only known to the replicas
            return [max(asyncio.run(held_here(r.base)), 0) for r in replicas]
        return view.shares(len(urls))

    if not everyone_up(args.connect_timeout) or not asyncio.run(
        all_identified(replicas, shares() if not args.via else [0] * REPLICAS, 60)
    ):
        print(f"the fleet did not connect: {len(view.where)} of {size} up, {view.fails} failures")
        return 1
    if args.via:  # wait until the replicas' counts add up to the fleet
        deadline = time.monotonic() + 60
        while sum(shares()) < size and time.monotonic() < deadline:
            time.sleep(0.5)
    connect_s = time.monotonic() - t0
    time.sleep(args.settle)
    held = shares()
    rss_with = [rss_mib(r.proc.pid) for r in replicas]

    trips = asyncio.run(round_trips(replicas[0], replicas[1], args.samples))
    if args.via:
        held = shares()

    # The storm: kill -9 the last replica; its sleds go to the others.
    victim = replicas[-1]
    victim_sleds = held[-1] if not args.via else held[victim.index - 1]
    survivors = replicas[:-1]
    downs_before = len(view.downs)
    killed_at = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    back: dict[int, float] = {}
    deadline = killed_at + args.storm_timeout
    while time.monotonic() < deadline:
        with view.lock:
            dropped = {i for i, _, t in view.downs[downs_before:] if t >= killed_at}
            back = {i: t - killed_at for i, r, t in view.ups if t >= killed_at and i in dropped}
            all_up = len(view.where) == size
        if all_up and len(dropped) >= victim_sleds and len(back) >= len(dropped):
            break
        time.sleep(0.1)
    storm_complete = len(view.where) == size
    # The survivors' own sleds must not notice: count their drops, then keep watching a while.
    server_ok = asyncio.run(
        all_identified(survivors, shares()[: len(survivors)] if not args.via else [0, 0], 60)
    )
    time.sleep(args.settle)
    with view.lock:
        storm_downs = [(i, r) for i, r, t in view.downs[downs_before:] if t >= killed_at]
    if args.via:
        # Without knowing each sled's replica: every drop beyond the victim's sleds is a survivor's.
        dropped_once = {i for i, _ in storm_downs}
        survivor_drops = max(0, len(storm_downs) - victim_sleds)
        reconnected = len(dropped_once)
    else:
        survivor_drops = sum(1 for _, r in storm_downs if r != victim.index - 1)
        reconnected = len({i for i, r in storm_downs if r == victim.index - 1})
    storm_times = sorted(back.values())

    # -- the report ------------------------------------------------------------------
    print()
    print(
        f"cluster fleet benchmark: {size} sleds, {REPLICAS} replicas on PostgreSQL and NATS, "
        f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}"
    )
    print(f"sleds connect {'through ' + args.via if args.via else 'round robin, directly'}")
    print(
        f"\nconnect: all {size} connected and identified in {connect_s:.1f} s "
        f"(target <= 120 s at 10,000: {verdict(connect_s <= 120)}); "
        f"{view.fails} connect attempt(s) failed"
    )
    print("\nRSS per sled (RSS with its sleds - RSS before any) / its sleds:")
    worst = 0.0
    for r, before, after, n in zip(replicas, rss_before, rss_with, held, strict=True):
        per = 1024 * (after - before) / n if n else float("nan")
        worst = max(worst, per) if n else worst
        print(
            f"  replica {r.index}: {n:>6} sleds, RSS {before:7.1f} -> {after:7.1f} MiB, "
            f"{per:6.1f} KiB a sled"
        )
    print(f"  target <= 30 KiB a sled: {verdict(worst <= 30)}")
    print("\ndecision round trip, probe sled on replica 1:")
    print(
        f"  same  (POST to replica 1): {describe(trips.same)}, 404 retries {trips.retries['same']}"
    )
    if trips.cross_problem:
        print(f"  cross (POST to replica 2): {trips.cross_problem}")
    else:
        print(
            f"  cross (POST to replica 2): {describe(trips.cross)}, "
            f"404 retries {trips.retries['cross']}"
        )
    if trips.same:
        same50 = 1000 * statistics.median(trips.same)
        tails = [1000 * pct(trips.same, 0.99)]
        if trips.cross and not trips.cross_problem:
            cross50 = 1000 * statistics.median(trips.cross)
            tails.append(1000 * pct(trips.cross, 0.99))
            print(
                f"  target cross p50 <= same p50 + 2 ms ({cross50:.2f} vs {same50:.2f}): "
                f"{verdict(cross50 <= same50 + 2)}"
            )
        else:
            print("  target cross p50 <= same p50 + 2 ms: not measured")
        print(f"  target p99 <= 600 ms: {verdict(max(tails) <= 600)}")
    print(f"\nreconnect storm: kill -9 of replica {victim.index}, which held {victim_sleds} sleds")
    if storm_times:
        print(
            f"  {len(storm_times)} reconnected: from the kill, "
            f"p50 {statistics.median(storm_times):.2f} s, "
            f"p95 {pct(storm_times, 0.95):.2f} s, max {max(storm_times):.2f} s"
        )
    print(
        f"  all {size} connected again: {'yes' if storm_complete else 'NO'}"
        f" (within {args.storm_timeout:g} s); the survivors count them: "
        f"{'yes' if server_ok else 'NO'}; sleds that dropped: {reconnected}"
    )
    print(
        f"  sleds of the surviving replicas disconnected: {survivor_drops} "
        f"(target 0: {verdict(survivor_drops == 0)})"
    )
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")
    print(STATEMENT)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    f = sub.add_parser("fleet", help="(internal) hold a share of the fleet")
    f.add_argument("--urls", required=True)
    f.add_argument("--first", type=int, required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sleds", type=int, default=10_000, help="fleet size (%(default)s)")
    parser.add_argument(
        "--samples", type=int, default=400, help="round trips, same and cross alternating"
    )
    parser.add_argument(
        "--via", metavar="URL", help="the sleds' WebSocket URL through a load balancer"
    )
    parser.add_argument(
        "--replica-ports",
        metavar="P1,P2,P3",
        help="the replicas' ports on 127.0.0.1 (default: free ones), for a --via load balancer "
        "configured beforehand",
    )
    parser.add_argument("--sleds-per-process", type=int, default=5000, metavar="N")
    parser.add_argument("--connect-timeout", type=float, default=300.0, metavar="S")
    parser.add_argument("--storm-timeout", type=float, default=120.0, metavar="S")
    parser.add_argument(
        "--settle", type=float, default=5.0, metavar="S", help="pause after each burst"
    )
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    if args.cmd == "fleet":
        asyncio.run(fleet(args.urls.split(","), args.first, args.count, args.concurrency))
        return 0
    if args.sleds < REPLICAS or args.samples < 2 or args.sleds_per_process < 1:
        parser.error(f"--sleds must be at least {REPLICAS}, --samples at least 2")
    if args.via and not args.via.startswith(("ws://", "wss://", "http://", "https://")):
        parser.error("--via takes a ws:// URL")
    if args.via:  # a bare address gets the sleds' path and the bench's token
        via = urlsplit(args.via)
        scheme = {"http": "ws", "https": "wss"}.get(via.scheme, via.scheme)
        path = via.path if via.path not in ("", "/") else "/api/sled-uplink"
        query = via.query or f"token={TOKEN}"
        args.via = urlunsplit((scheme, via.netloc, path, query, ""))
    if args.replica_ports:
        try:
            args.replica_ports = [int(p) for p in args.replica_ports.split(",")]
        except ValueError:
            parser.error("--replica-ports takes three port numbers, comma-separated")
        if len(args.replica_ports) != REPLICAS or not all(
            0 < p < 65536 for p in args.replica_ports
        ):
            parser.error("--replica-ports takes three port numbers, comma-separated")
    if args.sleds + 256 > nofile:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {args.sleds} sleds")
    # A SIGTERM (``timeout``, Ctrl-C's cousin) still stops the replicas and the engines.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
