"""The decision POST's HTTP dispatch in-process: the request guard and the route, no sockets.

    python -m bench.decision_dispatch [--n 3000] [--rounds 7]
    python -m bench.decision_dispatch --decide --n 500   # whole decisions, commit included

Drives ``POST /api/permissions/{project}/{req_id}`` straight into the gateway's
ASGI app (a real ``GatewayApp`` on an in-memory store, the operator's bearer
token, a JSON body), with a ``receive`` that hands over the body and a ``send``
that drops the answer. The request is for an id that is not pending, so each
one runs the guard, the body read and parse, the authorization, the lookup and
the JSON error (404), and never the store's commit: what is timed is the HTTP
dispatch around the decision, which is what the lean path changes. Two ways
through, alternating round by round in one process:

- ``starlette``: the guard, then Starlette's middlewares and router (as before
  the lean path);
- ``lean``: the guard, then :class:`sled_gateway.http.lean.LeanRoute`.

A figure is the median of the rounds' medians, in µs of one core a request. No
kernel, no h11: a loaded machine stretches these far less than a latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from typing import Any

from loguru import logger

from sled_gateway.app import GatewayApp
from sled_gateway.config import GatewayConfig
from sled_gateway.state import GatewayState
from sled_gateway.store import make_store

OPERATOR = "bench-operator-token-0123456789abcdef"
BODY = b'{"decision": "approve"}'


def scope_for(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"connection", b"keep-alive"),
            (b"user-agent", b"python-httpx/0.28.1"),
            (b"authorization", f"Bearer {OPERATOR}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
    }


async def one_round(app: Any, n: int) -> float:
    """Median µs a request over ``n`` sequential requests into ``app``."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    took = []
    for i in range(n):
        scope = scope_for(f"/api/permissions/probe/gone-{i}")
        start = time.perf_counter()
        await app(scope, receive, send)
        took.append(time.perf_counter() - start)
    if set(statuses) != {404}:
        raise RuntimeError(f"expected 404s, got {sorted(set(statuses))}")
    return statistics.median(took) * 1e6


async def measure(n: int, rounds: int) -> dict[str, float]:
    config = GatewayConfig(operator_token=OPERATOR, token="bench-sled-token")
    app = GatewayApp(config, GatewayState(config.heartbeat_interval), store=make_store().open())
    guard = app.asgi
    ways = {"starlette": app.routes.app, "lean": getattr(app.routes, "asgi", app.routes.app)}
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds + 1):  # the first round warms up
        order = list(ways) if r % 2 else list(reversed(ways))
        for name in order:
            guard.app = ways[name]
            took = await one_round(guard, n)
            if r:
                medians[name].append(took)
    app.store.close()
    return {name: statistics.median(values) for name, values in medians.items()}


class _Answers:
    """The hub's part, counted: the sled's answer is taken, not sent (no socket here)."""

    def __init__(self) -> None:
        self.sent = 0

    async def answer(self, session: int, req_id: str, decision: Any) -> bool:
        self.sent += 1
        return True


async def decisions(n: int, rounds: int, db: str) -> dict[str, float]:
    """Median µs a step of whole decisions: the frame's ``approvals.request``, and the
    decision POST through the guard and the lean path, with the store's real commit
    (a SQLite file in WAL mode, the writer thread's hop) and the answer handed over."""
    config = GatewayConfig(operator_token=OPERATOR, token="bench-sled-token")
    store = make_store(db).open()
    app = GatewayApp(config, GatewayState(config.heartbeat_interval), store=store)
    answers = _Answers()
    app.approvals.answer_through(answers)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    steps: dict[str, list[float]] = {"request": [], "decide": []}
    for r in range(rounds + 1):  # the first round warms up
        took: dict[str, list[float]] = {"request": [], "decide": []}
        for i in range(n):
            req_id = f"r{r}-{i}"
            start = time.perf_counter()
            await app.approvals.request(1, "probe", req_id, "Bash", {"command": f"echo {i}"})
            took["request"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await app.asgi(scope_for(f"/api/permissions/probe/{req_id}"), receive, send)
            took["decide"].append(time.perf_counter() - start)
        if r:
            for name, values in took.items():
                steps[name].append(statistics.median(values) * 1e6)
    store.close()
    if set(statuses) != {200} or answers.sent != len(statuses):
        raise RuntimeError(f"expected 200s, each answered; got {sorted(set(statuses))}")
    return {name: statistics.median(values) for name, values in steps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="requests a round and way")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--decide",
        action="store_true",
        help="whole decisions instead (the frame's path, then the POST with the commit)",
    )
    args = parser.parse_args(argv)
    # As bench.paths runs the gateway (--log-level WARNING): its info lines are not written.
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.decide:
        with tempfile.TemporaryDirectory(prefix="decide-") as tmp:
            steps = asyncio.run(decisions(args.n, args.rounds, f"{tmp}/gateway.db"))
        for name, value in steps.items():
            print(f"{name:>10}: {value:7.1f} µs (median of {args.rounds} round medians)")
        return 0
    figures = asyncio.run(measure(args.n, args.rounds))
    for name, value in figures.items():
        print(f"{name:>10}: {value:7.1f} µs a request (median of {args.rounds} round medians)")
    print(f"     saved: {figures['starlette'] - figures['lean']:7.1f} µs a request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
