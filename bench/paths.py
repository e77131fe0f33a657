"""Issue 26 targets 1, 2 and 4 as ratios against raw baselines from the same run.

    python -m bench.paths                        # ingress, MCP replay and gateway round trip
    python -m bench.paths --only ingress --rounds 6 --n 150
    python -m bench.paths --vs /tmp/old-checkout  # this tree and another, alternating

Each path is measured in rounds; within a round the raw baselines and the
uplink (or gateway) samples alternate, and with ``--vs`` the two checkouts
alternate too, which one goes first switching every round. The figure of a
side is the median of its round medians, and every ratio is against the
baselines of the same run. Beside each target's ratio, the lowest and highest of
the rounds' own ratios (each round's figure over that round's baselines): on a
small VM they show how far a single round's verdict can be from the run's. The
machine need not be quiet for the ratios to mean something, but only a quiet
machine gives the absolute figures. Clients and peers run the loop the uplink
and the gateway run (uvloop's where it is installed;
``bench.peers.new_event_loop``), so no raw part is measured on a slower loop
than the process it is compared with.

1. Ingress: sequential ``POST /permission`` p50 against a raw HTTP round trip
   to a trivial server plus a raw WebSocket round trip (the same gateway peer
   the uplink uses), with a light client (aiohttp) and with httpx; and
   decisions/s at 64 in flight against raw HTTP requests/s at 64 in flight
   (aiohttp). Targets: p50 ≤ 1.2 x (HTTP + WS), throughput ≥ 0.8 x raw.
   Printed beside them, the same figures of the stack's floor
   (``bench.peers relay``): the same request relayed to the same gateway peer
   on the ingress's parts (uvicorn's h11 server, websockets' sans-I/O client,
   the same loop) with none of the uplink's own work. What the uplink costs
   above the floor is its own; what the floor costs above the raw parts is
   the relay's hop on these parts. Below it, the bare hop
   (``bench.peers bare-relay``): the same process in the path with no parts
   on it (a request's bytes unparsed, fixed frames and answers), which shows
   how much of the floor is the hop and how much the parts.
2. MCP replay: a gateway in this process sends ``mcp_request`` frames; the p50
   of their answers against a direct POST of the same body to the same
   JSON-RPC server with the client the uplink replays with (httpx on aiohttp's
   engine, ``httpx_aiohttp``) plus a raw WebSocket round trip. Target: p50 ≤
   POST + WS + 0.3 ms. The direct POSTs of httpx on its own engine (httpcore)
   and of aiohttp alone are printed too: the distances between the three are
   what httpx's engine and httpx's models cost.
4. Gateway round trip at one sled (``bench.gateway_fleet``'s probe: a
   ``perm_request`` in, the decision POSTed, the ``perm_response`` out, the
   SQLite audit committed before it) against a raw WebSocket round trip + a raw
   POST round trip with the same client + one raw SQLite commit in the store's
   mode (WAL, ``synchronous=NORMAL``, ``BEGIN IMMEDIATE``). Target ≤ 1.5 x.
   Measured with httpx and with aiohttp (the light client the issue measured
   with), and at two paces, each on both sides of the ratio: back to back, and
   10-30 ms apart (the fleet probe's pace, whose idle CPUs wake for each hop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from actors.mcp_client import load_http, replay_client
from bench.gateway_fleet import FLEET_PAUSE
from bench.peers import new_event_loop, run_loop
from bench.run import (
    PY,
    REPO,
    BenchGateway,
    free_port,
    peer,
    proc_cpu_seconds,
    raw_ws_sequential,
    threads_cpu_seconds,
    wait_ready,
    ws_url,
)

BODY = {"tool_name": "Bash", "tool_input": {"command": "ls"}}
RPC_BODY = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


class Sides:
    """Round medians per (figure, side), and the order sides take in a round."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rounds: dict[tuple[str, str], list[float]] = {}

    def order(self, r: int) -> list[str]:
        return self.names if r % 2 == 0 else list(reversed(self.names))

    def add(self, figure: str, side: str, value: float) -> None:
        self.rounds.setdefault((figure, side), []).append(value)

    def get(self, figure: str, side: str = "raw") -> float:
        return med(self.rounds.get((figure, side), []))

    def each(self, figure: str, side: str = "raw") -> list[float]:
        """The round medians, in round order."""
        return self.rounds.get((figure, side), [])


