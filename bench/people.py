"""The cost of people: a decision's round trip with a person token and role checks, beside the
operator token, in the same run against the same gateway.

    python -m bench.people            # 600 decisions each
    python -m bench.people --rounds 100

One round: a raw WebSocket sled sends a ``perm_request``, the gateway shows it
pending, an HTTP client POSTs the decision, the sled reads its
``perm_response``. The two credentials alternate round by round (the same
sled, connection and client), so drift in the machine's load falls on both.
The person token costs one indexed database read per request (so a revoked
token is refused at once) and the per-project role check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from sled_gateway import Gateway
from sled_gateway.access import load_access

ACCESS = """\
[[grant]]
who = "alice@example.test"
role = "approver"
projects = ["web-*"]
"""


async def _rounds(gw: Gateway, rounds: int) -> dict[str, list[float]]:
    headers = {**gw.api_headers(), "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=gw.http_url, headers=headers, timeout=10) as client:
        made = await client.post(
            "/api/tokens", json={"person": "alice@example.test", "expires_in": 3600}
        )
        person = made.json()["token"]
        auth = {"operator": headers["Authorization"], "person": f"Bearer {person}"}
        times: dict[str, list[float]] = {"operator": [], "person": []}
        async with connect(gw.url_for_sleds(), compression=None) as ws:
            await ws.send(
                json.dumps(
                    {"type": "identity", "req_id": "identity", "payload": {"project": "web-1"}}
                )
            )
            await asyncio.to_thread(
                gw.wait_for, lambda s: any(x["project"] == "web-1" for x in s["sleds"]), 5
            )
            loop = asyncio.get_running_loop()
            shown: asyncio.Queue[str] = asyncio.Queue()
            gw.add_pending_listener(
                lambda item: loop.call_soon_threadsafe(shown.put_nowait, item.req_id)
            )
            for n in range(rounds * 2 + 20):
                kind = "operator" if n % 2 == 0 else "person"
                req_id = f"r{n}"
                started = time.perf_counter()
                await ws.send(
                    json.dumps(
                        {
                            "type": "perm_request",
                            "req_id": req_id,
                            "payload": {"tool_name": "Bash", "tool_input": {"command": "ls"}},
                        }
                    )
                )
                assert await shown.get() == req_id
                answer = await client.post(
                    f"/api/permissions/web-1/{req_id}",
                    json={"decision": "approve"},
                    headers={"Authorization": auth[kind]},
                )
                assert answer.status_code == 200, answer.text
                reply = json.loads(await ws.recv())
                assert reply["req_id"] == req_id and reply["payload"]["approved"] is True
                if n >= 20:  # the first rounds warm up
                    times[kind].append(time.perf_counter() - started)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "access.toml"
        path.write_text(ACCESS)
        with Gateway(token="bench", access=load_access(path), db=str(Path(tmp) / "g.db")) as gw:
            times = asyncio.run(_rounds(gw, args.rounds))
    op, pe = (statistics.median(times[k]) * 1000 for k in ("operator", "person"))
    print(f"decision round trip, median of {args.rounds} each (ms)")
    print(f"  operator token:                {op:.3f}")
    print(f"  person token and role checks:  {pe:.3f}")
    print(f"  cost of the checks:            {100 * (pe - op) / op:+.1f} %")


if __name__ == "__main__":
    main()