def spread(values: list[float], bases: list[float]) -> str:
    """The lowest and highest of the rounds' own ratios (each round's figure over the
    same round's baseline): how far one round's verdict can sit from the run's."""
    ratios = [value / base for value, base in zip(values, bases, strict=True)]
    if len(ratios) < 2:
        return ""
    return f" (rounds {min(ratios):.2f}–{max(ratios):.2f}×)"


def summed(*rounds: list[float]) -> list[float]:
    """Per-round sums of several baselines' round medians."""
    return [sum(parts) for parts in zip(*rounds, strict=True)]


@contextlib.contextmanager
def uplink(checkout: Path, gateway_url: str, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    command = [PY, "run_uplink.py", "--upstream-gateway", gateway_url, "--log-level", "WARNING"]
    proc = subprocess.Popen(
        [*command, "--project", "bench", *extra],
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def aiohttp_sequential(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    n: int,
    pause: tuple[float, float] | None = None,
) -> float:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(url, data=data, headers=headers) as response:
            await response.read()
            samples.append(time.perf_counter() - started)
            assert response.status == 200, response.status
        if pause is not None:
            await asyncio.sleep(random.uniform(*pause))
    return med(samples)


async def httpx_sequential(
    client: httpx.AsyncClient,
    url: str,
    body: Any,
    n: int,
    pause: tuple[float, float] | None = None,
) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.post(url, json=body)
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        if pause is not None:
            await asyncio.sleep(random.uniform(*pause))
    return med(samples)


async def aiohttp_rate(
    session: aiohttp.ClientSession, url: str, total: int, in_flight: int
) -> float:
    data = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return total / (time.perf_counter() - started)


def sessions() -> tuple[aiohttp.ClientSession, httpx.AsyncClient]:
    connector = aiohttp.TCPConnector(limit=128, limit_per_host=128)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    return aiohttp.ClientSession(connector=connector), httpx.AsyncClient(
        timeout=10, limits=limits, trust_env=False
    )


def report(label: str, value: float, base: float, target: float, above: bool = False) -> str:
    ratio = value / base
    ok = ratio >= target if above else ratio <= target
    sign = "≥" if above else "≤"
    # A ratio that rounds to its bound gets a third digit: "1.20" would read as met.
    shown = f"{ratio:.2f}" if round(ratio, 2) != target else f"{ratio:.3f}"
    return f"{shown}× (target {sign} {target}×: {'ok' if ok else 'MISS'})"


# ── 1. ingress ──────────────────────────────────────────────────────────────


def ingress(checkouts: dict[str, Path], rounds: int, n: int, total: int) -> None:
    sides = Sides(list(checkouts))
    with contextlib.ExitStack() as peers:
        gw_port = peers.enter_context(peer("gateway", "--auto", "approve"))
        http_port = peers.enter_context(peer("http"))
        gw = ws_url(gw_port)
        raw_url = f"http://127.0.0.1:{http_port}/"
        floor_url = f"http://127.0.0.1:{peers.enter_context(peer('relay', gw))}/permission"
        bare_url = f"http://127.0.0.1:{peers.enter_context(peer('bare-relay', gw))}/permission"
        ports = {name: free_port() for name in checkouts}
        with contextlib.ExitStack() as stack:
            procs = {
                name: stack.enter_context(
                    uplink(checkout, gw, "--listen", f"127.0.0.1:{ports[name]}")
                )
                for name, checkout in checkouts.items()
            }
            for port in ports.values():
                wait_ready(port)
            cpu = dict.fromkeys(checkouts, 0.0)
            count = dict.fromkeys(checkouts, 0)

            async def main() -> None:
                light, heavy = sessions()
                async with light, heavy:
                    urls = {s: f"http://127.0.0.1:{p}/permission" for s, p in ports.items()}
                    for url in [raw_url, floor_url, bare_url, *urls.values()]:  # warm-up
                        await aiohttp_sequential(light, url, BODY, 100)
                        await httpx_sequential(heavy, url, BODY, 100)
                    for r in range(rounds):
                        sides.add("ws", "raw", med(await raw_ws_sequential(gw, n)))
                        sides.add(
                            "aiohttp", "raw", await aiohttp_sequential(light, raw_url, BODY, n)
                        )
                        sides.add("httpx", "raw", await httpx_sequential(heavy, raw_url, BODY, n))
                        sides.add("rate", "raw", await aiohttp_rate(light, raw_url, total, 64))
                        sides.add(
                            "aiohttp", "floor", await aiohttp_sequential(light, floor_url, BODY, n)
                        )
                        sides.add(
                            "httpx", "floor", await httpx_sequential(heavy, floor_url, BODY, n)
                        )
                        sides.add("rate", "floor", await aiohttp_rate(light, floor_url, total, 64))
                        sides.add(
                            "aiohttp", "bare", await aiohttp_sequential(light, bare_url, BODY, n)
                        )
                        sides.add("httpx", "bare", await httpx_sequential(heavy, bare_url, BODY, n))
                        sides.add("rate", "bare", await aiohttp_rate(light, bare_url, total, 64))
                        for side in sides.order(r):
                            before = proc_cpu_seconds(procs[side].pid)
                            url = urls[side]
                            sides.add(
                                "aiohttp", side, await aiohttp_sequential(light, url, BODY, n)
                            )
                            sides.add("httpx", side, await httpx_sequential(heavy, url, BODY, n))
                            cpu[side] += proc_cpu_seconds(procs[side].pid) - before
                            count[side] += 2 * n
                            sides.add("rate", side, await aiohttp_rate(light, url, total, 64))

            run_loop(main())
    ws = sides.get("ws")
    print(
        f"\n1. ingress POST /permission, {rounds} rounds × {n} sequential, {total} at 64 in flight"
    )
    print(f"   raw WebSocket round trip {us(ws)}")
    for client in ("aiohttp", "httpx"):
        raw = sides.get(client)
        print(f"   raw HTTP round trip ({client}) {us(raw)}; raw HTTP + WS {us(raw + ws)}")
        bare = sides.get(client, "bare")
        print(f"   bare hop p50 ({client}) {us(bare)}: {(bare / (raw + ws)):.2f}×")
        floor = sides.get(client, "floor")
        print(f"   floor p50 ({client}) {us(floor)}: {(floor / (raw + ws)):.2f}×")
        bases = summed(sides.each(client), sides.each("ws"))
        for side in checkouts:
            value = sides.get(client, side)
            print(
                f"   {side:>5} p50 ({client}) {us(value)}: {report(client, value, raw + ws, 1.2)}"
                + spread(sides.each(client, side), bases)
            )
    raw_rate = sides.get("rate")
    print(f"   raw HTTP at 64 in flight (aiohttp) {raw_rate:.0f}/s")
    bare_rate = sides.get("rate", "bare")
    print(f"   bare hop at 64 in flight {bare_rate:.0f}/s: {bare_rate / raw_rate:.2f}×")
    floor_rate = sides.get("rate", "floor")
    print(f"   floor at 64 in flight {floor_rate:.0f}/s: {floor_rate / raw_rate:.2f}×")
    for side in checkouts:
        rate = sides.get("rate", side)
        print(
            f"   {side:>5} decisions/s at 64 in flight {rate:.0f}/s: "
            + report("", rate, raw_rate, 0.8, True)
            + spread(sides.each("rate", side), sides.each("rate"))
        )
    for side in checkouts:
        print(f"   {side:>5} uplink CPU per sequential request {us(cpu[side] / count[side])}")


# ── 2. MCP replay ───────────────────────────────────────────────────────────


def mcp(checkouts: dict[str, Path], rounds: int, n: int) -> None:
    sides = Sides(list(checkouts))
    with peer("jsonrpc") as rpc_port, peer("gateway", "--auto", "approve") as gw_port:
        rpc_url = f"http://127.0.0.1:{rpc_port}/mcp"
        gateways = {name: BenchGateway() for name in checkouts}
        with contextlib.ExitStack() as stack:
            procs = {}
            for name, checkout in checkouts.items():
                gateways[name].start()
                stack.callback(gateways[name].stop)
                procs[name] = stack.enter_context(
                    uplink(
                        checkout,
                        ws_url(gateways[name].port),
                        "--local-mcp-url",
                        rpc_url,
                        "--listen",
                        "off",
                    )
                )
            for name, gateway in gateways.items():
                if not gateway.identified.wait(30):
                    raise RuntimeError(f"the {name} uplink did not connect")
                gateway.run(gateway.sequential(200))
            cpu = dict.fromkeys(checkouts, 0.0)
            loop = new_event_loop()
            light, heavy = loop.run_until_complete(_sessions())
            engine = replay_client(*load_http(), timeout=10, pool=8)  # the uplink's
            try:
                loop.run_until_complete(aiohttp_sequential(light, rpc_url, RPC_BODY, 100))
                loop.run_until_complete(httpx_sequential(heavy, rpc_url, RPC_BODY, 100))
                loop.run_until_complete(httpx_sequential(engine, rpc_url, RPC_BODY, 100))
                start = 1000
                for r in range(rounds):
                    sides.add(
                        "ws",
                        "raw",
                        med(loop.run_until_complete(raw_ws_sequential(ws_url(gw_port), n))),
                    )
                    sides.add(
                        "httpx",
                        "raw",
                        loop.run_until_complete(httpx_sequential(heavy, rpc_url, RPC_BODY, n)),
                    )
                    sides.add(
                        "aiohttp",
                        "raw",
                        loop.run_until_complete(aiohttp_sequential(light, rpc_url, RPC_BODY, n)),
                    )
                    sides.add(
                        "httpx-aiohttp",
                        "raw",
                        loop.run_until_complete(httpx_sequential(engine, rpc_url, RPC_BODY, n)),
                    )
                    for side in sides.order(r):
                        before = proc_cpu_seconds(procs[side].pid)
                        gateway = gateways[side]
                        sides.add("replay", side, med(gateway.run(gateway.sequential(n, start))))
                        cpu[side] += proc_cpu_seconds(procs[side].pid) - before
                        start += n
            finally:
                loop.run_until_complete(light.close())
                loop.run_until_complete(heavy.aclose())
                loop.run_until_complete(engine.aclose())
                loop.close()
    ws, post = sides.get("ws"), sides.get("httpx-aiohttp")
    httpcore_post, light_post = sides.get("httpx"), sides.get("aiohttp")
    bound = post + ws + 0.0003
    print(f"\n2. MCP replay, {rounds} rounds × {n} sequential")
    print(f"   raw WebSocket round trip {us(ws)}")
    print(
        f"   direct POST: httpx on aiohttp's engine (the uplink's client) {us(post)}; "
        f"httpx on httpcore {us(httpcore_post)}, aiohttp alone {us(light_post)}"
    )
    print(f"   bound: the uplink's client's POST + WS + 300 µs = {us(bound)}")
    for side in checkouts:
        value = sides.get("replay", side)
        verdict = "ok" if value <= bound else "MISS"
        print(
            f"   {side:>5} replay p50 {us(value)}: {value / (post + ws):.2f}× (POST + WS), "
            f"{us(value - post - ws)} above it (target ≤ 300 µs: {verdict}); "
            f"uplink CPU per replay {us(cpu[side] / (rounds * n))}"
        )


async def _sessions() -> tuple[aiohttp.ClientSession, httpx.AsyncClient]:
    return sessions()


# ── 3. gateway round trip ───────────────────────────────────────────────────


def sqlite_commits(path: Path, n: int) -> float:
    """p50 of one small transaction in the store's SQLite mode."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL, body TEXT)"
        )
        body = json.dumps(
            {"tool_name": "Bash", "tool_input": {"command": "echo 1"}, "pad": "x" * 200}
        )
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO audit (at, body) VALUES (?, ?)", (time.time(), body))
            conn.execute("COMMIT")
            samples.append(time.perf_counter() - started)
        return med(samples)
    finally:
        conn.close()


#: The two paces of target 4, each measured on both sides of its ratio: back to back, as
#: every other path here, and with the fleet probe's pause. Idle gaps let this VM's CPUs
#: sleep, and every hop of the next sample then pays their wake-up: a paced path against
#: back-to-back baselines would measure the pause, about twice the gateway's own cost.
PACES: dict[str, tuple[float, float] | None] = {"": None, "~": FLEET_PAUSE}
#: The clients that POST target 4's decisions, each on both sides of its ratio: httpx
#: (the console's usual client) and aiohttp, the light client the issue measured with,
#: whose smaller share of a round trip leaves more of it to the gateway.
GATEWAY_CLIENTS = ("httpx", "aiohttp")


def gateway(checkouts: dict[str, Path], rounds: int, n: int) -> None:
    from bench.gateway_fleet import TOKEN, gateway_process, round_trips, wait_http

    sides = Sides(list(checkouts))
    with (
        tempfile.TemporaryDirectory(prefix="i26-paths-") as tmp,
        peer("gateway", "--auto", "approve") as gw_port,
        peer("http") as http_port,
        contextlib.ExitStack() as stack,
    ):
        raw_url = f"http://127.0.0.1:{http_port}/"
        bases = {}
        gateways = {}
        for name, checkout in checkouts.items():
            workdir = Path(tmp) / name
            workdir.mkdir()
            gateways[name], port = stack.enter_context(gateway_process(workdir, 1, checkout))
            bases[name] = f"http://127.0.0.1:{port}"
            run_loop(wait_http(bases[name]))
        loop = new_event_loop()
        light, heavy = loop.run_until_complete(_sessions())
        try:
            loop.run_until_complete(httpx_sequential(heavy, raw_url, BODY, 100))
            loop.run_until_complete(aiohttp_sequential(light, raw_url, BODY, 100))
            raw_posts = {
                "httpx": lambda pause: httpx_sequential(heavy, raw_url, BODY, n, pause),
                "aiohttp": lambda pause: aiohttp_sequential(light, raw_url, BODY, n, pause),
            }
            for r in range(rounds):
                sides.add("sqlite", "raw", sqlite_commits(Path(tmp) / "raw.db", n))
                for pace, pause in PACES.items():
                    ws = raw_ws_sequential(ws_url(gw_port), n, pause)
                    sides.add("ws" + pace, "raw", med(loop.run_until_complete(ws)))
                    for client in GATEWAY_CLIENTS:
                        figure = client + pace
                        http = raw_posts[client](pause)
                        sides.add("http" + figure, "raw", loop.run_until_complete(http))
                        for side in sides.order(r):
                            base = bases[side]
                            wsu = (
                                f"ws://{base.removeprefix('http://')}/api/sled-uplink?token={TOKEN}"
                            )
                            before = threads_cpu_seconds(gateways[side].pid)
                            trips = round_trips(base, wsu, n, pause, client)
                            times, retries = loop.run_until_complete(trips)
                            # Its own CPU (all threads) over the round trips, connect and
                            # warm-up included: a count that a loaded machine inflates less
                            # than a latency.
                            cpu = threads_cpu_seconds(gateways[side].pid) - before
                            sides.add("gwcpu" + figure, side, cpu / n)
                            sides.add("rt" + figure, side, med(times))
                            sides.add("404" + figure, side, retries / n)
        finally:
            loop.run_until_complete(light.close())
            loop.run_until_complete(heavy.aclose())
            loop.close()
    commit = sides.get("sqlite")
    print(f"\n4. gateway decision round trip at one sled, {rounds} rounds × {n}")
    for client in GATEWAY_CLIENTS:
        for pace, pause in PACES.items():
            figure = client + pace
            ws, http = sides.get("ws" + pace), sides.get("http" + figure)
            raw = ws + http + commit
            how = (
                "back to back"
                if pause is None
                else f"{pause[0] * 1000:.0f}–{pause[1] * 1000:.0f} ms apart"
            )
            print(
                f"   {client}, {how}, on both sides: raw WS {us(ws)} + raw POST {us(http)} "
                f"+ one SQLite commit (WAL, NORMAL) {us(commit)} = {us(raw)}"
            )
            bases = summed(
                sides.each("ws" + pace), sides.each("http" + figure), sides.each("sqlite")
            )
            for side in checkouts:
                value = sides.get("rt" + figure, side)
                print(
                    f"   {side:>5} round trip p50 {us(value)}: {report('', value, raw, 1.5)}"
                    f"{spread(sides.each('rt' + figure, side), bases)}; "
                    f"{sides.get('404' + figure, side):.2f} early POSTs (404, retried) a "
                    f"request; gateway CPU per round trip {us(sides.get('gwcpu' + figure, side))}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="ingress,mcp,gateway", help="comma-separated paths")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=150, help="sequential samples per round")
    parser.add_argument("--total", type=int, default=2000, help="requests per 64-in-flight sample")
    parser.add_argument("--vs", type=Path, metavar="CHECKOUT", help="also measure another checkout")
    args = parser.parse_args(argv)
    checkouts = {"this": REPO}
    if args.vs is not None:
        checkouts["other"] = args.vs.resolve()
    print(
        f"bench.paths: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}; "
        + ", ".join(f"{k} = {v}" for k, v in checkouts.items()),
        flush=True,
    )
    only = args.only.split(",")
    if "ingress" in only:
        ingress(checkouts, args.rounds, args.n, args.total)
    if "mcp" in only:
        mcp(checkouts, args.rounds, args.n)
    if "gateway" in only:
        gateway(checkouts, args.rounds, args.n)
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
